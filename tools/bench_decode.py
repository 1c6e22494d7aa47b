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
import json
import os
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

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


def served(model_dir, prompt_ids, new, clients) -> tuple[float, int]:
    """Completion tokens per second with `clients` concurrent streams against `serve`."""
    import uvicorn

    from limajax import sharding
    from limajax.checkpoint import load_for_inference
    from limajax.sampling import Engine
    from limajax.serving import make_app

    mesh = sharding.single_device_mesh()
    model, tokenizer = load_for_inference(model_dir, mesh)
    engine = Engine(model, tokenizer, mesh, max_batch=clients, cache_length=256)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(engine, "bench"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.05)

    def ask(i):
        body = {"prompt": tokenizer.decode(prompt_ids[i % len(prompt_ids)]), "max_tokens": new,
                "seed": i, **LIMA}
        request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as r:
            return json.loads(r.read())["usage"]["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(ask, range(clients)))  # warm-up: compiles prefill and decode
        t = time.perf_counter()
        tokens = sum(pool.map(ask, range(clients)))
        elapsed = time.perf_counter() - t
    server.should_exit = True
    engine.close()
    return tokens / elapsed, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--skip-server", action="store_true")
    args = parser.parse_args()

    import jax
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
    for batch in (1, 16):
        prompts = rng.integers(3, 32000, (batch, args.prompt)).tolist()
        for greedy in (True, False):
            a = ours(root / "m58", prompts, args.new, greedy, args.repeats)
            b = theirs(root / "m58-hf", prompts, args.new, greedy, args.repeats)
            rows.append((f"{size}, batch {batch}, {'greedy' if greedy else 'LIMA sampling'}",
                         a, b))
            print(f"{rows[-1][0]}: limajax {a:.1f} tokens/s, transformers {b:.1f} "
                  f"({a / b:.2f}x)", flush=True)

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
        rate, tokens = served(root / "m58", prompts, args.new, 16)
        print(f"serve, {size}, 16 concurrent clients, LIMA sampling: {rate:.1f} tokens/s "
              f"({tokens} tokens)")

    print("\n| case | limajax tokens/s | transformers tokens/s | ratio |\n|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
