"""Memory and time of `limajax convert --from meta` on a synthetic 8-shard checkpoint.

The target (issue 2): peak anonymous memory below 1.5 x the largest merged tensor + 500 MB.
Anonymous memory is RssAnon from /proc/PID/status, sampled every few milliseconds from this
process while `convert` runs in a child; maxrss would also count the memory-mapped shard files,
which are page cache the kernel can drop, not memory the conversion holds.

    python tools/bench_convert.py                      # 2.1 GB bf16 checkpoint, 4 layers
    python tools/bench_convert.py --layers 8 --verify  # bigger, and check every tensor

The synthetic checkpoint has LLaMA-7B's widths (dim 4096, 32 heads, ffn 11008, vocab 32000)
and fewer layers; its weights are random.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MB = 1 << 20


def rss_anon(pid: int) -> int | None:
    """Anonymous resident memory of a process in bytes (None once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def run_sampled(cmd: list[str], interval: float = 0.002) -> tuple[float, int, int]:
    """(wall seconds, peak RssAnon bytes, exit code) of a child process."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    peak = 0

    def sample():
        nonlocal peak
        while child.poll() is None:
            peak = max(peak, rss_anon(child.pid) or 0)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = child.wait()
    sampler.join()
    return time.perf_counter() - start, peak, code


def synthetic_params(config, directory: Path, seed: int = 0) -> dict:
    """Random parameters as memmaps, filled in blocks (the writer never holds the model)."""
    from limajax import convert

    params = convert.allocate(config, directory)
    rng = np.random.default_rng(seed)
    for leaf in _leaves(params):
        flat = leaf.reshape(-1)
        for start in range(0, flat.size, 1 << 24):
            block = flat[start:start + (1 << 24)]
            block[...] = (rng.standard_normal(block.size, np.float32) * 0.02).astype(leaf.dtype)
    # Vocabulary padding rows stay zero, as conversion would leave them.
    return params


def _leaves(tree):
    for value in tree.values():
        yield from (_leaves(value) if isinstance(value, dict) else [value])


def largest_merged(config) -> tuple[str, tuple[int, ...]]:
    from limajax import convert

    sizes = convert.sizes_for(config, config.vocab_size)
    shapes = {w.meta: convert.layout_shape(w.meta_layout, sizes)
              for w in convert.weights_for(config)}
    name = max(shapes, key=lambda k: np.prod(shapes[k]))
    return name, shapes[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"],
                        help="output dtypes to convert to (one run each)")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--verify", action="store_true",
                        help="restore each converted model and compare it with the source")
    args = parser.parse_args()

    from limajax.config import ModelConfig

    config = ModelConfig(dim=4096, n_layers=args.layers, n_heads=32, vocab_size=32000,
                         multiple_of=256, param_dtype="bfloat16", dtype="bfloat16")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert."))
    workdir.mkdir(parents=True, exist_ok=True)
    meta_dir = workdir / "meta"
    try:
        t0 = time.perf_counter()
        source = synthetic_params(config, _fresh(workdir / "source"))
        from limajax import convert

        convert.write_meta(_fresh(meta_dir), source, config, args.shards)
        size = sum(f.stat().st_size for f in meta_dir.glob("consolidated.*.pth"))
        print(f"wrote a synthetic {args.shards}-shard checkpoint: {size / 1e9:.2f} GB "
              f"({config.n_params / 1e9:.2f} B parameters, bfloat16) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)

        baseline_cmd = [sys.executable, "-c",
                        "import torch, orbax.checkpoint, limajax.convert, limajax.cli"]
        _, baseline, _ = run_sampled(baseline_cmd)
        name, shape = largest_merged(config)
        merged = int(np.prod(shape)) * 2  # bytes as stored (bfloat16)
        budget = 1.5 * merged + 500 * MB
        print(f"largest merged tensor: {name} {list(shape)} = {merged / MB:.0f} MiB in "
              f"bfloat16; budget 1.5 x that + 500 MiB = {budget / MB:.0f} MiB")
        print(f"RssAnon of a process that only imports torch, orbax and limajax: "
              f"{baseline / MB:.0f} MiB", flush=True)

        results = []
        for dtype in args.dtype:
            out = workdir / f"model-{dtype}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-c", "from limajax.cli import main; main()", "convert",
                   "--from", "meta", "--no-tokenizer", "--input", str(meta_dir),
                   "--output", str(out), "--dtype", dtype]
            wall, peak, code = run_sampled(cmd)
            if code:
                sys.exit(f"convert failed with exit code {code}")
            on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            ok = peak < budget
            results.append({"dtype": dtype, "wall_s": round(wall, 1),
                            "peak_rss_anon_mib": round(peak / MB), "budget_mib": round(budget / MB),
                            "within_budget": ok, "model_dir_gb": round(on_disk / 1e9, 2)})
            print(f"convert --dtype {dtype}: {wall:.1f} s, peak RssAnon {peak / MB:.0f} MiB "
                  f"({'within' if ok else 'OVER'} the {budget / MB:.0f} MiB budget), model "
                  f"directory {on_disk / 1e9:.2f} GB", flush=True)
            if args.verify:
                verify(out, source, config)
        print(json.dumps({"checkpoint_gb": round(size / 1e9, 2), "shards": args.shards,
                          "largest_merged_mib": round(merged / MB),
                          "import_baseline_mib": round(baseline / MB), "runs": results}))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def verify(model_dir: Path, source: dict, config) -> None:
    """Every converted tensor equals the synthetic source (cast to the model's dtype)."""
    from limajax import convert
    from limajax.checkpoint import load_model_dir

    params, converted, tokens = load_model_dir(model_dir)
    sizes = convert.sizes_for(config, config.vocab_size)
    for w in convert.weights_for(config):
        for layer in range(config.n_layers) if w.per_layer else [None]:
            want = convert.extract(source, w, layer, w.layout, sizes)
            got = convert.extract(params, w, layer, w.layout, sizes)
            np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=w.ours)
    eot = np.asarray(params["tok_embeddings"]["embedding"][tokens.eot_id], np.float32)
    mean = np.asarray(source["tok_embeddings"]["embedding"][:config.vocab_size],
                      np.float32).mean(0)
    np.testing.assert_allclose(eot, mean, atol=1e-2)
    print(f"  verified: every tensor of {model_dir.name} equals the source; EOT row is the mean")


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


if __name__ == "__main__":
    main()
