"""Time the first 64 real LIMA dialogues (two steps at LIMA's batch 32, max length 2048, the
LLaMA tokenizer): limajax with packing against transformers + torch padding each batch to its
longest row (what TRL's SFT trainer does by default), the same model from the same initial
weights (limajax's, written as a transformers checkpoint by convert.hf.write_hf), the same
AdamW (LIMA §3, clipping 1.0) and the same loss (mean over the global batch's target tokens);
both sides accumulate over micro batches of 8 dialogues (TRL's default per-device batch), which
keeps the float32 logits of a 32,000-token vocabulary within this machine's memory.

    python tools/bench_epoch.py --data ../shared/fixtures/lima/train.jsonl \\
        --tokenizer ../shared/fixtures/llama_tokenizer/tokenizer.model
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def limajax_run(args, records, tokenizer, model_config, export_dir):
    import jax
    import numpy as np

    from limajax import data, sharding, train
    from limajax.config import DataConfig, TrainConfig, buckets_for
    from limajax.convert.hf import write_hf

    config = TrainConfig(model=model_config, epochs=1, dropout=0.0, mesh="1x1",
                         data=DataConfig(batch_size=32, micro_batch_size=8, max_len=2048))
    batches = data.Batches(records, tokenizer, batch_size=32, num_epochs=1, pack=True,
                           buckets=buckets_for(2048), row_multiple=4, process_index=0,
                           process_count=1, read_options=None)
    host_batches = list(batches)
    order = batches.order(0)
    mesh = sharding.single_device_mesh()
    setup = train.build(config, mesh, steps_per_epoch=len(host_batches))
    state = train.init_state(setup)
    params = jax.device_get(state.params)
    write_hf(export_dir, params, model_config, tokenizer.spec)
    step = train.make_train_step(setup)
    passes = []
    for _ in range(2):  # cold (compiling each shape), then warm
        s = train.init_state(setup, jax.tree.map(np.copy, params))
        t0 = time.perf_counter()
        losses = []
        with sharding.activate(mesh):
            for b in host_batches:
                s, m = step(s, train.put_batch(b, setup))
                losses.append(m["loss"])
            losses = [float(x) for x in jax.device_get(losses)]
        passes.append(time.perf_counter() - t0)
    shapes = [b["inputs"].shape for b in host_batches]
    return {"cold_s": passes[0], "warm_s": passes[1], "losses": losses, "shapes": shapes,
            "order": order, "tokens": sum(r * t for r, t in shapes)}


def torch_run(args, records, tokenizer, order, export_dir):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(export_dir, torch_dtype=torch.float32).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-5, betas=(0.9, 0.95), eps=1e-8)
    encoded = [tokenizer.encode_dialogue(records[i]["conversations"], max_len=2048)
               for i in order]
    losses, tokens = [], 0
    t0 = time.perf_counter()
    for start in range(0, len(encoded), 32):
        batch = encoded[start:start + 32]
        n_targets = sum(float(e.loss_mask[1:].sum()) for e in batch)
        total = 0.0
        for m in range(0, len(batch), 8):  # micro batches of 8, each padded to its longest
            micro = batch[m:m + 8]
            t = max(len(e.ids) for e in micro) - 1
            tokens += len(micro) * t
            inputs = torch.zeros((len(micro), t), dtype=torch.long)
            labels = torch.full((len(micro), t), -100, dtype=torch.long)
            attention_mask = torch.zeros((len(micro), t), dtype=torch.long)
            for i, e in enumerate(micro):
                n = len(e.ids) - 1
                inputs[i, :n] = torch.as_tensor(e.ids[:-1])
                attention_mask[i, :n] = 1
                targets = torch.as_tensor(e.ids[1:].astype("int64"))
                labels[i, :n] = torch.where(torch.as_tensor(e.loss_mask[1:] > 0), targets, -100)
            logits = model(input_ids=inputs, attention_mask=attention_mask).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     labels.reshape(-1), reduction="sum")
            (loss / n_targets).backward()
            total += float(loss.detach())
            del logits, loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / n_targets)
    return {"s": time.perf_counter() - t0, "losses": losses, "tokens": tokens,
            "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="GAIR's train.jsonl")
    p.add_argument("--tokenizer", required=True, help="LLaMA's tokenizer.model")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dialogues", type=int, default=64)
    args = p.parse_args()

    from limajax import data
    from limajax.config import ModelConfig
    from limajax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(args.tokenizer)
    rows, _ = data.read_gair_file(Path(args.data), "train")
    records = [{"conversations": list(r.conversations)} for r in rows[:args.dialogues]]
    model = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                        vocab_size=tokenizer.vocab_size, remat="full")
    with tempfile.TemporaryDirectory() as export_dir:
        jx = limajax_run(args, records, tokenizer, model, export_dir)
        th = torch_run(args, records, tokenizer, jx["order"], export_dir)
    print(f"{args.dialogues} LIMA dialogues, batch 32 (micro batches of 8), max length 2048; "
          f"model dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab "
          f"{model.vocab_size} ({model.n_params / 1e6:.1f}M parameters), float32; torch "
          f"threads {th['threads']}")
    print(f"limajax packed rows x length per step: {jx['shapes']}")
    print()
    print("| run | tokens computed | seconds | first-step loss | second-step loss |")
    print("|---|---|---|---|---|")
    print(f"| limajax, packed (first pass, compiling) | {jx['tokens']:,} | {jx['cold_s']:.1f} | "
          f"{jx['losses'][0]:.5f} | {jx['losses'][1]:.5f} |")
    print(f"| limajax, packed (compiled) | {jx['tokens']:,} | {jx['warm_s']:.1f} | "
          f"{jx['losses'][0]:.5f} | {jx['losses'][1]:.5f} |")
    print(f"| transformers + torch, padded to the longest row | {th['tokens']:,} | "
          f"{th['s']:.1f} | {th['losses'][0]:.5f} | {th['losses'][1]:.5f} |")
    print(f"\nspeed-up: {th['s'] / jx['warm_s']:.2f}x compiled, {th['s'] / jx['cold_s']:.2f}x "
          f"including compilation; first-step losses differ by "
          f"{abs(jx['losses'][0] - th['losses'][0]):.2e}")


if __name__ == "__main__":
    main()
