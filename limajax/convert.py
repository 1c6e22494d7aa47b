"""Meta's consolidated.NN.pth shards and Hugging Face safetensors <-> limajax parameters.

One table, WEIGHTS, says for every parameter its name in each format, how its axes are laid out
there and along which axis Meta's model-parallel shards split it (reference/lima-and-llama.md
§5.2). Everything else is a few pure functions driven by that table.

Layouts are written in the model's shape alphabet (model.py): D dim, N heads, K kv heads, H head
dim, F ffn, V vocabulary, and C (2) x P (H/2) for the two halves of a rotary head. A torch weight
is [out, in]; our kernels are [in, out] with the heads split out; letters in parentheses are one
axis. The rotary permutation (§5.3) is the one place the layouts of Meta and Hugging Face differ:
Meta interleaves each head's rotated pairs, "(P C)"; HF and limajax keep the halves apart, "(C P)".

Memory: a tensor goes from the source file (memory-mapped) to its slot in the stacked target
arrays through numpy views, so a conversion holds at most one merged tensor in anonymous memory.
The stacked targets themselves can be np.memmap files (`staging`), which Orbax then streams to
disk (checkpoint.py); tools/bench_convert.py measures it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from limajax.checkpoint import staged_dir, write_model_dir
from limajax.config import ModelConfig, RopeScaling, meta_ffn_dim
from limajax.errors import UserError
from limajax.tokenizer import TOKENIZER_FILE, TokenSpec

# The text of LIMA's EOT token where a format needs one (HF's tokenizer_config.json). Inside
# limajax EOT is only an id: SentencePiece has no piece for it (limajax/tokenizer.py).
EOT_TEXT = "<EOT>"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


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
        dtype = DTYPES[config.param_dtype]
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


def init_eot(params: dict, config: ModelConfig, eot_id: int) -> None:
    """LIMA §3 adds EOT as a new token; its embedding and output rows start at the mean of the
    existing rows (so it begins as a typical token, not a random or zero one)."""
    for w in weights_for(config):
        if "V" not in _letters(w.layout):
            continue
        array = np.moveaxis(_get(params, w.ours), _letters(w.layout).index("V"), 0)
        total = np.zeros(array.shape[1:], np.float64)
        for start in range(0, eot_id, 4096):  # in blocks: never a float64 copy of the matrix
            total += array[start:min(start + 4096, eot_id)].sum(0, dtype=np.float64)
        array[eot_id] = (total / eot_id).astype(array.dtype)


class Converted(NamedTuple):
    params: dict
    config: ModelConfig
    tokens: TokenSpec
    tokenizer: Path | None  # the SentencePiece model to copy into the model directory


# --- tokenizers and token ids -----------------------------------------------------------------


def _sentencepiece(path: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path}: not a SentencePiece model ({e})") from None
    return sp


def _tokens(config: ModelConfig, bos: int, eos: int, eot_id: int | None, where: str
            ) -> TokenSpec:
    try:
        return TokenSpec(bos, eos, eot_id, config.vocab_size, config.padded_vocab_size)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def _check_tokenizer(sp, path: Path, base_vocab: int, tensor: str) -> None:
    if sp.vocab_size() > base_vocab:
        raise UserError(f"{path}: the tokenizer has {sp.vocab_size()} pieces but {tensor} has "
                        f"only {base_vocab} rows (wrong tokenizer for these weights?)")


def _with_eot(config: ModelConfig, base_vocab: int, add_eot: bool, dtype: str) -> ModelConfig:
    return config.replace(vocab_size=base_vocab + int(add_eot), param_dtype=dtype, dtype=dtype)


# --- Meta: params.json + consolidated.NN.pth ---------------------------------------------------

META_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len",
             "max_batch_size"}


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def config_from_meta(p: dict, vocab_size: int, where: Path) -> ModelConfig:
    """ModelConfig from Meta's params.json (vocab_size there is often -1: the weights decide)."""
    unknown = sorted(set(p) - META_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown} (limajax reads {sorted(META_KEYS)})")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in p]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    if p.get("vocab_size", -1) not in (-1, vocab_size):
        raise UserError(f"{where}: vocab_size is {p['vocab_size']} but tok_embeddings.weight has "
                        f"{vocab_size} rows")
    theta = float(p.get("rope_theta", 10000.0))
    scaled = bool(p.get("use_scaled_rope", False))
    # Meta's files do not say the context length; these are the released models' (§5.3).
    max_seq_len = p.get("max_seq_len") or (131072 if scaled else 8192 if theta >= 5e5 else 2048)
    try:
        return ModelConfig(
            dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads"), vocab_size=vocab_size,
            multiple_of=p.get("multiple_of", 256), ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
            norm_eps=float(p.get("norm_eps", 1e-5)), rope_theta=theta,
            rope_scaling=RopeScaling() if scaled else None, max_seq_len=max_seq_len)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def meta_shard_files(directory: Path) -> list[Path]:
    """consolidated.00.pth ... in order; a gap or a file listed in checklist.chk but absent is a
    missing shard."""
    files = sorted(directory.glob("consolidated.*.pth"))
    if not files:
        raise UserError(f"{directory}: no consolidated.NN.pth files (expected Meta's layout)")
    numbers = []
    for f in files:
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", f.name)
        if not m:
            raise UserError(f"{f}: unexpected file name (expected consolidated.NN.pth)")
        numbers.append(int(m.group(1)))
    for n in range(max(numbers) + 1):
        if n not in numbers:
            raise UserError(f"{directory / f'consolidated.{n:02d}.pth'}: missing shard (found "
                            f"{', '.join(f.name for f in files)})")
    checklist = directory / "checklist.chk"
    if checklist.is_file():
        for line in checklist.read_text().splitlines():
            name = line.split()[-1] if line.split() else ""
            if name.startswith("consolidated.") and not (directory / name).is_file():
                raise UserError(f"{directory / name}: missing shard (listed in checklist.chk)")
    return files


def _load_pth(path: Path) -> dict:
    import torch

    try:
        # mmap: tensors stay in the page cache until read; weights_only: never run pickled code.
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot be read as a PyTorch checkpoint ({reason})") from None
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise UserError(f"{path}: expected a dict of tensors (a Meta consolidated.NN.pth)")
    return sd


def _numpy(t) -> np.ndarray:
    """A numpy view of a CPU tensor (numpy has no bfloat16: view the bits as ml_dtypes')."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _merge_axis(w: Weight, key: str, shapes: list[tuple], full: tuple, files: list[Path]
                ) -> tuple[int | None, tuple]:
    """(axis Meta's shards of `key` concatenate along or None for a copy, merged shape).

    `full` is the shape params.json implies (None: any size, e.g. an unknown vocabulary)."""
    for f, s in zip(files[1:], shapes[1:], strict=True):
        if s != shapes[0]:
            raise UserError(f"{f}: {key} has shape {list(s)}, but {files[0].name} has "
                            f"{list(shapes[0])} (shards of one checkpoint must match)")

    def fits(shape):
        return len(shape) == len(full) and all(
            b is None or a == b for a, b in zip(shape, full, strict=True))

    n = len(shapes)
    if (n == 1 or not w.split) and fits(shapes[0]):
        return None, shapes[0]
    for axis in w.split if n > 1 else ():
        merged = tuple(s * n if a == axis else s for a, s in enumerate(shapes[0]))
        if fits(merged):
            return axis, merged
    each = f" in each of {n} shards" if n > 1 else ""
    want = [("?" if s is None else s) for s in full]
    raise UserError(f"{files[0]}: {key} has shape {list(shapes[0])}{each}, but params.json "
                    f"implies {want} merged (params.json disagrees with the weights)")


def read_meta(input_dir: str | Path, *, tokenizer: str | Path | None = None,
              dtype: str = "float32", add_eot: bool = True, staging: Path | None = None
              ) -> Converted:
    """Meta's checkpoint -> parameters, streamed tensor by tensor (see module docstring)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: not a directory (expected params.json + "
                        "consolidated.NN.pth)")
    params_json = _read_json(input_dir / "params.json")
    files = meta_shard_files(input_dir)
    shards = [_load_pth(f) for f in files]
    keys = [k for k in shards[0] if not IGNORED.search(k)]

    # The vocabulary is the one size params.json may leave out (-1): read it off the weights.
    emb = WEIGHTS[0]
    for f, sd in zip(files, shards, strict=True):
        if emb.meta not in sd:
            raise UserError(f"{f}: tensor {emb.meta} is missing")
    dim = params_json.get("dim")
    _, emb_shape = _merge_axis(emb, emb.meta, [tuple(sd[emb.meta].shape) for sd in shards],
                               (None, dim), files)
    base_vocab = emb_shape[0]
    config = config_from_meta(params_json, base_vocab, input_dir / "params.json")
    if "output.weight" not in keys:  # Meta always writes it; without it the model is tied
        config = config.replace(tie_embeddings=True)

    plan = _plan_meta(config, base_vocab, files, shards, keys)
    tokenizer = _find_meta_tokenizer(input_dir, tokenizer)
    bos, eos = 1, 2  # LLaMA-1/2's; the tokenizer's when there is one
    if tokenizer is not None:
        sp = _sentencepiece(tokenizer)
        _check_tokenizer(sp, tokenizer, base_vocab, emb.meta)
        bos, eos = sp.bos_id(), sp.eos_id()

    config = _with_eot(config, base_vocab, add_eot, dtype)
    params = allocate(config, staging)
    sizes = sizes_for(config, base_vocab)
    for w, layer, key, axis in plan:
        parts = [_numpy(sd[key]) for sd in shards]
        # One merged tensor in memory at most; a single shard is read straight from the file.
        x = parts[0] if axis is None else np.concatenate(parts, axis)
        place(params, w, layer, x, w.meta_layout, sizes)
        del x, parts
    if not config.tie_embeddings and _same_embedding_and_output(params, base_vocab):
        # Meta's format cannot say "tied", so a tied model (e.g. llama2.c's) is written with an
        # identical output copy; keep it tied so fine-tuning keeps the two equal.
        config = config.replace(tie_embeddings=True)
        del params["output"]
    eot_id = base_vocab if add_eot else None
    if add_eot:
        init_eot(params, config, eot_id)
    tokens = _tokens(config, bos, eos, eot_id, str(tokenizer or input_dir))
    return Converted(params, config, tokens, tokenizer)


def _same_embedding_and_output(params: dict, vocab: int) -> bool:
    """tok_embeddings == output^T exactly, compared in blocks of rows (no copy of either)."""
    emb, out = params["tok_embeddings"]["embedding"], params["output"]["kernel"]
    for start in range(0, vocab, 4096):
        stop = min(start + 4096, vocab)
        if not np.array_equal(emb[start:stop], out[:, start:stop].T):
            return False
    return True


def _plan_meta(config, base_vocab, files, shards, keys):
    """Check every tensor of every shard against params.json before any data is read."""
    expected = source_keys(config, "meta")
    known = {key for _, _, key in expected}
    for key in keys:
        if key not in known:
            raise UserError(f"{files[0]}: unexpected tensor {key} (params.json says "
                            f"n_layers {config.n_layers}; is it a LLaMA checkpoint?)")
    sizes = sizes_for(config, base_vocab)
    plan = []
    for w, layer, key in expected:
        for f, sd in zip(files, shards, strict=True):
            if key not in sd:
                raise UserError(f"{f}: tensor {key} is missing")
        full = layout_shape(w.meta_layout, sizes)
        axis, _ = _merge_axis(w, key, [tuple(sd[key].shape) for sd in shards], full, files)
        plan.append((w, layer, key, axis))
    return plan


def _find_meta_tokenizer(input_dir: Path, tokenizer: str | Path | None) -> Path | None:
    """--tokenizer, else tokenizer.model in the directory or beside it (Meta's download layout)."""
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if tokenizer.is_dir():
            tokenizer = tokenizer / TOKENIZER_FILE
        if not tokenizer.is_file():
            raise UserError(f"{tokenizer}: not found (--tokenizer)")
        return tokenizer
    for candidate in (input_dir / TOKENIZER_FILE, input_dir.parent / TOKENIZER_FILE):
        if candidate.is_file():
            return candidate
    return None


# --- Hugging Face: config.json + safetensors ---------------------------------------------------


def _hf_rope(cfg: dict, where: Path) -> tuple[float, RopeScaling | None]:
    """rope_theta and Llama-3.1 scaling from transformers 5.x's `rope_parameters` or 4.x's
    `rope_theta` + `rope_scaling` (reference §5.4)."""
    rope = cfg.get("rope_parameters")
    if rope is None:
        rope = dict(cfg.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UserError(f"{where}: rope type {kind!r} is not supported (limajax implements "
                        "'default' and Llama 3.1's 'llama3')")
    try:
        return theta, RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    except KeyError as e:
        raise UserError(f"{where}: llama3 rope scaling without {e.args[0]}") from None


def config_from_hf(cfg: dict, where: Path) -> ModelConfig:
    """ModelConfig from a transformers LlamaConfig's config.json (4.x or 5.x)."""
    archs = cfg.get("architectures") or []
    if "LlamaForCausalLM" not in archs and not (not archs and cfg.get("model_type") == "llama"):
        raise UserError(f"{where}: architecture {archs or cfg.get('model_type')} is not "
                        "supported (limajax converts LlamaForCausalLM)")
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False),
                           ("mlp_bias", False)):
        if cfg.get(key, supported) != supported:
            raise UserError(f"{where}: {key} {cfg[key]!r} is not supported (LLaMA uses "
                            f"{supported!r})")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in cfg]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    theta, scaling = _hf_rope(cfg, where)
    try:
        return ModelConfig(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"], n_kv_heads=cfg.get("num_key_value_heads"),
            vocab_size=cfg["vocab_size"], ffn_dim=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim"), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _first_id(value, default: int) -> int:
    if isinstance(value, list):  # Llama 3 instruct lists several EOS ids
        value = value[0] if value else None
    return default if value is None else int(value)


def _hf_files(input_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, from the index if the checkpoint is sharded."""
    index = input_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no weight_map")
        return {k: input_dir / v for k, v in weight_map.items()}
    single = input_dir / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{input_dir}: no model.safetensors or model.safetensors.index.json "
                        "(limajax reads safetensors checkpoints)")
    return {}  # read the single file's own list of tensors


def _safe_open(path: Path, stack: ExitStack):
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"{path}: not found (named in model.safetensors.index.json)")
    try:
        return stack.enter_context(safe_open(path, framework="numpy"))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a complete safetensors file ({e}); was the download "
                        "interrupted?") from None


def _eot_in_hf(input_dir: Path, vocab_size: int) -> int | None:
    """EOT's id if this checkpoint came from `limajax export` (its last id, named EOT_TEXT)."""
    path = input_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    added = _read_json(path).get("added_tokens_decoder") or {}
    for i, token in added.items():
        if isinstance(token, dict) and token.get("content") == EOT_TEXT:
            if str(i).isdigit() and int(i) == vocab_size - 1:
                return int(i)
    return None


def read_hf(input_dir: str | Path, *, dtype: str = "float32", add_eot: bool = True,
            staging: Path | None = None) -> Converted:
    """A transformers LlamaForCausalLM checkpoint -> parameters, tensor by tensor."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: not a directory (expected config.json + safetensors)")
    cfg = _read_json(input_dir / "config.json")
    config = config_from_hf(cfg, input_dir / "config.json")
    base_vocab = config.vocab_size
    with ExitStack() as stack:
        handles = _open_hf(input_dir, stack)
        expected = source_keys(config, "hf")
        _check_hf_tensors(config, base_vocab, handles, expected)

        tokenizer = input_dir / TOKENIZER_FILE
        tokenizer = tokenizer if tokenizer.is_file() else None
        bos, eos = _first_id(cfg.get("bos_token_id"), 1), _first_id(cfg.get("eos_token_id"), 2)
        if tokenizer is not None:
            _check_tokenizer(_sentencepiece(tokenizer), tokenizer, base_vocab,
                             WEIGHTS[0].hf)
        eot_id = _eot_in_hf(input_dir, base_vocab)
        if eot_id is not None:  # exported by limajax: EOT is already there
            add_eot, base_vocab = False, base_vocab - 1
        config = _with_eot(config, base_vocab + int(eot_id is not None), add_eot, dtype)
        params = allocate(config, staging)
        sizes = sizes_for(config, base_vocab + int(eot_id is not None))
        for w, layer, key in expected:
            path, handle = handles[key]
            place(params, w, layer, handle.get_tensor(key), w.hf_layout, sizes)
    if add_eot:
        eot_id = base_vocab
        init_eot(params, config, eot_id)
    tokens = _tokens(config, bos, eos, eot_id, str(input_dir / "config.json"))
    return Converted(params, config, tokens, tokenizer)


def _open_hf(input_dir: Path, stack: ExitStack) -> dict[str, tuple[Path, object]]:
    """tensor name -> (file, open safetensors handle)."""
    files = _hf_files(input_dir)
    paths = sorted(set(files.values())) or [input_dir / "model.safetensors"]
    handles = {}
    for path in paths:
        handle = _safe_open(path, stack)
        for key in handle.keys():
            if files and files.get(key) != path:
                continue  # the index decides where a tensor lives
            handles[key] = (path, handle)
    for key, path in files.items():
        if key not in handles:
            raise UserError(f"{path}: tensor {key} is missing (named in the index)")
    return handles


def _check_hf_tensors(config, base_vocab, handles, expected) -> None:
    """Every tensor present with the shape config.json implies; nothing unexpected."""
    sizes = sizes_for(config, base_vocab)
    known = {key for _, _, key in expected}
    if config.tie_embeddings:
        known.add("lm_head.weight")  # some tied checkpoints still store the copy; it is unused
    for key, (path, _) in sorted(handles.items()):
        if key not in known and not IGNORED.search(key):
            raise UserError(f"{path}: unexpected tensor {key} (config.json says n_layers "
                            f"{config.n_layers}; is it a LlamaForCausalLM checkpoint?)")
    for w, _, key in expected:
        if key not in handles:
            where = next(iter(handles.values()))[0] if handles else "checkpoint"
            raise UserError(f"{where}: tensor {key} is missing")
        path, handle = handles[key]
        shape = tuple(handle.get_slice(key).get_shape())
        want = layout_shape(w.hf_layout, sizes)
        if shape != want:
            raise UserError(f"{path}: {key} has shape {list(shape)}, config.json implies "
                            f"{list(want)} (config.json disagrees with the weights)")


# --- conversion into a model directory ----------------------------------------------------------


def convert(source: str, input_dir: str | Path, output: str | Path, *,
            tokenizer: str | Path | None = None, dtype: str = "float32", add_eot: bool = True,
            overwrite: bool = False) -> tuple[ModelConfig, TokenSpec, Path | None]:
    """`limajax convert`: a Meta or HF checkpoint -> a model directory, built beside `output`
    and renamed when complete. Needs disk for the model twice while it runs. Returns the
    config, the token ids and the tokenizer copied in (None if there was none)."""
    if source not in ("meta", "hf"):
        raise UserError(f"--from {source!r}: expected meta or hf")
    if source == "hf" and tokenizer is not None:
        raise UserError("--tokenizer is for --from meta; an HF checkpoint's tokenizer.model is "
                        "read from its directory")
    with staged_dir(output, overwrite=overwrite) as tmp:
        staging = tmp / ".staging"
        staging.mkdir()
        if source == "meta":
            c = read_meta(input_dir, tokenizer=tokenizer, dtype=dtype, add_eot=add_eot,
                          staging=staging)
        else:
            c = read_hf(input_dir, dtype=dtype, add_eot=add_eot, staging=staging)
        write_model_dir(tmp, c.params, c.config, c.tokens, c.tokenizer)
        config, tokens, found = c.config, c.tokens, c.tokenizer
        del c  # drop the memmaps before their files
        shutil.rmtree(staging)
    return config, tokens, found


# --- writing Hugging Face and Meta checkpoints ---------------------------------------------------


def hf_config(config: ModelConfig, tokens: TokenSpec) -> dict:
    """config.json for transformers' LlamaConfig. Both rope layouts are written: 4.x reads
    rope_theta + rope_scaling, 5.x rope_parameters (reference §5.4)."""
    scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    rope = {"rope_theta": config.rope_theta, **(scaling or {"rope_type": "default"})}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
        "hidden_act": "silu", "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": scaling, "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "vocab_size": config.vocab_size,  # the real vocabulary, EOT included, padding dropped
        "bos_token_id": tokens.bos_id, "eos_token_id": tokens.eos_id,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "pretraining_tp": 1, "use_cache": True,
        "torch_dtype": config.param_dtype, "dtype": config.param_dtype,  # 4.x / 5.x names
    }


def hf_generation_config(tokens: TokenSpec) -> dict:
    """Stop at EOT as well as EOS. No sampling settings: transformers would apply them to every
    generate() call, greedy ones included (limajax's sampler has LIMA §4.1's)."""
    eos = tokens.eos_id if tokens.eot_id is None else [tokens.eot_id, tokens.eos_id]
    return {"bos_token_id": tokens.bos_id, "eos_token_id": eos}


def hf_tokenizer_config(tokenizer: Path, tokens: TokenSpec, config: ModelConfig) -> dict:
    """tokenizer_config.json for the SentencePiece model, EOT declared as an added special token
    (so transformers encodes EOT_TEXT as EOT's id and `skip_special_tokens` drops it)."""
    sp = _sentencepiece(tokenizer)

    def special(text):
        return {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    ids = {"unk_token": sp.unk_id(), "bos_token": tokens.bos_id, "eos_token": tokens.eos_id}
    names = {k: sp.id_to_piece(i) for k, i in ids.items() if 0 <= i < sp.vocab_size()}
    added = {str(ids[k]): special(text) for k, text in names.items()}
    out = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "legacy": False, "pad_token": None,
           "model_max_length": config.max_seq_len, "sp_model_kwargs": {}, **names}
    if tokens.eot_id is not None:
        added[str(tokens.eot_id)] = special(EOT_TEXT)
        out["additional_special_tokens"] = [EOT_TEXT]
    out["added_tokens_decoder"] = added
    return out


def _file_order(config: ModelConfig, fmt: str) -> list[tuple[Weight, int | None, str]]:
    """Embedding, then layer by layer, then the rest, as checkpoints usually list them."""
    def rank(entry):
        w, layer, _ = entry
        return -1 if w is WEIGHTS[0] else config.n_layers if layer is None else layer

    return sorted(source_keys(config, fmt), key=rank)


def write_hf(directory: str | Path, params: dict, config: ModelConfig, tokens: TokenSpec,
             tokenizer: str | Path | None = None, *, max_shard_bytes: int = 5 << 30) -> None:
    """A transformers checkpoint (safetensors, sharded with an index past `max_shard_bytes`,
    config.json, generation_config.json, tokenizer) in an existing directory."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    sizes = sizes_for(config, config.vocab_size)
    itemsize = np.dtype(DTYPES[config.param_dtype]).itemsize
    shards, size = [[]], 0
    for entry in _file_order(config, "hf"):
        nbytes = math.prod(layout_shape(entry[0].hf_layout, sizes)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for name, shard in zip(names, shards, strict=True):
        tensors = {key: extract(params, w, layer, w.hf_layout, sizes) for w, layer, key in shard}
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _write_json(directory / "config.json", hf_config(config, tokens))
    _write_json(directory / "generation_config.json", hf_generation_config(tokens))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)
        _write_json(directory / "tokenizer_config.json",
                    hf_tokenizer_config(Path(tokenizer), tokens, config))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def meta_params_json(config: ModelConfig) -> dict:
    """Meta's params.json for `config`, or a UserError for what Meta's format cannot say."""
    if config.head_dim * config.n_heads != config.dim:
        raise UserError(f"head_dim {config.head_dim} cannot be written in params.json (Meta's "
                        f"models have head_dim = dim / n_heads = {config.dim / config.n_heads:g})")
    p = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads}
    if config.n_kv_heads != config.n_heads:
        p["n_kv_heads"] = config.n_kv_heads
    p["vocab_size"] = config.vocab_size
    multiple_of, multiplier = config.multiple_of, config.ffn_dim_multiplier
    if meta_ffn_dim(config.dim, multiple_of, multiplier) != config.ffn_dim:
        # An HF intermediate_size off Meta's rule. With multiple_of = ffn_dim the rule rounds
        # anything in (0, ffn_dim] up to exactly ffn_dim; a multiplier brings 8/3 dim below it.
        hidden = int(8 * config.dim / 3)
        multiple_of = config.ffn_dim
        multiplier = None if hidden <= config.ffn_dim else config.ffn_dim / hidden
        if meta_ffn_dim(config.dim, multiple_of, multiplier) != config.ffn_dim:
            raise UserError(f"ffn_dim {config.ffn_dim} cannot be written in params.json")
    p["multiple_of"] = multiple_of
    if multiplier is not None:
        p["ffn_dim_multiplier"] = multiplier
    p["norm_eps"] = config.norm_eps
    if config.rope_theta != 10000.0:
        p["rope_theta"] = config.rope_theta
    if config.rope_scaling is not None:
        if config.rope_scaling != RopeScaling():
            raise UserError(f"rope scaling {config.rope_scaling} cannot be written in "
                            "params.json (Meta's use_scaled_rope means Llama 3.1's defaults)")
        p["use_scaled_rope"] = True
    return p


def write_meta(directory: str | Path, params: dict, config: ModelConfig, n_shards: int = 1
               ) -> None:
    """Meta's layout in an existing directory: params.json + consolidated.NN.pth, each tensor
    split along its model-parallel axis (tok_embeddings along D, as LLaMA 1/2 do). A tied
    output is written as a copy: Meta's format has no tying. Holds one shard in memory."""
    import torch

    directory = Path(directory)
    params_json = meta_params_json(config)
    sizes = sizes_for(config, config.vocab_size)
    entries = _file_order(config.replace(tie_embeddings=False), "meta")
    for w, _, key in entries:
        shape = layout_shape(w.meta_layout, sizes)
        if w.split and shape[w.split[0]] % n_shards:
            raise UserError(f"{key} {list(shape)} cannot be split evenly into {n_shards} shards "
                            f"along axis {w.split[0]}, as Meta's model-parallel layers need "
                            "(try --shards 1)")
    for s in range(n_shards):
        shard = {}
        for w, layer, key in entries:
            source = WEIGHTS[0] if config.tie_embeddings and w.ours == "output/kernel" else w
            x = extract(params, source, layer, w.meta_layout, sizes)
            if w.split:
                x = np.split(x, n_shards, axis=w.split[0])[s]
            x = np.array(x, copy=True)  # its own storage: torch.save writes whole storages
            shard[key] = _torch(x)
        torch.save(shard, directory / f"consolidated.{s:02d}.pth")
        del shard
    _write_json(directory / "params.json", params_json)


def _torch(x: np.ndarray):
    import torch

    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def export(target: str, model_dir: str | Path, output: str | Path, *, shards: int = 1,
           overwrite: bool = False) -> ModelConfig:
    """`limajax export`: a model directory -> a Hugging Face or Meta checkpoint directory,
    built beside `output` and renamed when complete."""
    from limajax.checkpoint import load_model_dir, tokenizer_path

    if target not in ("hf", "meta"):
        raise UserError(f"--to {target!r}: expected hf or meta")
    if shards < 1 or (target == "hf" and shards != 1):
        raise UserError("--shards is for --to meta and must be >= 1")
    params, config, tokens = load_model_dir(model_dir)
    tokenizer = tokenizer_path(model_dir)
    marker = "config.json" if target == "hf" else "params.json"
    with staged_dir(output, overwrite=overwrite, marker=marker) as tmp:
        if target == "hf":
            write_hf(tmp, params, config, tokens, tokenizer)
        else:
            write_meta(tmp, params, config, shards)
            if tokenizer is not None:
                shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    return config
