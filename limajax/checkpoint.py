"""Model directories (DESIGN §3), and loading a model from one or from a training epoch.

A model directory is what `convert` writes and `score`/`train --init`/`export` read:

    params/          Orbax checkpoint of the parameter tree (nnx.Param state as a pure dict)
    model.json       ModelConfig.to_dict()
    tokenizer.model  the SentencePiece model, or tokenizer.json (Hugging Face's, as Llama 3's);
                     absent only if the source had none
    tokens.json      bos/eos/eot ids and vocabulary sizes (limajax.tokenizer owns the format)

Directories are built beside their destination and renamed into place when complete
(files.staged_dir), so an interrupted run never leaves something that looks finished.

`load_for_inference(source, mesh, epoch=None)` is the one way to get a model to run: a model
directory, or a training workdir's epoch (DESIGN §3), placed on a mesh, with its tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization.type_handler_registry import (
    create_type_handler_registry,
)

from limajax.config import ModelConfig, TrainConfig
from limajax.errors import UserError
from limajax.files import damaged_is_one_line, read_json, staged_dir, write_json
from limajax.model import Llama
from limajax.sharding import abstract_params, model_from_params, replication_notices
from limajax.tokenizer import (
    TOKENIZER_FILES,
    TOKENS_FILE,
    Tokenizer,
    TokenSpec,
    load_from,
    save_to,
    tokenizer_file,
)
from limajax.workdir import read_config, restore_epoch_params

PARAMS_DIR = "params"
MODEL_FILE = "model.json"

# Orbax's defaults hold a whole array in anonymous memory while writing it: NumpyHandler
# deep-copies host arrays, and the OCDBT driver buffers every chunk until the commit (measured:
# 2 GiB peak for a 1 GiB memmap). Without the copy, without OCDBT and with 16 MiB chunks, a
# memmap-backed array streams from the page cache to disk (~0.13 GiB peak for the same array),
# which is what lets `convert` stay near one tensor of memory (tools/bench_convert.py).
CHUNK_BYTES = 16 << 20


# --- the params checkpoint ----------------------------------------------------------------------


def _checkpointer() -> ocp.Checkpointer:
    registry = create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False)
    return ocp.Checkpointer(handler)


class _NoOcdbtMergeNotice(logging.Filter):
    """Orbax warns that a checkpoint written without OCDBT has no OCDBT parts to merge: true,
    and what we asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


def save_params(path: str | Path, params) -> None:
    """Write a tree of numpy (memmaps welcome) or jax arrays as an Orbax checkpoint at `path`."""
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
    quiet, logger = _NoOcdbtMergeNotice(), logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        _checkpointer().save(Path(path).absolute(),
                             args=ocp.args.PyTreeSave(params, save_args=save_args))
    finally:
        logger.removeFilter(quiet)


def restore_params(path: str | Path, abstract):
    """Restore the tree at `path` into `abstract` (ShapeDtypeStructs with shardings)."""
    path = Path(path).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path).item_metadata.tree
        _check_stored(stored, abstract, path)
        with damaged_is_one_line(f"{path}: damaged parameters"):
            return ckptr.restore(path, abstract)


def _check_stored(stored, expected, path: Path) -> None:
    """Name the first parameter whose stored shape differs from what model.json implies."""
    flat_stored = {jax.tree_util.keystr(k): v for k, v in
                   jax.tree_util.tree_leaves_with_path(stored)}
    for key, want in jax.tree_util.tree_leaves_with_path(expected):
        name = jax.tree_util.keystr(key)
        have = flat_stored.pop(name, None)
        if have is None:
            raise UserError(f"{path}: parameter {name} is missing (model.json expects "
                            f"shape {list(want.shape)})")
        if tuple(have.shape) != tuple(want.shape):
            raise UserError(f"{path}: parameter {name} has shape {list(have.shape)}, model.json "
                            f"expects {list(want.shape)}")
    if flat_stored:
        raise UserError(f"{path}: unexpected parameters {sorted(flat_stored)} (not in a model "
                        "described by model.json)")


# --- model directories --------------------------------------------------------------------------


def write_model_dir(directory: str | Path, params, config: ModelConfig, tokens: TokenSpec,
                    tokenizer: str | Path | None = None) -> None:
    """Fill an existing, empty directory (usually from `staged_dir`) with a model directory."""
    directory = Path(directory)
    if tokens.vocab_size != config.vocab_size or (
            tokens.padded_vocab_size != config.padded_vocab_size):
        raise ValueError(f"tokens {tokens} disagree with the config's vocabulary "
                         f"{config.vocab_size}/{config.padded_vocab_size}")
    save_params(directory / PARAMS_DIR, params)
    write_json(directory / MODEL_FILE, config.to_dict())
    save_to(directory, tokenizer, tokens)


def save_model_dir(model_dir: str | Path, params, config: ModelConfig, tokens: TokenSpec,
                   tokenizer: str | Path | None = None, *, overwrite: bool = False,
                   command: str) -> Path:
    """Write a complete model directory atomically (see module docstring); `command` is what
    the directory records as having made it (files.staged_dir)."""
    with staged_dir(model_dir, command=command, overwrite=overwrite) as tmp:
        write_model_dir(tmp, params, config, tokens, tokenizer)
    return Path(model_dir)


def read_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / MODEL_FILE
    if not Path(model_dir).is_dir():
        raise UserError(f"{model_dir}: not a directory (expected a limajax model directory)")
    if not path.is_file():
        raise UserError(f"{path}: not found (is {model_dir} a limajax model directory?)")
    try:
        return ModelConfig.from_dict(read_json(path))
    except TypeError as e:
        raise UserError(f"{path}: {e}") from None


def load_model_dir(model_dir: str | Path, mesh: jax.sharding.Mesh | None = None):
    """(params, ModelConfig, TokenSpec) of a model directory, placed by the sharding table on
    `mesh` (None: everything on the first device). Arrays are restored straight into their
    shards, so a big model never exists whole on one device."""
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    tokens, _ = load_from(model_dir)
    if (tokens.vocab_size, tokens.padded_vocab_size) != (config.vocab_size,
                                                         config.padded_vocab_size):
        raise UserError(f"{model_dir / TOKENS_FILE}: vocab_size {tokens.vocab_size} / "
                        f"padded {tokens.padded_vocab_size} disagree with {MODEL_FILE} "
                        f"({config.vocab_size} / {config.padded_vocab_size})")
    params_dir = model_dir / PARAMS_DIR
    if not params_dir.is_dir():
        raise UserError(f"{params_dir}: not found (is {model_dir} a limajax model directory?)")
    return restore_params(params_dir, abstract_params(config, mesh)), config, tokens


def run_tokens(run: TrainConfig, where: str | Path) -> tuple[TokenSpec, Path | None]:
    """The token ids and tokenizer file a training run uses: its --init model directory's, or
    its --tokenizer plus LIMA's EOT for a random model. `where` names the run in errors."""
    if run.init is not None:
        return load_from(run.init)
    if run.tokenizer is None:
        raise UserError(f"{where}: the run names no tokenizer")
    tokenizer = Tokenizer.from_path(run.tokenizer).with_eot()
    return tokenizer.spec, tokenizer.path


def load_model(source: str | Path, mesh: jax.sharding.Mesh | None = None, *,
               epoch: int | None = None):
    """(params, ModelConfig, TokenSpec, tokenizer file or None) of a model directory, or,
    with `epoch`, of the checkpoint ending that epoch in a training workdir (DESIGN §3: wherever
    a model directory is accepted, a workdir plus --epoch N is too), placed as load_model_dir
    places them."""
    if epoch is None:
        params, config, tokens = load_model_dir(source, mesh)
        return params, config, tokens, tokenizer_file(source)  # tokens.json read above
    run = read_config(source)
    params = restore_epoch_params(source, epoch, abstract_params(run.model, mesh))
    # The tokenizer copied into the workdir (R6); a workdir from before that: the run's.
    return params, run.model, *(load_from(source, required=False) or
                                run_tokens(run, Path(source) / "config.json"))


def load_for_inference(source: str | Path, mesh: jax.sharding.Mesh, *,
                       epoch: int | None = None) -> tuple[Llama, Tokenizer]:
    """A model directory (or a workdir's `epoch`) as a model placed on `mesh` by the sharding
    table, restored straight into its shards, with its tokenizer: what score, sample, chat and
    serve run. Each parameter dimension the mesh does not divide is named on stderr."""
    params, config, tokens, tokenizer_file = load_model(source, mesh, epoch=epoch)
    if tokenizer_file is None:
        raise UserError(f"{source}: no tokenizer ({' or '.join(TOKENIZER_FILES)}) to turn text "
                        "into ids")
    for line in replication_notices(config, mesh):  # never silent (review R3)
        print(line, file=sys.stderr)
    return model_from_params(config, params, mesh), Tokenizer.from_path(tokenizer_file, tokens)


def save_epoch_model_dir(workdir: str | Path, epoch: int, output: str | Path, *,
                         overwrite: bool = False, command: str) -> Path:
    """A model directory (the format `convert` writes) from the checkpoint ending `epoch`."""
    params, config, tokens, tokenizer = load_model(workdir, epoch=epoch)
    return save_model_dir(output, jax.device_get(params), config, tokens, tokenizer,
                          overwrite=overwrite, command=command)


# --- a training run's starting point (`train --init`) ---------------------------------------------

# The fields that make two model configs the same network; dtype, remat and the vocabulary
# padding are the run's choice.
ARCHITECTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "norm_eps",
                "rope_theta", "rope_scaling", "tie_embeddings")


def resolve_init(config: TrainConfig):
    """(config with the model's vocabulary settled, tokenizer, init-params loader or None).

    With `init`, the model directory's config must agree with the recipe's architecture; its
    vocabulary (LIMA's EOT included) and tokenizer are used. Without, the recipe's model is
    initialised at random for `tokenizer` plus EOT.
    """
    if config.init is None:
        if config.tokenizer is None:
            raise UserError("a random model needs a tokenizer: --set tokenizer=PATH/tokenizer."
                            "model, or start from a converted model with --init MODEL_DIR")
        tokenizer = Tokenizer.from_path(config.tokenizer).with_eot()
        model = config.model.replace(vocab_size=tokenizer.vocab_size)
        return dataclasses.replace(config, model=model), tokenizer, None
    stored = read_model_config(config.init)
    for name in ARCHITECTURE:
        if getattr(stored, name) != getattr(config.model, name):
            raise UserError(
                f"--init {config.init}: its model.json has {name} = {getattr(stored, name)!r} "
                f"but the recipe's model has {getattr(config.model, name)!r}; pick the recipe "
                "for that model")
    tokens, path = load_from(config.init)
    if path is None:
        raise UserError(f"--init {config.init}: the model directory has no tokenizer "
                        f"({' or '.join(TOKENIZER_FILES)})")
    if tokens.eot_id is None:
        raise UserError(f"--init {config.init}: the model has no EOT token (LIMA §3); convert "
                        "it with --add-eot")
    model = config.model.replace(vocab_size=stored.vocab_size,
                                 vocab_multiple=stored.vocab_multiple)
    if model.padded_vocab_size != stored.padded_vocab_size:
        raise UserError(f"--init {config.init}: padded vocabulary {stored.padded_vocab_size} "
                        f"differs from the recipe's {model.padded_vocab_size}")
    config = dataclasses.replace(config, model=model)

    def init_params(mesh):
        params, _, _ = load_model_dir(config.init, mesh)
        # e.g. a model directory converted to bfloat16: train on float32 master weights.
        return jax.tree.map(lambda p: p.astype(config.model.param_dtype), params)

    return config, Tokenizer.from_path(path, tokens), init_params
