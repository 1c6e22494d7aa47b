"""LIMA-65B (LIMA §3) on one node of 8x H200 (141 GB each): tensor parallel over all 8 GPUs
(`--mesh 1x8`), as `limajax plan --config configs/lima_65b_h200.py --target h200x8` plans it
with XLA's GPU compiler: 103.4 GiB per device of the 125.0 JAX may use (README "plan").

LIMA's update is kept: float32 master weights (an update of 1e-5 does not round away) and a
float32 gradient accumulator. What makes it fit one node: AdamW's moments stored in bfloat16
(computed in float32 each step; limajax/optim.py), remat full (chosen by the plan), with which
each micro batch's gradient is added into the accumulator layer by layer (one gradient tree,
not two: model.layers_adding_into), and micro batches of 4 examples (8 per step: the same
gradient, the loss is normalised over the whole batch; 1 plans at 94.5 GiB, 2 at 97.5).
Start from a converted model: `--init MODEL_DIR`.
"""

from limajax.config import DataConfig, OptimConfig, TrainConfig, preset

config = TrainConfig(
    model=preset("llama1-65b").replace(
        vocab_size=32001,  # LIMA §3: a new end-of-turn token (EOT) after LLaMA's 32,000
        dtype="bfloat16",  # compute in bfloat16, float32 master weights
        remat="auto",  # the cheapest policy that fits (limajax plan: full here)
    ),
    optim=OptimConfig(moments_dtype="bfloat16"),
    data=DataConfig(micro_batch_size=4),
    mesh="1x8",
)
