"""LIMA itself (LIMA §3): LLaMA-65B fine-tuned on the 1,000 curated examples, on an 8x8 mesh
(64 devices: fully sharded data parallel over `data`, tensor parallel over `model`).
Start from a converted model: `--init MODEL_DIR`. `limajax plan` checks the memory first.

LIMA §3's hyper-parameters are limajax's defaults (limajax/config.py): AdamW 0.9/0.95, weight
decay 0.1, lr 1e-5 decaying linearly to 1e-6 with no warm-up, batch 32, texts trimmed at 2048
tokens, 15 epochs, residual dropout rising to 0.3. This file states only what the 65B run adds.
LIMA §6's multi-turn model is this recipe unchanged on the 1,030 dialogues (GAIR's train.jsonl
with its 30 multi-turn chains): only --data differs.
"""

from limajax.config import DataConfig, TrainConfig, preset

config = TrainConfig(
    model=preset("llama1-65b").replace(
        vocab_size=32001,  # LIMA §3: a new end-of-turn token (EOT) after LLaMA's 32,000
        dtype="bfloat16",  # compute in bfloat16, float32 master weights and moments
        remat="auto",  # the cheapest policy that fits (limajax plan: full on 8x8 at 32 GiB)
    ),
    # Accumulate over 4 micro batches of 8 (one row per device on the 8-way data axis): the
    # same gradient (the loss is normalised over the whole batch); `limajax plan` shows that a
    # single batch of 32 does not fit 32 GiB per device and micro batches of 8 do.
    data=DataConfig(micro_batch_size=8),
    mesh="8x8",
)
