"""Benchmark one training step: limajax's jitted train_step against a PyTorch training step of
transformers' LlamaForCausalLM with the same model, batch, sequence length and optimiser, in
float32, on this machine's CPU; then limajax again with bfloat16 compute (float32 master
weights, float32 accumulation in every matmul) against the same float32 torch step. Prints
tokens/s (median of several steps after warm-up) and MFU against a measured matmul peak.

    python tools/bench_train.py [--dim 512 --layers 8 --heads 8 --vocab 32000 --seq 512
                                 --batch 4 --steps 5 --warmup 2 --remat none]
"""

from __future__ import annotations

import argparse
import statistics
import time


def bench_limajax(args, dtype: str = "float32") -> dict:
    import jax
    import numpy as np

    from limajax import sharding, train
    from limajax.config import DataConfig, ModelConfig, TrainConfig

    model = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                        vocab_size=args.vocab, ffn_dim=args.ffn, remat=args.remat, dtype=dtype)
    config = TrainConfig(model=model, data=DataConfig(batch_size=args.batch, max_len=args.seq),
                         dropout=0.0, epochs=1)
    mesh = sharding.single_device_mesh()
    setup = train.build(config, mesh, steps_per_epoch=args.steps + args.warmup)
    state = train.init_state(setup)
    step = train.make_train_step(setup)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq + 1), dtype=np.int32)
    batch = train.put_batch({
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "loss_mask": np.ones((args.batch, args.seq), np.float32),
        "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32),
                                     (args.batch, args.seq)).copy(),
        "segment_ids": np.ones((args.batch, args.seq), np.int32)}, setup)
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        with sharding.activate(mesh):
            state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "loss": float(m["loss"]),
            "flops_per_token": model.flops_per_token(args.seq), "n_params": model.n_params}


def bench_torch(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.dim, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      vocab_size=args.vocab, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg).float().train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-5, betas=(0.9, 0.95))
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab),
                                                 labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "loss": float(loss.detach()),
            "threads": torch.get_num_threads()}


def torch_matmul_peak(n: int = 4096, repeats: int = 3) -> float:
    import torch

    x = torch.ones(n, n)
    torch.matmul(x, x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(x, x)
        times.append(time.perf_counter() - t)
    torch_matmul_peak.value = 2 * n**3 / statistics.median(times)
    return torch_matmul_peak.value


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1376)  # Meta's rule for dim 512, multiple_of 32
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    args = p.parse_args()

    from limajax import train

    jax_peak = max(train.measure_matmul_peak("float32", 2048), train.measure_matmul_peak(
        "float32", 4096, repeats=3))
    peak = max(jax_peak, torch_matmul_peak())  # the machine's best float32 matmul rate
    jx = bench_limajax(args)
    bf = bench_limajax(args, "bfloat16")
    bf_peak = train.measure_matmul_peak("bfloat16", 4096, repeats=3)
    th = bench_torch(args)
    tokens = args.batch * args.seq
    jx_tps, th_tps = tokens / jx["median_s"], tokens / th["median_s"]
    mfu = jx["flops_per_token"] * jx_tps / peak
    th_mfu = jx["flops_per_token"] * th_tps / peak
    print(f"model: dim {args.dim}, {args.layers} layers, {args.heads} heads, ffn {args.ffn}, "
          f"vocab {args.vocab} ({jx['n_params'] / 1e6:.1f}M parameters); batch {args.batch} x "
          f"{args.seq} tokens; float32; AdamW + clipping; median of {args.steps} steps after "
          f"{args.warmup} warm-up; limajax remat {args.remat}; torch threads {th['threads']}")
    print(f"measured float32 matmul peak: {peak / 1e9:.0f} GFLOP/s (JAX {jax_peak / 1e9:.0f}, "
          f"torch {torch_matmul_peak.value / 1e9:.0f}); "
          f"{jx['flops_per_token'] / 1e6:.0f} MFLOP per token (6N + attention)")
    print()
    print("| step | s/step | tokens/s | MFU | first loss check |")
    print("|---|---|---|---|---|")
    print(f"| limajax (jax.jit) | {jx['median_s']:.3f} | {jx_tps:,.0f} | {mfu:.0%} | "
          f"{jx['loss']:.3f} |")
    bf_tps = tokens / bf["median_s"]
    bf_mfu = bf["flops_per_token"] * bf_tps / bf_peak
    print(f"| limajax, bfloat16 compute (MFU of the bf16 matmul peak {bf_peak / 1e9:.0f} GFLOP/s)"
          f" | {bf['median_s']:.3f} | {bf_tps:,.0f} | {bf_mfu:.0%} | {bf['loss']:.3f} |")
    print(f"| transformers LlamaForCausalLM (torch eager) | {th['median_s']:.3f} | "
          f"{th_tps:,.0f} | {th_mfu:.0%} | {th['loss']:.3f} |")
    print(f"\nspeed-up over torch float32: {jx_tps / th_tps:.2f}x (float32), "
          f"{bf_tps / th_tps:.2f}x (bfloat16 compute)")


if __name__ == "__main__":
    main()
