"""LIMA-65B (LIMA §3) on one node of 8x H200 (141 GB each): tensor parallel over all 8 GPUs
(`--mesh 1x8`), as `limajax plan --config configs/lima_65b_h200.py --target h200x8` plans it
with XLA's GPU compiler: 124.6 GiB per device of the 125.0 JAX may use (README "plan").

LIMA's update is kept: float32 master weights (an update of 1e-5 does not round away) and a
float32 gradient accumulator. What makes it fit one node: AdamW's moments stored in bfloat16
(computed in float32 each step; limajax/optim.py), micro batches of one example (32 per step:
the same gradient, the loss is normalised over the whole batch), and the remat policy the plan
chooses. Start from a converted model: `--init MODEL_DIR`.
"""

from limajax.config import DataConfig, OptimConfig, TrainConfig, preset

config = TrainConfig(
    model=preset("llama1-65b").replace(
        vocab_size=32001,  # LIMA §3: a new end-of-turn token (EOT) after LLaMA's 32,000
        dtype="bfloat16",  # compute in bfloat16, float32 master weights
        remat="auto",  # the cheapest policy that fits (limajax plan: full here)
    ),
    optim=OptimConfig(moments_dtype="bfloat16"),
    data=DataConfig(micro_batch_size=1),
    mesh="1x8",
)
