"""Meta's layout: params.json + consolidated.NN.pth, each tensor split over the model-parallel
shards along the axis its fairscale layer splits (reference/lima-and-llama.md §5.1-5.2)."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np

from limajax.config import ModelConfig, RopeScaling, meta_ffn_dim
from limajax.convert.table import (
    IGNORED,
    WEIGHTS,
    Converted,
    Weight,
    allocate,
    converted_config,
    extract,
    file_order,
    init_eot,
    layout_shape,
    place,
    sizes_for,
    source_keys,
    token_spec,
)
from limajax.errors import UserError
from limajax.files import read_json, write_json
from limajax.progress import progress
from limajax.tokenizer import check_fits, eot_id_for, load_pieces, tokenizer_file

META_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len",
             "max_batch_size"}


def meta_family(p: dict) -> tuple[str, int]:
    """(family, context length) of a Meta params.json, which does not state the context length.

    The released families differ in what params.json does state (reference/lima-and-llama.md
    §5.1): Llama 3.1 sets use_scaled_rope, Llama 3 rope_theta 500000, LLaMA-1 norm_eps 1e-6
    (its 65B, the only one with 1e-5, has dim 8192 and no K/V groups); the rest is Llama 2.
    """
    if p.get("use_scaled_rope"):
        return "Llama-3.1", 131072
    if float(p.get("rope_theta", 10000.0)) >= 5e5:
        return "Llama-3", 8192
    if float(p.get("norm_eps", 1e-5)) < 5e-6 or (
            p.get("dim") == 8192 and p.get("n_kv_heads", p.get("n_heads")) == p.get("n_heads")):
        return "LLaMA-1", 2048
    return "Llama-2", 4096


def context_guess(input_dir: str | Path, max_seq_len: int | None) -> tuple[str, int] | None:
    """(family, context length) when the converted context length is the family's guess: no
    --max-seq-len and none in params.json (Meta's do not state it); None when it was given."""
    p = read_json(Path(input_dir) / "params.json")
    if max_seq_len or p.get("max_seq_len"):
        return None
    return meta_family(p)


def config_from_meta(p: dict, vocab_size: int, where: Path, max_seq_len: int | None = None
                     ) -> ModelConfig:
    """ModelConfig from Meta's params.json (vocab_size there is often -1: the weights decide);
    the context length is `max_seq_len`, else params.json's, else its family's (meta_family)."""
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
    max_seq_len = max_seq_len or p.get("max_seq_len") or meta_family(p)[1]
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


def require_torch():
    """PyTorch, which only Meta's .pth format needs: an extra, so `pip install limajax` never
    replaces a user's (CUDA) torch."""
    try:
        import torch
    except ImportError:
        raise UserError("Meta's consolidated.NN.pth format needs PyTorch, which is not installed: "
                        'pip install "limajax[meta]"') from None
    return torch


def _load_pth(path: Path) -> dict:
    torch = require_torch()

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
    torch = require_torch()

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


def _check_last_shards(emb: Weight, shapes: list[tuple], dim, files: list[Path]) -> None:
    """Fewer files than the embedding's split implies: the last shards are missing (no gap in
    the numbering shows it). The embedding's split axis is params.json's `dim`."""
    axis = emb.split[0]
    n, size = len(files), shapes[0][axis]
    if isinstance(dim, int) and size and dim % size == 0 and dim // size > n:
        missing = [f"consolidated.{i:02d}.pth" for i in range(n, dim // size)]
        raise UserError(f"{files[0].parent / missing[0]}: missing shard ({emb.meta} is split "
                        f"into {dim // size} shards; found {n}, missing {', '.join(missing)})")


def read_meta(input_dir: str | Path, *, tokenizer: str | Path | None = None,
              dtype: str = "float32", add_eot: bool = True, staging: Path | None = None,
              max_seq_len: int | None = None, no_tokenizer: bool = False) -> Converted:
    """Meta's checkpoint -> parameters, streamed tensor by tensor (see convert.table): one
    merged tensor in anonymous memory at most; a single shard is read from the mapped file."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: not a directory (expected params.json + "
                        "consolidated.NN.pth)")
    params_json = read_json(input_dir / "params.json")
    files = meta_shard_files(input_dir)
    tokenizer = _find_meta_tokenizer(input_dir, tokenizer, no_tokenizer)
    shards = [_load_pth(f) for f in files]
    keys = [k for k in shards[0] if not IGNORED.search(k)]

    # The vocabulary is the one size params.json may leave out (-1): read it off the weights.
    emb = WEIGHTS[0]
    for f, sd in zip(files, shards, strict=True):
        if emb.meta not in sd:
            raise UserError(f"{f}: tensor {emb.meta} is missing")
    dim = params_json.get("dim")
    _check_last_shards(emb, [tuple(sd[emb.meta].shape) for sd in shards], dim, files)
    _, emb_shape = _merge_axis(emb, emb.meta, [tuple(sd[emb.meta].shape) for sd in shards],
                               (None, dim), files)
    base_vocab = emb_shape[0]
    config = config_from_meta(params_json, base_vocab, input_dir / "params.json", max_seq_len)
    if "output.weight" not in keys:  # Meta always writes it; without it the model is tied
        config = config.replace(tie_embeddings=True)

    plan = _check_meta_tensors(config, base_vocab, files, shards, keys)
    # No tokenizer (--no-tokenizer): the family's ids if they fit (the command line says which).
    llama3 = meta_family(params_json)[0].startswith("Llama-3") and base_vocab > 128001
    bos, eos = (128000, 128001) if llama3 else (1, 2)
    eot_id = base_vocab if add_eot else None
    if tokenizer is not None:
        pieces = load_pieces(tokenizer)
        check_fits(pieces, base_vocab, emb.meta)
        bos, eos = pieces.bos_id, pieces.eos_id
        eot_id = eot_id_for(pieces, base_vocab) if add_eot else None

    config = converted_config(config, base_vocab, eot_id, dtype)
    params = allocate(config, staging)
    sizes = sizes_for(config, base_vocab)
    for w, layer, key, axis in progress(plan, desc="convert", unit="tensor"):
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
    if eot_id is not None:
        init_eot(params, config, eot_id, base_vocab)
    tokens = token_spec(config, bos, eos, eot_id, str(tokenizer or input_dir))
    return Converted(params, config, tokens, tokenizer)


def _same_embedding_and_output(params: dict, vocab: int) -> bool:
    """tok_embeddings == output^T exactly, compared in blocks of rows (no copy of either)."""
    emb, out = params["tok_embeddings"]["embedding"], params["output"]["kernel"]
    for start in range(0, vocab, 4096):
        stop = min(start + 4096, vocab)
        if not np.array_equal(emb[start:stop], out[:, start:stop].T):
            return False
    return True


def _check_meta_tensors(config, base_vocab, files, shards, keys):
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


def _find_meta_tokenizer(input_dir: Path, tokenizer: str | Path | None, no_tokenizer: bool
                         ) -> Path | None:
    """--tokenizer, else the tokenizer file (tokenizer.model or tokenizer.json) in the directory
    or beside it (Meta's download layout); none at all only with --no-tokenizer (score and train
    --init need one)."""
    if no_tokenizer:
        if tokenizer is not None:
            raise UserError("--tokenizer and --no-tokenizer contradict each other")
        return None
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if tokenizer.is_dir():
            tokenizer = tokenizer_file(tokenizer) or tokenizer / "tokenizer.model"
        if not tokenizer.is_file():
            raise UserError(f"{tokenizer}: not found (--tokenizer)")
        return tokenizer
    found = tokenizer_file(input_dir) or tokenizer_file(input_dir.parent)
    if found is None:
        raise UserError(f"{input_dir}: no tokenizer.model or tokenizer.json in it or beside it; "
                        "put Meta's there, or pass --tokenizer PATH (or --no-tokenizer: score "
                        "and train --init then refuse the model)")
    return found


# --- writing ----------------------------------------------------------------------------------


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
    torch = require_torch()

    directory = Path(directory)
    params_json = meta_params_json(config)
    sizes = sizes_for(config, config.vocab_size)
    entries = file_order(config.replace(tie_embeddings=False), "meta")
    for w, _, key in entries:
        shape = layout_shape(w.meta_layout, sizes)
        if w.split and shape[w.split[0]] % n_shards:
            raise UserError(f"{key} {list(shape)} cannot be split evenly into {n_shards} shards "
                            f"along axis {w.split[0]}, as Meta's model-parallel layers need "
                            "(try --shards 1)")
    for s in progress(range(n_shards), desc="export", unit="shard"):
        shard = {}
        for w, layer, key in entries:
            source = WEIGHTS[0] if config.tie_embeddings and w.ours == "output/kernel" else w
            x = extract(params, source, layer, w.meta_layout, sizes)
            if w.split:
                x = np.split(x, n_shards, axis=w.split[0])[s]
            x = np.array(x, copy=True)  # its own storage: torch.save writes whole storages
            shard[key] = _to_torch(x)
        torch.save(shard, directory / f"consolidated.{s:02d}.pth")
        del shard
    write_json(directory / "params.json", params_json)


def _to_torch(x: np.ndarray):
    torch = require_torch()

    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)
