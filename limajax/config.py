"""Configs as frozen dataclasses: the LLaMA architecture (ModelConfig + PRESETS).

Sizes come from Meta's params.json files (reference/lima-and-llama.md §5.1); derived values
(n_kv_heads, head_dim, the feed-forward size by Meta's `multiple_of` rule) are resolved in
__post_init__ so a config read back from JSON equals the one that wrote it. A config remembers
which of them it derived, and `replace` derives those again from the new sizes: widening `dim`
widens the heads and the feed-forward, and more heads on full attention stay full attention.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import runpy
import traceback
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from limajax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
VOCAB_MULTIPLE = 128  # padded vocabulary divides by any model-axis size up to 128
REMAT_POLICIES = ("none", "full", "dots", "auto")  # auto: limajax plan chooses
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "pallas", "splash")  # limajax/attention.py
DERIVED = ("n_kv_heads", "head_dim", "ffn_dim")  # ModelConfig sizes that None derives


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1's frequency-dependent rotary scaling (HF rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def pad_vocab(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The smallest multiple of `multiple` that holds `size` ids: the embedding's row count (the
    one rule for the padded vocabulary, review R2)."""
    return -(-size // multiple) * multiple


MAX_LEN = 2048  # LIMA §3: "texts longer than 2048 tokens are trimmed"
BUCKETS = (256, 512, 1024, 2048)


def buckets_for(max_len: int) -> tuple[int, ...]:
    """The lengths sequences of at most `max_len` tokens are padded to: 256, doubling below
    max_len, then max_len itself. One rule for training, perplexity and sampling: a handful of
    shapes compile, and a short text is never padded past twice its bucket."""
    out = [BUCKETS[0]]
    while out[-1] < max_len:
        out.append(out[-1] * 2)
    return (*[b for b in out if b < max_len], max_len)


def bucket_length(length: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket that holds `length` tokens: a handful of shapes to compile."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"{length} tokens do not fit the largest bucket {max(buckets)}")


def check_types(obj, where: str) -> None:
    """Each field of a config dataclass holds its declared type (an int is a float too), so a
    recipe's `lr="3e-3"` is named here rather than failing deep inside a comparison."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value, hint = getattr(obj, field.name), hints[field.name]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if hint is Any or (value is None and type(None) in allowed):
            continue
        if not any(_is_a(value, t) for t in allowed if t is not type(None)):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise UserError(f"{where}: {field.name} must be {names}, got {value!r}")


def _is_a(value, t) -> bool:
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


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
    vocab_multiple: int = VOCAB_MULTIPLE  # so the vocabulary shards evenly; padded logits -inf
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators)
    remat: str = "full"  # what the backward pass recomputes per layer: none | full | dots | auto
    attention: str = "auto"  # the attention kernel (limajax/attention.py); auto: by platform

    def __post_init__(self):
        def bad(msg):
            raise UserError(f"model config: {msg}")

        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        check_types(self, "model config")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        # Not a field: equality, hashing and JSON see the resolved sizes only.
        object.__setattr__(self, "_derived", frozenset(
            name for name in DERIVED if getattr(self, name) is None))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                bad(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.ffn_dim is None:
            ffn = meta_ffn_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
            object.__setattr__(self, "ffn_dim", ffn)
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            bad(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads} "
                "(grouped-query attention shares each K/V head among whole groups of heads)")
        if self.head_dim % 2:
            bad(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.param_dtype not in DTYPES or self.dtype not in DTYPES:
            bad(f"dtypes must be one of {DTYPES}, got {self.param_dtype!r}/{self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            bad(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION_KERNELS:
            bad(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.vocab_multiple <= 0:
            bad(f"vocab_multiple must be positive, got {self.vocab_multiple}")

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab(self.vocab_size, self.vocab_multiple)

    @property
    def n_params(self) -> int:
        """Parameters, the tied matrix counted once and vocabulary padding excluded."""
        d, h = self.dim, self.head_dim
        attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * d * self.ffn_dim + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * layer + embed + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM, Chowdhery et al. 2022, App. B): 6 x the parameters
        that multiply (all but the embedding lookup) + 12 x layers x dim x sequence for
        attention."""
        matmul_params = self.n_params - (0 if self.tie_embeddings else self.vocab_size * self.dim)
        return 6.0 * matmul_params + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    def replace(self, **changes) -> ModelConfig:
        """A copy with `changes`; the sizes this config derived are derived again (R1)."""
        rederive = {name: None for name in self._derived if name not in changes}
        return dataclasses.replace(self, **rederive, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, d, "model config")


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


# --- run configs: what `limajax train` does with a model (LIMA §3 defaults) -------------------


SCHEDULES = ("linear", "cosine")  # LIMA §3's; Stanford Alpaca's


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with LIMA's schedule (LIMA §3), or Stanford Alpaca's (configs/alpaca_*.py)."""

    lr: float = 1e-5  # LIMA §3: "learning rate of 1e-5 ... linearly decaying to 1e-6"
    end_lr: float = 1e-6
    b1: float = 0.9  # LIMA §3: AdamW beta1 0.9, beta2 0.95
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # LIMA §3; applied to matrices only
    clip_norm: float | None = 1.0  # global-norm clipping; None turns it off
    # "linear" (LIMA §3: lr to end_lr, both ends included) or "cosine" (Stanford Alpaca's
    # recipe: transformers' cosine schedule with warm-up, lr to end_lr at step total_steps)
    schedule: str = "linear"
    warmup_steps: int = 0  # LIMA §3: no warm-up
    # Or the warm-up as a share of all steps, rounded up (transformers' warmup_ratio; Alpaca
    # 0.03): a recipe need not know the dataset's size.
    warmup_ratio: float = 0.0
    moments_dtype: str = "float32"  # AdamW's mu and nu between steps; bfloat16 halves them
    # AdamW's moments in host memory (memory_kind pinned_host) between steps, brought to the
    # devices for the update only (MaxText's optimizer_memory_host_offload)
    host_offload: bool = False

    def __post_init__(self):
        check_types(self, "optim")
        if self.lr <= 0 or self.end_lr < 0:
            raise UserError(f"optim: lr must be > 0 and end_lr >= 0, got {self.lr}, {self.end_lr}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise UserError(f"optim: clip_norm must be positive or None, got {self.clip_norm}")
        if self.moments_dtype not in ("float32", "bfloat16"):
            raise UserError(f"optim: moments_dtype must be float32 or bfloat16, got "
                            f"{self.moments_dtype!r}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"optim: schedule must be one of {', '.join(SCHEDULES)}, got "
                            f"{self.schedule!r}")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"optim: warmup_steps must be >= 0 and warmup_ratio in [0, 1), got "
                            f"{self.warmup_steps}, {self.warmup_ratio}")
        if self.warmup_steps and self.warmup_ratio:
            raise UserError("optim: give warmup_steps or warmup_ratio, not both")


@dataclass(frozen=True)
class DataConfig:
    """Which dialogues, how they are batched (LIMA §3: batch 32, 64 for smaller models)."""

    path: str | None = None  # prepared dataset directory; None: the embedded sample data
    batch_size: int = 32  # global batch, in examples
    micro_batch_size: int | None = None  # gradient accumulation when set (must divide batch)
    max_len: int = MAX_LEN
    train_on_prompt: bool = False  # loss on user turns too (LIMA does not say; default: off)
    # Lay each step's dialogues into as few rows as hold them (segment ids keep them apart):
    # the same loss and gradient as one dialogue per row, without computing the padding.
    pack: bool = True
    seed: int = 0  # shuffling

    def __post_init__(self):
        check_types(self, "data")
        if self.batch_size <= 0:
            raise UserError(f"data: batch_size must be positive, got {self.batch_size}")
        if self.micro_batch_size is not None and (
                self.micro_batch_size <= 0 or self.batch_size % self.micro_batch_size):
            raise UserError(f"data: micro_batch_size {self.micro_batch_size} must divide "
                            f"batch_size {self.batch_size}")

    @property
    def accumulation_steps(self) -> int:
        return 1 if self.micro_batch_size is None else self.batch_size // self.micro_batch_size


@dataclass(frozen=True)
class TrainConfig:
    """A whole fine-tuning run: model, optimiser, data and the loop's settings."""

    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    epochs: int = 15  # LIMA §3
    dropout: float = 0.3  # LIMA §3: top residual dropout rate (0.0 at the first layer)
    seed: int = 0  # initialisation (without --init) and dropout
    mesh: str = "1x1"
    init: str | None = None  # model directory to start from (convert's output); None: random
    tokenizer: str | None = None  # tokenizer file for a random model (--init brings its own)
    save_every_steps: int | None = None  # extra checkpoints inside an epoch
    max_to_keep: int | None = None  # None: keep every checkpoint (LIMA picks among epochs 5-10)
    log_every_steps: int = 1

    def __post_init__(self):
        if isinstance(self.model, str):
            object.__setattr__(self, "model", preset(self.model))
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        for name, cls in (("optim", OptimConfig), ("data", DataConfig)):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, _from_dict(cls, getattr(self, name), name))
        check_types(self, "train config")
        if self.epochs <= 0:
            raise UserError(f"epochs must be positive, got {self.epochs}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.save_every_steps is not None and self.save_every_steps <= 0:
            raise UserError(f"save_every_steps must be positive, got {self.save_every_steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d, "train config")


def _from_dict(cls, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown}")
    return cls(**d)


def _parse_value(text: str, current: Any, key: str) -> Any:
    """'2e-5' -> 2e-5 etc., checked against the type of the value it replaces."""

    if isinstance(current, str):
        return text
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool) or text.lower() in ("true", "false"):
        if text.lower() not in ("true", "false"):
            raise UserError(f"--set {key}={text}: expected true or false")
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is not None:
            raise UserError(f"--set {key}={text}: expected a {type(current).__name__}") from None
        return text  # a string-valued field that is None by default (e.g. data.path)
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if current is not None and not isinstance(value, type(current)):
        raise UserError(f"--set {key}={text}: expected a {type(current).__name__}")
    return value


def apply_overrides(config, overrides: list[str] | tuple[str, ...]):
    """Apply `--set section.key=value` overrides through dataclasses.replace."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. optim.lr=2e-5")
        key, text = item.split("=", 1)
        config = _replace_path(config, key.strip().split("."), text.strip(), key.strip())
    return config


def _replace_path(obj, path: list[str], text: str, key: str):
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise UserError(f"--set {key}: unknown key {path[0]!r} in {type(obj).__name__} "
                        f"(known: {', '.join(sorted(names))})")
    current = getattr(obj, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise UserError(f"--set {key}: {path[0]!r} has no sub-keys")
        value = _replace_path(current, path[1:], text, key)
    else:
        if dataclasses.is_dataclass(current):
            raise UserError(f"--set {key}: {path[0]!r} is a section; set one of its keys")
        value = _parse_value(text, current, key)
    try:
        if isinstance(obj, ModelConfig):
            return obj.replace(**{path[0]: value})
        return dataclasses.replace(obj, **{path[0]: value})
    except UserError as e:
        raise UserError(f"--set {key}={text}: {e}") from None


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = (), **fields) -> TrainConfig:
    """Run a recipe file from configs/ and return its `config` (a TrainConfig), with `fields`
    (values from command-line flags, a dict for a section's; None means "the recipe's") and
    then the `--set` overrides applied. Any error in the file (Python's or a config's check) is
    the user's: one line naming the file and line (newcomer F7)."""
    if not Path(path).is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        namespace = runpy.run_path(path)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: {e.msg}") from None
    except UserError as e:
        raise UserError(f"{path}:{_recipe_line(e, path)}: {e}") from None
    except Exception as e:  # a recipe is the user's Python: its mistakes are theirs to fix
        raise UserError(f"{path}:{_recipe_line(e, path)}: {type(e).__name__}: {e}") from None
    config = namespace.get("config")
    if not isinstance(config, TrainConfig):
        raise UserError(f"--config {path}: the file must define `config = TrainConfig(...)`")
    for name, value in fields.items():
        if isinstance(value, dict):  # a section's values, e.g. data={"path": ...}
            value = dataclasses.replace(getattr(config, name),
                                        **{k: v for k, v in value.items() if v is not None})
        if value is not None:
            config = dataclasses.replace(config, **{name: value})
    return apply_overrides(config, overrides)


def _recipe_line(error: BaseException, path: str) -> int | str:
    """The line of the recipe file where `error` was raised (its innermost frame there)."""
    line, target = "?", os.path.realpath(path)
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if os.path.realpath(frame.f_code.co_filename) == target:
            line = lineno
    return line
