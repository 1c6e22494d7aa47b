"""The Alpaca baseline on LLaMA-7B: Stanford Alpaca's published recipe on its 52,002 rows.

Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, README "Fine-tuning" and its train.py
command): batch size 128, learning rate 2e-5, 3 epochs, max length 512, weight decay 0, with
`--warmup_ratio 0.03 --lr_scheduler_type cosine` through transformers' Trainer, whose defaults
give the rest: AdamW betas 0.9 / 0.999, eps 1e-8, gradient clipping at norm 1.0, the rate
decaying to 0, no dropout (LLaMA has none), loss on the response only (the prompt's labels are
IGNORE_INDEX), examples longer than 512 tokens trimmed.

    limajax data prepare --input alpaca_data.json --output data/alpaca [--template alpaca]
    limajax train --config configs/alpaca_7b.py --init MODEL_DIR --data data/alpaca \
        --workdir runs/alpaca-7b

Which format: `data prepare` writes LIMA's dialogue format by default (user turn, EOT, answer,
EOT), the fair comparison with LIMA (README, "Reproduce LIMA's Figures 1 and 2"); `--template
alpaca` wraps each instruction in Stanford's prompt instead, as Stanford's own model was trained
(then sample it with `sample --template alpaca`).

What differs from Stanford's run, and why: the answer ends in LIMA's EOT, not EOS (the same
sampler and stop rule for every model), and the loss is normalised over the whole batch's
response tokens (Stanford's Trainer averages per micro batch of 4 padded rows); rows are
packed (the same loss as one per row, see DataConfig.pack).
"""

from limajax.config import DataConfig, OptimConfig, TrainConfig, preset

config = TrainConfig(
    model=preset("llama1-7b").replace(
        vocab_size=32001,  # LIMA §3's EOT after LLaMA's 32,000 (every limajax dialogue ends so)
        dtype="bfloat16",  # Stanford: --bf16 True; float32 master weights and moments
        remat="full",
    ),
    optim=OptimConfig(
        lr=2e-5, end_lr=0.0,  # Stanford: 2e-5, transformers' cosine decays to 0
        schedule="cosine", warmup_ratio=0.03,  # --lr_scheduler_type cosine --warmup_ratio 0.03
        b1=0.9, b2=0.999, eps=1e-8,  # transformers' AdamW defaults (Stanford sets none)
        weight_decay=0.0,  # Stanford: --weight_decay 0.
        clip_norm=1.0,  # transformers' max_grad_norm default
    ),
    # Stanford: 128 (4 GPUs x 4 rows x 8 accumulation steps), max length 512. Micro batches of
    # 32 rows of 512 tokens hold what lima_7b's 8 of 2048 do on the same 2x4 mesh.
    data=DataConfig(batch_size=128, micro_batch_size=32, max_len=512),
    epochs=3,  # Stanford: 3
    dropout=0.0,  # transformers' LLaMA has no dropout
    mesh="2x4",
)
