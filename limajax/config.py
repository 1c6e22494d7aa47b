"""Configs as frozen dataclasses: the LLaMA architecture (ModelConfig + PRESETS).

Sizes come from Meta's params.json files (reference/lima-and-llama.md §5.1); derived values
(head_dim, the feed-forward size by Meta's `multiple_of` rule) are resolved in __post_init__
so a config read back from JSON equals the one that wrote it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from limajax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1's frequency-dependent rotary scaling (HF rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward size: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: multi-head attention (= n_heads)
    vocab_size: int = 32000  # ids the model knows, LIMA's EOT included when added
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_dim: int | None = None  # None: Meta's rule; set explicitly for HF's intermediate_size
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    vocab_multiple: int = 128  # pad the vocabulary so it shards evenly; padded logits are -inf
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
    remat: str = "full"  # what the backward pass recomputes per layer: none | full | dots

    def __post_init__(self):
        def bad(msg):
            raise UserError(f"model config: {msg}")

        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                bad(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.ffn_dim is None:
            ffn = meta_ffn_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
            object.__setattr__(self, "ffn_dim", ffn)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            bad(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads} "
                "(grouped-query attention shares each K/V head among whole groups of heads)")
        if self.head_dim % 2:
            bad(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.param_dtype not in DTYPES or self.dtype not in DTYPES:
            bad(f"dtypes must be one of {DTYPES}, got {self.param_dtype!r}/{self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            bad(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.vocab_multiple <= 0:
            bad(f"vocab_multiple must be positive, got {self.vocab_multiple}")

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_multiple * math.ceil(self.vocab_size / self.vocab_multiple)

    @property
    def n_params(self) -> int:
        """Parameters, the tied matrix counted once and vocabulary padding excluded."""
        d, h = self.dim, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * d * self.ffn_dim + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + embed + d

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"model config: unknown keys {unknown}")
        return cls(**d)


_LLAMA1 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-6, max_seq_len=2048)
_LLAMA2 = dict(vocab_size=32000, multiple_of=256, norm_eps=1e-5, max_seq_len=4096)
_LLAMA3 = dict(vocab_size=128256, multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5,
               rope_theta=500000.0, max_seq_len=8192)
_LLAMA31 = dict(_LLAMA3, rope_scaling=RopeScaling(), max_seq_len=131072)

# Meta's params.json values (reference/lima-and-llama.md §5.1). Vocab sizes are the base
# tokenizer's; conversion adds LIMA's EOT (LIMA §3) on top.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=64, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512,
                        multiple_of=32, norm_eps=1e-5, max_seq_len=2048),
    "llama1-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, **_LLAMA1),
    "llama1-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, **_LLAMA1),
    "llama1-33b": ModelConfig(dim=6656, n_layers=60, n_heads=52, **_LLAMA1),
    "llama1-65b": ModelConfig(dim=8192, n_layers=80, n_heads=64, **dict(_LLAMA1, norm_eps=1e-5)),
    "llama2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, **_LLAMA2),
    "llama2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, **_LLAMA2),
    "llama2-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              **dict(_LLAMA2, multiple_of=4096, ffn_dim_multiplier=1.3)),
    "llama3-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, **_LLAMA3),
    "llama3-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              **dict(_LLAMA3, multiple_of=4096)),
    "llama3.1-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, **_LLAMA31),
    "llama3.1-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                                **dict(_LLAMA31, multiple_of=4096)),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
