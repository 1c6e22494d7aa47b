"""Benchmark decoding: limajax's compiled, KV-cached sampler against transformers' `generate`
with the same weights (exported with `limajax export --to hf`), settings and token counts, in
one run on this machine's CPU (float32 both).

Cases: a random 60M-parameter LLaMA (dim 512, 8 layers, vocabulary 32,000), 32-token prompts,
128 new tokens (min = max, so both generate exactly as many), batch 1 and 16, greedy and LIMA
§4.1's sampling (temperature 0.7, top-p 0.9, repetition penalty 1.2); the real stories260K
(BOS + "Once upon a time", 255 new tokens, greedy, one stream); and `serve` under 16
concurrent clients (continuous batching, 16 slots) on the 60M model. New tokens per second,
median of --repeats runs after a warm-up (which compiles limajax's loop).

    python tools/bench_decode.py [--repeats 3] [--new 128] [--skip-server]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import jax

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
LIMA = dict(temperature=0.7, top_p=0.9, repetition_penalty=1.2)


def median_rate(run, tokens: int, repeats: int) -> float:
    """New tokens per second of `run()` (median of `repeats` after one warm-up)."""
    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return tokens / statistics.median(times)


def ours(model_dir, prompts, new, greedy, repeats) -> float:
    import numpy as np

    from limajax import sharding
    from limajax.checkpoint import load_for_inference
    from limajax.sampling import Request, Settings, generate

    mesh = sharding.single_device_mesh()
    model, _ = load_for_inference(model_dir, mesh)
    settings = Settings(greedy=True, max_new_tokens=new) if greedy else Settings(
        max_new_tokens=new, **LIMA)
    requests = [Request(list(p), settings, i) for i, p in enumerate(prompts)]
    no_stop = np.asarray([-1, -1], np.int32)  # exactly `new` tokens, as min = max for HF

    def run():
        done = [c for batch in generate(model, mesh, requests, len(requests), no_stop)
                for _, c in batch]
        assert all(len(c.tokens) == new for c in done)

    return median_rate(run, new * len(prompts), repeats)


def theirs(hf_dir, prompts, new, greedy, repeats) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts, dtype=torch.long)
    options = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=0, **LIMA)

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), min_new_tokens=new,
                                 max_new_tokens=new, pad_token_id=0, **options)
        assert out.shape[1] == ids.shape[1] + new

    return median_rate(run, new * len(prompts), repeats)


@contextlib.contextmanager
def serving(model_dir, clients):
    """limajax serve (16 slots of 256 tokens) on a free loopback port: (url, engine)."""
    from limajax import sharding
    from limajax.checkpoint import load_for_inference
    from limajax.sampling import Engine
    from limajax.serving import running

    mesh = sharding.single_device_mesh()
    model, tokenizer = load_for_inference(model_dir, mesh)
    engine = Engine(model, tokenizer, mesh, max_batch=clients, cache_length=256)
    try:
        with running(engine, "bench") as url:
            yield url, engine
    finally:
        engine.close()


def post(url, body):
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=600)


def served(url, prompts, new, clients) -> tuple[float, int]:
    """Completion tokens per second with `clients` concurrent requests (token-id prompts, the
    same as `sample`'s), after a warm-up round that compiles prefill and decode."""
    def ask(i):
        body = {"model": "bench", "prompt": prompts[i % len(prompts)], "max_tokens": new,
                "seed": i, **LIMA}
        with post(f"{url}/completions", body) as r:
            return json.loads(r.read())["usage"]["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(ask, range(clients)))
        t = time.perf_counter()
        tokens = sum(pool.map(ask, range(clients)))
        elapsed = time.perf_counter() - t
    return tokens / elapsed, tokens


def first_tokens(url, engine, prompts, rounds) -> tuple[list[float], float]:
    """Time to first token (client side: until the first streamed text) of len(prompts)
    requests sent at once, `rounds` times; and one prefill of that many rows (the target's
    reference), timed on the engine."""
    from limajax.sampling import Request, Settings

    def ask(p):
        t = time.perf_counter()
        body = {"model": "bench", "prompt": p, "max_tokens": 16, "stream": True, **LIMA}
        with post(f"{url}/completions", body) as r:
            for line in r:
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"]:
                    first = time.perf_counter() - t
                    break
            for _ in r:
                pass
        return first

    ttft = []
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        list(pool.map(ask, prompts))  # warm-up
        for _ in range(rounds):
            ttft += list(pool.map(ask, prompts))
    requests = [Request(list(p), Settings(**LIMA)) for p in prompts]
    engine.call(lambda: engine._prefill(requests)).result()  # compiled
    t = time.perf_counter()
    engine.call(lambda: jax.block_until_ready(engine._prefill(requests))).result()
    return ttft, time.perf_counter() - t


def lm_eval_rate(model, model_args, tasks: Path) -> tuple[float, int]:
    """lm-evaluation-harness loglikelihood requests per second on the task in `tasks`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    t = time.perf_counter()
    out = simple_evaluate(model=model, model_args=model_args, tasks=["bench_mc"],
                          task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    elapsed = time.perf_counter() - t
    n = sum(len(s["resps"]) for s in out["samples"]["bench_mc"])
    return n / elapsed, n


def mc_task(root: Path, docs: int, rng) -> Path:
    """A multiple-choice task of `docs` random-word prompts with 4 choices, in local files."""
    words = "the a cat dog ran sat big small red blue house tree sun moon girl boy".split()
    rows = [{"context": " ".join(rng.choice(words, 24)), "choices": [
        " " + " ".join(rng.choice(words, 4)) for _ in range(4)], "label": 0}
        for _ in range(docs)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ntest_split: train\ndataset_kwargs:\n  data_files:"
        f"\n    train: {root}/mc.jsonl\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--skip-generate", action="store_true",
                        help="only the serve cases (no sampler vs transformers table)")
    parser.add_argument("--ttft-rounds", type=int, default=5)
    parser.add_argument("--lm-eval-docs", type=int, default=32,
                        help="multiple-choice docs (x4 choices) for lm-eval; 0 skips it")
    args = parser.parse_args()

    import numpy as np
    import torch
    from flax import nnx

    from limajax import convert, sharding
    from limajax.checkpoint import save_model_dir
    from limajax.config import ModelConfig
    from limajax.tokenizer import Tokenizer, TokenSpec

    torch.set_num_threads(os.cpu_count())
    root = Path(tempfile.mkdtemp(prefix="bench_decode."))
    config = ModelConfig(dim=512, n_layers=8, n_heads=8, vocab_size=32000)
    model = sharding.init_model(config, sharding.single_device_mesh(), seed=0)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    del model
    save_model_dir(root / "m58", params, config, TokenSpec(1, 2, None, 32000, 32000),
                   FIXTURES / "llama_tokenizer" / "tokenizer.model", command="convert")
    convert.export("hf", root / "m58", root / "m58-hf")
    size = f"{config.n_params / 1e6:.0f}M"
    print(f"model: {config.n_params / 1e6:.1f}M parameters, float32; jax "
          f"{jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPU threads")

    rng = np.random.default_rng(0)
    rows = []
    for batch in () if args.skip_generate else (1, 16):
        prompts = rng.integers(3, 32000, (batch, args.prompt)).tolist()
        for greedy in (True, False):
            a = ours(root / "m58", prompts, args.new, greedy, args.repeats)
            b = theirs(root / "m58-hf", prompts, args.new, greedy, args.repeats)
            rows.append((f"{size}, batch {batch}, {'greedy' if greedy else 'LIMA sampling'}",
                         a, b))
            print(f"{rows[-1][0]}: limajax {a:.1f} tokens/s, transformers {b:.1f} "
                  f"({a / b:.2f}x)", flush=True)

    if not args.skip_generate:
        src = FIXTURES / "stories260K"
        convert.convert("meta", src / "meta_layout", root / "stories",
                        tokenizer=src / "tok512.model")
        convert.export("hf", root / "stories", root / "stories-hf")
        tok = Tokenizer.from_path(root / "stories")
        prompt = [[tok.bos_id] + tok.encode("Once upon a time")]
        a = ours(root / "stories", prompt, 255, True, args.repeats)
        b = theirs(root / "stories-hf", prompt, 255, True, args.repeats)
        rows.append(("stories260K, one stream, greedy, 255 tokens", a, b))
        print(f"{rows[-1][0]}: limajax {a:.1f} tokens/s, transformers {b:.1f} ({a / b:.2f}x)",
              flush=True)

    if not args.skip_server:
        prompts = rng.integers(3, 32000, (16, args.prompt)).tolist()
        sample_rate = ours(root / "m58", prompts, args.new, False, args.repeats)
        with serving(root / "m58", 16) as (url, engine):
            rate, tokens = served(url, prompts, args.new, 16)
            ttft, prefill16 = first_tokens(url, engine, prompts, args.ttft_rounds)
            p50, p99 = np.percentile(ttft, [50, 99])
            print(f"serve, {size}, 16 concurrent clients, LIMA sampling: {rate:.1f} tokens/s "
                  f"({tokens} tokens) = {rate / sample_rate:.0%} of sample's batch-16 "
                  f"{sample_rate:.1f} (target 95%)")
            print(f"time to first token, 16 requests at once ({len(ttft)}): p50 {p50:.3f} s, "
                  f"p99 {p99:.3f} s; one batch-16 prefill {prefill16:.3f} s: p99 = "
                  f"{p99 / prefill16:.1f}x (target 2x)", flush=True)
            if args.lm_eval_docs:
                tasks = mc_task(root, args.lm_eval_docs, rng)
                os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
                a, n = lm_eval_rate("local-completions", {
                    "base_url": f"{url}/completions", "model": "bench",
                    "tokenizer": str(root / "m58-hf"), "tokenizer_backend": "huggingface",
                    "add_bos_token": True, "batch_size": 16, "max_length": 256}, tasks)
        if args.lm_eval_docs:
            b, _ = lm_eval_rate("hf", {"pretrained": str(root / "m58-hf"), "dtype": "float32",
                                       "add_bos_token": True, "device": "cpu",
                                       "batch_size": 16}, tasks)
            print(f"lm-eval loglikelihood, {n} requests: serve {a:.1f}/s, lm_eval --model hf "
                  f"{b:.1f}/s ({a / b:.2f}x)")

    print("\n| case | limajax tokens/s | transformers tokens/s | ratio |\n|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
