"""A tiny run for a laptop CPU: the embedded sample dialogues on a simulated 2x4 mesh, in a
couple of minutes. The model has the shape of llama2.c's stories260K (dim 64, 5 layers, 8 heads,
4 K/V heads), so it starts either at random (with the sample data's own tokenizer, or
`--tokenizer .../tok512.model`) or from that model converted (`--init MODEL_DIR`). The
optimiser follows LIMA §3 in form (AdamW 0.9/0.95, weight decay 0.1, linear decay, no warm-up)
at a rate a tiny model learns from."""

from limajax.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

config = TrainConfig(
    model=ModelConfig(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, multiple_of=4,
                      tie_embeddings=True,  # as stories260K: output = tok_embeddings
                      vocab_size=513),  # 512 pieces + LIMA's EOT (LIMA §3)
    optim=OptimConfig(lr=3e-3, end_lr=3e-4),  # LIMA §3's 1e-5 -> 1e-6 is for a pretrained 65B
    data=DataConfig(batch_size=8, max_len=512),  # LIMA §3 trims at 2048; the demo at 512
    epochs=5,  # LIMA §3: 15
    dropout=0.1,  # LIMA §3: 0.0 at the first layer rising to 0.3 (0.2 for smaller models)
    mesh="2x4",
)
