"""A tiny run for a laptop CPU: a 4-layer, dim-64 model on the embedded sample dialogues, on a
simulated 2x4 mesh, in a couple of minutes. The optimiser follows LIMA §3 in shape (AdamW, linear
decay, no warm-up) with a learning rate a random tiny model can learn from."""

from limajax.config import DataConfig, OptimConfig, TrainConfig, preset

config = TrainConfig(
    model=preset("tiny"),
    optim=OptimConfig(lr=3e-3, end_lr=3e-4),  # LIMA's 1e-5 is for a pretrained 65B model
    data=DataConfig(batch_size=8, max_len=256),
    epochs=3,
    dropout=0.1,  # LIMA §3 rises 0.0 -> 0.3 with depth; smaller models get less (0.2)
    mesh="2x4",
)
