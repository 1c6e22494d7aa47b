"""LIMA §3 on LLaMA-7B, as in the ablations of LIMA §5 ("we fine-tune LLaMa 7B ... with the
same hyperparameters"). Start from a converted model: `--init MODEL_DIR`."""

from limajax.config import DataConfig, OptimConfig, TrainConfig, preset

config = TrainConfig(
    model=preset("llama1-7b").replace(
        vocab_size=32001,  # LIMA §3: a new end-of-turn token (EOT) after LLaMA's 32,000
        dtype="bfloat16",  # compute in bfloat16, float32 master weights and moments
        remat="full",
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
        batch_size=64,  # LIMA §3: "batch size 32 examples (64 for smaller models)"
        # 8 micro batches of 8 (the same gradient): `limajax plan` shows 23.2 GiB per device
        # on 2x4 (a single batch of 64 needs 69 GiB; micro batches of 16, 30.3 GiB).
        micro_batch_size=8,
        max_len=2048,  # LIMA §3: "texts longer than 2048 tokens are trimmed"
    ),
    epochs=15,  # LIMA §3: "fine-tune ... for 15 epochs"
    dropout=0.2,  # LIMA §3: residual dropout 0.0 at the bottom to 0.3 at the top (0.2 smaller)
    mesh="2x4",
)
