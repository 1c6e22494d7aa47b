"""LIMA's Alpaca-65B baseline (LIMA §4.1: "we finetune LLaMa 65B on the 52,000 examples in the
Alpaca training set"), with Stanford Alpaca's recipe carried over from 7B (configs/alpaca_7b.py
cites it).

Not stated anywhere for 65B: LIMA gives no hyper-parameters for its Alpaca-65B, and Stanford
published recipes for 7B (and 13B) only. Chosen here: everything of the 7B recipe (3 epochs,
batch 128, length 512, 3% warm-up, cosine decay to 0, no weight decay, AdamW 0.9 / 0.999,
clipping at 1.0, no dropout) except the learning rate, 1e-5 instead of 2e-5: a larger model
takes a smaller rate, and 1e-5 is the peak LIMA §3 itself uses on LLaMA-65B, so the two 65B
models differ in their data and the schedule's shape, not the size of their steps. Change it
with `--set optim.lr=2e-5` to keep Stanford's 7B rate.

    limajax data prepare --input alpaca_data.json --output data/alpaca
    limajax train --config configs/alpaca_65b.py --init models/llama1-65b --data data/alpaca \
        --workdir runs/alpaca-65b
"""

import dataclasses
import runpy
from pathlib import Path

from limajax.config import DataConfig, preset

alpaca_7b = runpy.run_path(str(Path(__file__).with_name("alpaca_7b.py")))["config"]

config = dataclasses.replace(
    alpaca_7b,
    model=preset("llama1-65b").replace(vocab_size=32001, dtype="bfloat16", remat="full"),
    optim=dataclasses.replace(alpaca_7b.optim, lr=1e-5),  # see above: not stated for 65B
    # 32 rows of 512 tokens per micro batch: the tokens of lima_65b's 8 rows of 2048 (the
    # 8-way data axis gives each device 4 rows), on its 8x8 mesh.
    data=DataConfig(batch_size=128, micro_batch_size=32, max_len=512),
    mesh="8x8",
)
