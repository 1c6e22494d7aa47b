"""A prepared accelerator check: tokens/s and MFU of limajax's real train step for a ~1B LLaMA
(TinyLlama's shape: dim 2048, 22 layers, 32 heads, 4 K/V heads, FFN 5632) in bfloat16 compute
with float32 master weights, on packed batches of 32 LIMA-length dialogues at 2048 tokens,
once per attention kernel the platform runs (xla, cudnn, pallas on GPU; xla, splash on TPU).

    python tools/bench_gpu.py [--out results.json]      # on one GPU: well under 8 minutes
    python tools/bench_gpu.py --smoke                   # the same path, tiny, on this CPU

It needs only jax (with CUDA), flax, optax, orbax and transformers' dependencies: no grain,
tensorflow-datasets or sentencepiece. limajax imports those for its data readers, which this
script never calls (it builds its batches with data.Batches.collate from synthetic dialogues),
so where one is missing a stand-in module takes its name. Dialogue lengths are drawn from a
log-normal fitted to LIMA's (median 488, p90 1,730 LLaMA tokens; trimmed at 2048), token ids
at random: speed does not depend on which ids they are.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for name in ("grain", "tensorflow_datasets", "sentencepiece"):
    if importlib.util.find_spec(name) is None:
        sys.modules[name] = mock.MagicMock(name=name)  # never called here (see above)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from limajax import attention, data, sharding, train  # noqa: E402
from limajax.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from limajax.tokenizer import Encoded  # noqa: E402

ONE_B = ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                    vocab_size=32001, dtype="bfloat16", remat="dots")
TINY = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512,
                   multiple_of=32, dtype="bfloat16", remat="dots")
KERNELS = {"gpu": ("xla", "cudnn", "pallas"), "tpu": ("xla", "splash"),
           "cpu": ("xla", "pallas", "splash")}


def lima_like_batches(n: int, batch: int, max_len: int, vocab: int, seed: int = 0):
    """`n` packed global batches of `batch` synthetic dialogues with LIMA's length profile,
    all of the most common row count (one compiled shape)."""
    rng = np.random.default_rng(seed)
    loader = data.Batches([{}] * batch, types.SimpleNamespace(eot_id=vocab - 1, path="synthetic"),
                          batch_size=batch, max_len=max_len, buckets=(max_len,),
                          process_index=0, process_count=1, read_options=None)
    out = []
    while len(out) < 4 * n:
        lengths = np.minimum(rng.lognormal(np.log(488 * max_len / 2048), 0.99, batch),
                             max_len).astype(int) + 2
        lengths = np.minimum(lengths, max_len)
        dialogues = [Encoded(rng.integers(1, vocab - 1, n_tok).astype(np.int32),
                             np.ones(n_tok, np.int32), False) for n_tok in lengths]
        out.append(loader.collate(dialogues))
    rows = [len(b["inputs"]) for b in out]
    common = max(set(rows), key=rows.count)
    return [b for b in out if len(b["inputs"]) == common][:n]


def measure(model: ModelConfig, kernel: str, batches, steps: int, peak: float) -> dict:
    config = TrainConfig(model=model.replace(attention=kernel), data=DataConfig(batch_size=32),
                         epochs=1, dropout=0.0, mesh="1x1")
    mesh = sharding.make_mesh("1x1", jax.devices()[:1])
    setup = train.build(config, mesh, steps_per_epoch=steps + 2)
    state = train.init_state(setup)
    step = train.make_train_step(setup)
    placed = [train.put_batch(b, setup) for b in batches]
    t0 = time.perf_counter()
    with sharding.activate(mesh):
        for i in range(2):  # compile, then one more warm-up
            state, metrics = step(state, placed[i % len(placed)])
        first_loss = float(metrics["loss"])
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = step(state, placed[i % len(placed)])
        jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    rows, t = batches[0]["inputs"].shape
    real = float(np.mean([(b["segment_ids"] > 0).sum() for b in batches]))
    tokens_per_s = rows * t / seconds
    return {"kernel": kernel, "rows": rows, "seq_len": t, "step_s": seconds,
            "tokens_per_s": tokens_per_s, "real_tokens_per_s": real / seconds,
            "mfu": tokens_per_s * model.flops_per_token(t) / peak,
            "compile_and_warmup_s": compile_s, "loss": first_loss,
            "final_loss": float(metrics["loss"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, 256 tokens: the CPU path")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per kernel")
    ap.add_argument("--kernels", default=None, help="comma-separated; default: the platform's")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    platform = jax.default_backend()
    model, max_len = (TINY, 256) if args.smoke else (ONE_B, 2048)
    steps = args.steps or (3 if args.smoke else 10)
    kernels = args.kernels.split(",") if args.kernels else KERNELS.get(platform, ("xla",))
    peak, peak_source = train.peak_flops("bfloat16")
    device = jax.devices()[0].device_kind
    print(f"{device} ({platform}), {model.n_params / 1e6:,.1f}M parameters, batch 32 LIMA-length "
          f"dialogues packed at {max_len}, peak {peak / 1e12:,.2f} TFLOP/s ({peak_source})",
          flush=True)
    batches = lima_like_batches(3, 32, max_len, model.vocab_size)
    results = []
    for kernel in kernels:
        try:
            attention.describe(kernel)
            r = measure(model, kernel, batches, steps, peak)
        except Exception as e:  # a kernel this jax/GPU cannot run: report it, measure the rest
            r = {"kernel": kernel, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        results.append(r)
        if "error" in r:
            print(f"  {kernel:<7} failed: {r['error']}", flush=True)
        else:
            print(f"  {kernel:<7} {r['rows']} x {r['seq_len']}: {r['step_s'] * 1e3:8.1f} ms/step,"
                  f" {r['tokens_per_s']:10,.0f} tokens/s ({r['real_tokens_per_s']:,.0f} real), "
                  f"MFU {r['mfu']:.1%}, first loss {r['loss']:.4f}, compile+warm-up "
                  f"{r['compile_and_warmup_s']:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "platform": platform,
                                              "date": time.strftime("%Y-%m-%d"),
                                              "params": model.n_params, "results": results},
                                             indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
