"""LIMA itself (LIMA §3): LLaMA-65B fine-tuned on the 1,000 curated examples, on an 8x8 mesh
(64 devices: fully sharded data parallel over `data`, tensor parallel over `model`).
Start from a converted model: `--init MODEL_DIR`. `limajax plan` checks the memory first."""

from limajax.config import DataConfig, OptimConfig, TrainConfig, preset

config = TrainConfig(
    model=preset("llama1-65b").replace(
        vocab_size=32001,  # LIMA §3: a new end-of-turn token (EOT) after LLaMA's 32,000
        dtype="bfloat16",  # compute in bfloat16, float32 master weights and moments
        remat="full",  # recompute each layer in the backward pass: activations fit
    ),
    optim=OptimConfig(
        lr=1e-5,  # LIMA §3: "learning rate of 1e-5 ... linearly decaying to 1e-6"
        end_lr=1e-6,
        b1=0.9,  # LIMA §3: AdamW beta1 = 0.9, beta2 = 0.95
        b2=0.95,
        weight_decay=0.1,  # LIMA §3
        warmup_steps=0,  # LIMA §3: "without warmup steps"
    ),
    data=DataConfig(
        batch_size=32,  # LIMA §3: "batch size of 32 examples"
        # Accumulate over 4 micro batches of 8 (one row per device on the 8-way data axis):
        # the same gradient (the loss is normalised over the whole batch), and `limajax plan`
        # shows it fits 32 GiB per device (27 GiB; a single batch of 32 needs 46 GiB).
        micro_batch_size=8,
        max_len=2048,  # LIMA §3: "texts longer than 2048 tokens are trimmed"
    ),
    epochs=15,  # LIMA §3: "fine-tune ... for 15 epochs"
    dropout=0.3,  # LIMA §3: residual dropout rising from 0.0 at the bottom layer to 0.3 at the top
    mesh="8x8",
)
