"""Orbax on disk: params-only model directories (DESIGN §3).

A model directory is what `convert` writes and `sample`/`serve`/`train --init`/`export` read:

    params/          Orbax checkpoint of the parameter tree (nnx.Param state as a pure dict)
    model.json       ModelConfig.to_dict()
    tokenizer.model  the SentencePiece model (absent only if the source had none)
    tokens.json      bos/eos/eot ids and vocabulary sizes (limajax.tokenizer owns the format)

Directories are built beside their destination and renamed into place when complete
(`staged_dir`), so an interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint._src.serialization.type_handler_registry import (
    create_type_handler_registry,
)

from limajax.config import ModelConfig, read_json
from limajax.errors import UserError
from limajax.tokenizer import (
    TOKENIZER_FILE,
    TOKENS_FILE,
    TokenSpec,
    read_tokens_json,
    write_tokens_json,
)

PARAMS_DIR = "params"
MODEL_FILE = "model.json"

# Orbax's defaults hold a whole array in anonymous memory while writing it: NumpyHandler
# deep-copies host arrays, and the OCDBT driver buffers every chunk until the commit (measured:
# 2 GiB peak for a 1 GiB memmap). Without the copy, without OCDBT and with 16 MiB chunks, a
# memmap-backed array streams from the page cache to disk (~0.13 GiB peak for the same array),
# which is what lets `convert` stay near one tensor of memory (tools/bench_convert.py).
CHUNK_BYTES = 16 << 20


# --- writing directories atomically -----------------------------------------------------------


OUTPUT_MARKER = ".limajax-output.json"  # {"command": ...}: which command made a directory


def check_replaceable(final: str | Path, *, overwrite: bool, command: str) -> None:
    """An existing `final` may be replaced only with `overwrite`, and only if it is empty or an
    earlier run of the same `command` made it (its OUTPUT_MARKER says so), so a mistyped
    --output or --workdir never deletes someone's files (newcomer F1)."""
    final = Path(final)
    if not (final.exists() or final.is_symlink()):
        return
    if not overwrite:
        raise UserError(f"{final}: already exists (pass --overwrite to replace it)")
    if not final.is_dir() or final.is_symlink() or (
            any(final.iterdir()) and made_by(final) != command):
        raise UserError(f"{final}: refusing to replace it: it is not an earlier output of "
                        f"`limajax {command}` (delete it yourself if you mean to)")


def made_by(directory: Path) -> str | None:
    """The command recorded in a directory's OUTPUT_MARKER, or None."""
    try:
        return json.loads((directory / OUTPUT_MARKER).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def mark_output(directory: str | Path, command: str) -> None:
    (Path(directory) / OUTPUT_MARKER).write_text(json.dumps({"command": command}) + "\n")


def share_like_umask(root: Path) -> None:
    """Give a finished output the permissions the user's umask gives new files: mkdtemp and
    some writers (safetensors) create owner-only ones, which others on a cluster cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            (Path(parent) / name).chmod(0o777 & ~umask)
        for name in files:
            (Path(parent) / name).chmod(0o666 & ~umask)


@contextlib.contextmanager
def staged_dir(final: str | Path, *, overwrite: bool = False, command: str) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; rename it to `final` on success.

    On any error the temporary directory is removed and `final` is untouched. An existing
    `final` is replaced only as `check_replaceable` allows; the new directory records
    `command` so a later --overwrite of the same command may replace it.
    """
    final = Path(final)
    check_replaceable(final, overwrite=overwrite, command=command)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        mark_output(tmp, command)
        share_like_umask(tmp)
        if final.exists():
            # Move the old output aside first: at every instant one complete directory exists.
            old = tmp.with_suffix(".old")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    (directory / MODEL_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    write_tokens_json(directory / TOKENS_FILE, tokens)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)


def save_model_dir(model_dir: str | Path, params, config: ModelConfig, tokens: TokenSpec,
                   tokenizer: str | Path | None = None, *, overwrite: bool = False,
                   command: str) -> Path:
    """Write a complete model directory atomically (see module docstring)."""
    with staged_dir(model_dir, overwrite=overwrite, command=command) as tmp:
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


def tokenizer_path(model_dir: str | Path) -> Path | None:
    """The model directory's tokenizer.model, or None if it was converted without one."""
    path = Path(model_dir) / TOKENIZER_FILE
    return path if path.is_file() else None


def load_model_dir(model_dir: str | Path, shardings=None):
    """(params, ModelConfig, TokenSpec) of a model directory.

    `shardings`: None (everything on the first device), a Mesh (the sharding table's layout on
    it), or a tree of jax Shardings shaped like the params. Arrays are restored straight into
    their shards, so a big model never exists whole on one device.
    """
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    tokens = read_tokens_json(model_dir / TOKENS_FILE)
    if (tokens.vocab_size, tokens.padded_vocab_size) != (config.vocab_size,
                                                         config.padded_vocab_size):
        raise UserError(f"{model_dir / TOKENS_FILE}: vocab_size {tokens.vocab_size} / "
                        f"padded {tokens.padded_vocab_size} disagree with {MODEL_FILE} "
                        f"({config.vocab_size} / {config.padded_vocab_size})")
    params_dir = model_dir / PARAMS_DIR
    if not params_dir.is_dir():
        raise UserError(f"{params_dir}: not found (is {model_dir} a limajax model directory?)")
    return restore_params(params_dir, abstract_params(config, shardings)), config, tokens


def abstract_params(config: ModelConfig, shardings=None) -> dict:
    """Restore targets: the params' ShapeDtypeStructs placed as `shardings` says (None: the
    first device; a Mesh: the sharding table's layout on it; or a tree of Shardings)."""
    from limajax.sharding import abstract_model, single_device_mesh  # imports the model

    mesh = shardings if isinstance(shardings, jax.sharding.Mesh) else single_device_mesh()
    abstract = nnx.to_pure_dict(abstract_model(config, mesh)[1])
    if shardings is not None and not isinstance(shardings, jax.sharding.Mesh):
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
    return abstract


def load_model(source: str | Path, shardings=None, *, epoch: int | None = None):
    """(params, ModelConfig, TokenSpec, tokenizer.model path or None) of a model directory, or,
    with `epoch`, of the checkpoint ending that epoch in a training workdir (DESIGN §3: wherever
    a model directory is accepted, a workdir plus --epoch N is too)."""
    from limajax.tokenizer import Tokenizer

    if epoch is None:
        return (*load_model_dir(source, shardings), tokenizer_path(source))
    run = read_run_config(source)
    params = restore_epoch_params(source, epoch, abstract_params(run.model, shardings))
    if run.init is not None:  # the run started from a model directory: its ids and tokenizer
        return params, run.model, read_tokens_json(Path(run.init) / TOKENS_FILE), \
            tokenizer_path(run.init)
    if run.tokenizer is None:
        raise UserError(f"{source}/config.json: the run names no tokenizer")
    tokenizer = Tokenizer.from_path(run.tokenizer).with_eot()
    return params, run.model, tokenizer.spec, tokenizer.path


# --- training checkpoints (a workdir's checkpoints/, DESIGN §3) ---------------------------------
#
# One Orbax CheckpointManager per workdir, one checkpoint per epoch (plus any every-N-steps ones),
# all kept by default: LIMA §3 picks a checkpoint among epochs 5-10 by hand. Each holds the
# TrainState (params, optimiser state, step, base RNG key) and a JSON item with the data
# position, the epoch and the resolved run config. Saves are asynchronous; Orbax writes each
# into a temporary directory and renames it when complete, so a save cut short by a crash is
# never mistaken for a checkpoint (and the leftover is cleaned up on the next start).

CHECKPOINTS_DIR = "checkpoints"


def train_manager(workdir: str | Path, max_to_keep: int | None = None, *,
                  async_save: bool = True) -> ocp.CheckpointManager:
    """The CheckpointManager of a training workdir (its directory is created on first save)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINTS_DIR, options=options)


def _state_tree(state) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": state.rng}


def save_train_state(manager: ocp.CheckpointManager, state, meta: dict) -> None:
    """Start an asynchronous save of `state` with `meta` (step, data position, epoch, config)."""
    manager.save(meta["step"], args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_tree(state)), meta=ocp.args.JsonSave(meta)))


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_state):
    """(TrainState, meta) of checkpoint `step`, placed by the shardings in `abstract_state`
    (any mesh: a checkpoint written on 2x4 restores onto 4x2 or one device)."""
    # Explicit abstract targets: a bare restore() in a fresh manager restores nothing.
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_state_tree(abstract_state)),
        meta=ocp.args.JsonRestore()))
    tree = restored["state"]
    state = type(abstract_state)(tree["step"], tree["params"], tree["opt_state"], tree["rng"])
    return state, restored["meta"]


def train_checkpoints(workdir: str | Path) -> list[dict]:
    """The meta of every complete checkpoint in a workdir, oldest first."""
    with train_manager(workdir) as manager:
        return [manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                for step in manager.all_steps()]


def epoch_step(workdir: str | Path, epoch: int) -> int:
    """The step of the checkpoint that ends `epoch` (1-based), for `--workdir W --epoch N`."""
    metas = train_checkpoints(workdir)
    for meta in metas:
        if meta.get("end_of_epoch") and meta["epoch"] == epoch:
            return meta["step"]
    have = sorted(m["epoch"] for m in metas if m.get("end_of_epoch"))
    raise UserError(f"{workdir}: no checkpoint for epoch {epoch} "
                    f"(epochs saved: {', '.join(map(str, have)) or 'none'})")


def restore_epoch_params(workdir: str | Path, epoch: int, abstract_params):
    """Only the parameters of the checkpoint ending `epoch` (for sample/serve/export), restored
    into `abstract_params` (ShapeDtypeStructs with shardings)."""
    step = epoch_step(workdir, epoch)
    with train_manager(workdir) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                {"params": abstract_params},
                restore_args={"params": ocp.checkpoint_utils.construct_restore_args(
                    abstract_params)},
                partial_restore=True)))
    return restored["state"]["params"]


def read_run_config(workdir: str | Path):
    """The resolved TrainConfig a training workdir was run with."""
    from limajax.config import TrainConfig

    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise UserError(f"{workdir}: no config.json (not a limajax training workdir)")
    return TrainConfig.from_dict(read_json(path))


def save_epoch_model_dir(workdir: str | Path, epoch: int, output: str | Path, *,
                         overwrite: bool = False, command: str) -> Path:
    """A model directory (the format `convert` writes) from the checkpoint ending `epoch`."""
    params, config, tokens, tokenizer = load_model(workdir, epoch=epoch)
    return save_model_dir(output, jax.device_get(params), config, tokens, tokenizer,
                          overwrite=overwrite, command=command)
