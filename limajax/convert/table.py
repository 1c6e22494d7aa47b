"""The name table and its pure transforms: one entry per parameter, the shape alphabet as views.

Layouts are written in the model's shape alphabet (model.py): D dim, N heads, K kv heads, H head
dim, F ffn, V vocabulary, and C (2) x P (H/2) for the two halves of a rotary head. A torch weight
is [out, in]; our kernels are [in, out] with the heads split out; letters in parentheses are one
axis. The rotary permutation (reference/lima-and-llama.md §5.3) is the one place the layouts of
Meta and Hugging Face differ: Meta interleaves each head's rotated pairs, "(P C)"; HF and
limajax keep the halves apart, "(C P)".

A tensor goes from its source (memory-mapped) to its slot in the stacked target arrays through
numpy views (`place`), so a conversion holds at most one merged tensor in anonymous memory; the
targets themselves can be np.memmap files (`allocate(..., staging)`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from limajax.config import ModelConfig
from limajax.errors import UserError
from limajax.tokenizer import TokenSpec, vocab_with_eot

# The text of LIMA's EOT token where a format needs one (HF's tokenizer_config.json). Inside
# limajax EOT is only an id: SentencePiece has no piece for it (limajax/tokenizer.py).
EOT_TEXT = "<EOT>"
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@dataclass(frozen=True)
class Weight:
    ours: str  # path in the params tree; "layers/..." are stacked on a leading L axis
    layout: str  # our layout of one layer's array
    meta: str  # key in Meta's shards ("{i}": the layer)
    meta_layout: str
    hf: str  # key in HF's safetensors
    hf_layout: str
    split: tuple[int, ...]  # axis Meta's shards concatenate along (tried in order); () = copies

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.meta


_L, _HF_L = "layers.{i}.", "model.layers.{i}."
WEIGHTS: tuple[Weight, ...] = (
    # ParallelEmbedding splits the embedding dim; Llama 3's VocabParallelEmbedding the vocabulary.
    Weight("tok_embeddings/embedding", "V D", "tok_embeddings.weight", "V D",
           "model.embed_tokens.weight", "V D", (1, 0)),
    Weight("layers/attention_norm/scale", "D", _L + "attention_norm.weight", "D",
           _HF_L + "input_layernorm.weight", "D", ()),
    Weight("layers/attention/wq/kernel", "D N (C P)", _L + "attention.wq.weight", "(N P C) D",
           _HF_L + "self_attn.q_proj.weight", "(N C P) D", (0,)),
    Weight("layers/attention/wk/kernel", "D K (C P)", _L + "attention.wk.weight", "(K P C) D",
           _HF_L + "self_attn.k_proj.weight", "(K C P) D", (0,)),
    Weight("layers/attention/wv/kernel", "D K H", _L + "attention.wv.weight", "(K H) D",
           _HF_L + "self_attn.v_proj.weight", "(K H) D", (0,)),
    Weight("layers/attention/wo/kernel", "N H D", _L + "attention.wo.weight", "D (N H)",
           _HF_L + "self_attn.o_proj.weight", "D (N H)", (1,)),
    Weight("layers/ffn_norm/scale", "D", _L + "ffn_norm.weight", "D",
           _HF_L + "post_attention_layernorm.weight", "D", ()),
    Weight("layers/feed_forward/w1/kernel", "D F", _L + "feed_forward.w1.weight", "F D",
           _HF_L + "mlp.gate_proj.weight", "F D", (0,)),
    Weight("layers/feed_forward/w2/kernel", "F D", _L + "feed_forward.w2.weight", "D F",
           _HF_L + "mlp.down_proj.weight", "D F", (1,)),
    Weight("layers/feed_forward/w3/kernel", "D F", _L + "feed_forward.w3.weight", "F D",
           _HF_L + "mlp.up_proj.weight", "F D", (0,)),
    Weight("norm/scale", "D", "norm.weight", "D", "model.norm.weight", "D", ()),
    Weight("output/kernel", "D V", "output.weight", "V D", "lm_head.weight", "V D", (0,)),
)
# Buffers some checkpoints carry that the model recomputes.
IGNORED = re.compile(r"^rope\.freqs$|\.rotary_emb\.inv_freq$")


# --- layouts: the shape alphabet as views ---------------------------------------------------


def _groups(layout: str) -> list[list[str]]:
    """'D N (C P)' -> [['D'], ['N'], ['C', 'P']]."""
    return [g.strip("()").split() for g in re.findall(r"\([^)]*\)|\S+", layout)]


def _letters(layout: str) -> list[str]:
    return [a for g in _groups(layout) for a in g]


def layout_shape(layout: str, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(math.prod(sizes[a] for a in g) for g in _groups(layout))


def rearrange(x: np.ndarray, src: str, dst: str, sizes: dict[str, int]) -> np.ndarray:
    """x laid out as `src` -> the same values in `dst`'s axis order, each group split into its
    letters. A view when x is contiguous: the transpose costs no memory."""
    s, d = _letters(src), _letters(dst)
    x = np.reshape(x, [sizes[a] for a in s])
    return x.transpose([s.index(a) for a in d])


def sizes_for(config: ModelConfig, vocab_size: int) -> dict[str, int]:
    h = config.head_dim
    return {"D": config.dim, "N": config.n_heads, "K": config.n_kv_heads, "H": h, "C": 2,
            "P": h // 2, "F": config.ffn_dim, "V": vocab_size}


def weights_for(config: ModelConfig) -> list[Weight]:
    return [w for w in WEIGHTS if not (config.tie_embeddings and w.ours == "output/kernel")]


def source_keys(config: ModelConfig, fmt: str) -> list[tuple[Weight, int | None, str]]:
    """(weight, layer, key in format `fmt`) for every tensor a checkpoint of `config` holds."""
    out = []
    for w in weights_for(config):
        key = getattr(w, fmt)
        layers = range(config.n_layers) if w.per_layer else [None]
        out += [(w, i, key.format(i=i)) for i in layers]
    return out


# --- the params tree ---------------------------------------------------------------------------


def _get(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def allocate(config: ModelConfig, staging: Path | None = None) -> dict:
    """Zeroed parameters for `config` (padding rows of the vocabulary stay zero), in memory or,
    with `staging`, as np.memmap files there: filled from the page cache, not anonymous memory."""
    sizes = sizes_for(config, config.padded_vocab_size)
    params: dict = {}
    for w in weights_for(config):
        shape = ((config.n_layers,) if w.per_layer else ()) + layout_shape(w.layout, sizes)
        dtype = NUMPY_DTYPES[config.param_dtype]
        if staging is None:
            array = np.zeros(shape, dtype)
        else:
            array = np.memmap(staging / f"{w.ours.replace('/', '.')}.bin", dtype, "w+",
                              shape=shape)
        _set(params, w.ours, array)
    return params


def place(params: dict, w: Weight, layer: int | None, x: np.ndarray, src_layout: str,
          sizes: dict[str, int]) -> None:
    """Copy one source tensor, laid out as `src_layout`, into its slot (views only, cast on the
    fly). `sizes["V"]` is the source's vocabulary: rows past it are left as they are."""
    dst = _get(params, w.ours)
    dst = dst if layer is None else dst[layer]
    dst = dst[tuple(slice(0, n) for n in layout_shape(w.layout, sizes))]
    view = rearrange(x, src_layout, w.layout, sizes)
    np.copyto(np.reshape(dst, view.shape, copy=False), view, casting="same_kind")


def extract(params: dict, w: Weight, layer: int | None, dst_layout: str,
            sizes: dict[str, int]) -> np.ndarray:
    """One tensor laid out as `dst_layout` (contiguous), vocabulary padding dropped."""
    src = _get(params, w.ours)
    src = src if layer is None else src[layer]
    src = np.asarray(src[tuple(slice(0, n) for n in layout_shape(w.layout, sizes))])
    x = np.ascontiguousarray(rearrange(src, w.layout, dst_layout, sizes))
    return x.reshape(layout_shape(dst_layout, sizes))


# A row whose norm is below this fraction of the median row's never saw a gradient: Llama-3
# base's special tokens (<|eot_id|> among them) have such near-zero rows.
UNTRAINED = 1e-3


def init_eot(params: dict, config: ModelConfig, eot_id: int, base_vocab: int) -> None:
    """LIMA §3 adds EOT as a new token: its embedding and output rows start at the mean of the
    trained rows of the base vocabulary, so it begins as a typical token, not a random or zero
    one. An existing EOT (Llama 3's <|eot_id|>) whose rows are untrained starts there too."""
    for w in weights_for(config):
        if "V" not in _letters(w.layout):
            continue
        array = np.moveaxis(_get(params, w.ours), _letters(w.layout).index("V"), 0)
        norms = np.concatenate([  # in blocks: never a float64 copy of the matrix
            np.linalg.norm(array[s:s + 4096].astype(np.float64), axis=1)
            for s in range(0, base_vocab, 4096)])
        trained = norms > UNTRAINED * np.median(norms)
        if eot_id < base_vocab and trained[eot_id]:
            continue
        total = np.zeros(array.shape[1:], np.float64)
        for s in range(0, base_vocab, 4096):
            total += array[s:s + 4096][trained[s:s + 4096]].sum(0, dtype=np.float64)
        array[eot_id] = (total / trained.sum()).astype(array.dtype)


class Converted(NamedTuple):
    params: dict
    config: ModelConfig
    tokens: TokenSpec
    tokenizer: Path | None  # the SentencePiece model to copy into the model directory


def converted_config(config: ModelConfig, base_vocab: int, eot_id: int | None, dtype: str
                     ) -> ModelConfig:
    """The model directory's config: the base vocabulary, plus a row for LIMA's EOT if it is a
    new id; parameters (and the compute dtype) in the `--dtype` asked for."""
    return config.replace(vocab_size=vocab_with_eot(base_vocab, eot_id), param_dtype=dtype,
                          dtype=dtype)


def token_spec(config: ModelConfig, bos: int, eos: int, eot_id: int | None, where: str
               ) -> TokenSpec:
    try:
        return TokenSpec(bos, eos, eot_id, config.vocab_size, config.padded_vocab_size)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def file_order(config: ModelConfig, fmt: str) -> list[tuple[Weight, int | None, str]]:
    """Embedding, then layer by layer, then the rest, as checkpoints usually list them."""
    def rank(entry):
        w, layer, _ = entry
        return -1 if w is WEIGHTS[0] else config.n_layers if layer is None else layer

    return sorted(source_keys(config, fmt), key=rank)
