"""LIMA §3 on LLaMA-7B, as in the ablations of LIMA §5 ("we fine-tune LLaMa 7B ... with the
same hyperparameters"). Start from a converted model: `--init MODEL_DIR`. The shared LIMA §3
settings are limajax's defaults (limajax/config.py); this file states what differs for 7B."""

from limajax.config import DataConfig, TrainConfig, preset

config = TrainConfig(
    model=preset("llama1-7b").replace(
        vocab_size=32001,  # LIMA §3: a new end-of-turn token (EOT) after LLaMA's 32,000
        dtype="bfloat16",  # compute in bfloat16, float32 master weights and moments
        remat="auto",  # the cheapest policy that fits (limajax plan chooses)
    ),
    # LIMA §3: "batch size 32 examples (64 for smaller models)"; 8 micro batches of 8 give the
    # same gradient and fit a 2x4 mesh of 32 GiB devices (`limajax plan`).
    data=DataConfig(batch_size=64, micro_batch_size=8),
    dropout=0.2,  # LIMA §3: residual dropout rising to 0.3 at the top (0.2 for smaller models)
    mesh="2x4",
)
