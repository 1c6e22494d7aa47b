"""Hugging Face's layout: config.json (transformers 4.x or 5.x) + safetensors (single or sharded
with an index) + tokenizer files, for LlamaForCausalLM (reference/lima-and-llama.md §5.3-5.4)."""

from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tokenizers import AddedToken

from limajax.config import ModelConfig, RopeScaling
from limajax.convert.table import (  # as in meta.py: each layout names what it uses
    EOT_TEXT,
    IGNORED,
    NUMPY_DTYPES,
    WEIGHTS,
    Converted,
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
from limajax.tokenizer import (
    HF_TOKENIZER_FILE,
    TOKENIZER_FILE,
    HFTokenizerFile,
    SentencePieceFile,
    TokenSpec,
    check_fits,
    eot_id_for,
    load_pieces,
    tokenizer_file,
)


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
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no weight_map")
        return {k: input_dir / v for k, v in weight_map.items()}
    single = input_dir / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{input_dir}: no model.safetensors or model.safetensors.index.json "
                        "(limajax reads safetensors checkpoints)")
    return {}  # read the single file's own list of tensors


def _safe_open(path: Path, stack: ExitStack):
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
    added = read_json(path).get("added_tokens_decoder") or {}
    for i, token in added.items():
        if isinstance(token, dict) and token.get("content") == EOT_TEXT:
            if str(i).isdigit() and int(i) == vocab_size - 1:
                return int(i)
    return None


def read_hf(input_dir: str | Path, *, dtype: str = "float32", add_eot: bool = True,
            staging: Path | None = None, max_seq_len: int | None = None,
            no_tokenizer: bool = False) -> Converted:
    """A transformers LlamaForCausalLM checkpoint -> parameters, tensor by tensor."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise UserError(f"{input_dir}: not a directory (expected config.json + safetensors)")
    cfg = read_json(input_dir / "config.json")
    config = config_from_hf(cfg, input_dir / "config.json")
    if max_seq_len is not None:
        config = config.replace(max_seq_len=max_seq_len)
    rows = base_vocab = config.vocab_size  # rows in the checkpoint
    tokenizer = None if no_tokenizer else tokenizer_file(input_dir)
    if tokenizer is None and not no_tokenizer:
        raise UserError(f"{input_dir}: no tokenizer.model or tokenizer.json; put the model's "
                        "there, or pass --no-tokenizer (score and train --init then refuse the "
                        "model)")
    with ExitStack() as stack:
        handles = _open_hf(input_dir, stack)
        expected = source_keys(config, "hf")
        _check_hf_tensors(config, rows, handles, expected)

        pieces = None if tokenizer is None else load_pieces(tokenizer)
        bos, eos = 1, 2  # config.json's ids; missing there, the tokenizer's
        if pieces is not None:
            check_fits(pieces, rows, WEIGHTS[0].hf)
            bos, eos = pieces.bos_id, pieces.eos_id
        bos, eos = _first_id(cfg.get("bos_token_id"), bos), _first_id(cfg.get("eos_token_id"), eos)
        eot_id = _eot_in_hf(input_dir, rows)
        new_eot = eot_id is None and add_eot
        if eot_id is not None:  # exported by limajax with a new EOT: it is already there
            base_vocab = rows - 1
        elif add_eot:
            eot_id = base_vocab if pieces is None else eot_id_for(pieces, base_vocab)
        config = converted_config(config, base_vocab, eot_id, dtype)
        params = allocate(config, staging)
        sizes = sizes_for(config, rows)
        for w, layer, key in progress(expected, desc="convert", unit="tensor"):
            path, handle = handles[key]
            place(params, w, layer, handle.get_tensor(key), w.hf_layout, sizes)
    if new_eot:
        init_eot(params, config, eot_id, base_vocab)
    tokens = token_spec(config, bos, eos, eot_id, str(input_dir / "config.json"))
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


# --- writing ----------------------------------------------------------------------------------


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


def hf_tokenizer_files(pieces: SentencePieceFile | HFTokenizerFile, tokens: TokenSpec,
                       config: ModelConfig) -> tuple[dict, dict]:
    """tokenizer_config.json and special_tokens_map.json, as transformers' save_pretrained of a
    Llama tokenizer writes them, EOT declared as a special token (so transformers encodes its
    text as EOT's id and `skip_special_tokens` drops it). The class is the generic fast one:
    transformers then loads tokenizer.json as it is, where LlamaTokenizer would rebuild its own
    pre-tokenizer (which splits runs of spaces unlike SentencePiece)."""

    def special(text):
        return {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    ids = {"unk_token": pieces.unk_id, "bos_token": tokens.bos_id, "eos_token": tokens.eos_id}
    names = {k: pieces.piece(i) for k, i in ids.items() if i is not None and 0 <= i < pieces.size}
    added = {str(ids[k]): special(text) for k, text in names.items()}
    # BOS is added by tokenizer.json's post-processor (ours for SentencePiece, Llama 3's own).
    out = {"tokenizer_class": "PreTrainedTokenizerFast",
           "add_bos_token": tokens.bos_id is not None, "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "pad_token": None,
           "model_max_length": config.max_seq_len, **names}
    special_map = {k: special(text) for k, text in names.items()}
    if tokens.eot_id is not None:
        eot = pieces.piece(tokens.eot_id) if tokens.eot_id < pieces.size else EOT_TEXT
        added[str(tokens.eot_id)] = special(eot)
        out["additional_special_tokens"] = special_map["additional_special_tokens"] = [eot]
        out["chat_template"] = dialogue_template(eot)
    out["added_tokens_decoder"] = added
    return out, special_map


def dialogue_template(eot: str) -> str:
    """A chat template (Jinja, for transformers' apply_chat_template and vLLM) that renders a
    conversation as limajax's dialogue format (LIMA §3): BOS, then every utterance followed by
    EOT; the assistant answers next, so a generation prompt adds nothing. No spaces between
    them: the exported tokenizer.json puts SentencePiece's dummy prefix before each text
    between special tokens, as limajax encodes each utterance. LIMA has no system turn: system
    messages go before the first user turn, then a blank line, as `limajax serve` does."""
    return (
        "{%- set system = messages | selectattr('role', 'equalto', 'system')"
        " | map(attribute='content') | join('\\n\\n') -%}"
        "{{- bos_token -}}"
        "{%- for m in messages | rejectattr('role', 'equalto', 'system') -%}"
        "{%- if loop.first and system -%}{{- system + '\\n\\n' -}}{%- endif -%}"
        f"{{{{- m['content'] + {json.dumps(eot)} -}}}}"
        "{%- endfor -%}")


def write_tokenizer(directory: Path, tokenizer: Path, tokens: TokenSpec, config: ModelConfig
                    ) -> None:
    """What transformers' AutoTokenizer, vLLM and TGI load with neither sentencepiece nor
    protobuf installed: tokenizer.json (built from a SentencePiece model, which is copied too,
    for llama.cpp's converter and sentencepiece users; Llama 3's own), tokenizer_config.json and
    special_tokens_map.json. A new EOT (past the file's pieces) is an added special token."""
    pieces = load_pieces(tokenizer)
    if isinstance(pieces, SentencePieceFile):
        shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)
        fast = pieces.fast()
    else:
        fast = pieces.tok
    if tokens.eot_id is not None and tokens.eot_id == pieces.size:
        fast.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    fast.save(str(directory / HF_TOKENIZER_FILE))
    config_json, special_map = hf_tokenizer_files(pieces, tokens, config)
    write_json(directory / "tokenizer_config.json", config_json)
    write_json(directory / "special_tokens_map.json", special_map)


def write_hf(directory: str | Path, params: dict, config: ModelConfig, tokens: TokenSpec,
             tokenizer: str | Path | None = None, *, max_shard_bytes: int = 5 << 30) -> None:
    """A transformers checkpoint (safetensors, sharded with an index past `max_shard_bytes`,
    config.json, generation_config.json, tokenizer) in an existing directory."""
    directory = Path(directory)
    sizes = sizes_for(config, config.vocab_size)
    itemsize = np.dtype(NUMPY_DTYPES[config.param_dtype]).itemsize
    shards, size = [[]], 0
    for entry in file_order(config, "hf"):
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
        tensors = {key: extract(params, w, layer, w.hf_layout, sizes) for w, layer, key in
                   progress(shard, desc=f"export {name}", unit="tensor")}
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(directory / "model.safetensors.index.json", index)
    write_json(directory / "config.json", hf_config(config, tokens))
    write_json(directory / "generation_config.json", hf_generation_config(tokens))
    if tokenizer is not None:
        write_tokenizer(directory, Path(tokenizer), tokens, config)
