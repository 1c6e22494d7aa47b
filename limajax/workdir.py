"""Training workdirs (DESIGN §3): what `limajax train` writes and `--workdir W --epoch N` reads.

    config.json     the resolved run config (a workdir belongs to one run)
    tokenizer.model the run's tokenizer (or tokenizer.json) and tokens.json, copied in when the
    tokens.json     run starts, so `--workdir W --epoch N` needs nothing outside W (review R6)
    metrics.jsonl   one JSON object per logged step
    tensorboard/    the same metrics as TensorBoard events
    curves.png      loss and learning rate per step, dev perplexity per epoch (each epoch's end)
    checkpoints/    an Orbax CheckpointManager: one checkpoint per epoch (plus any every-N-steps
                    ones), each the TrainState and a JSON item with the data position, the
                    epoch and the run config

All checkpoints are kept by default: LIMA §3 picks one among epochs 5-10 by hand. Saves are
asynchronous; Orbax writes each into a temporary directory and renames it when complete, so a
save cut short by a crash is never mistaken for a checkpoint (and the leftover is cleaned up on
the next start).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from limajax.config import TrainConfig
from limajax.errors import UserError
from limajax.files import (
    append_jsonl,
    damaged_is_one_line,
    error_reason,
    quiet_orbax,
    read_json,
    read_jsonl,
    staged_path,
    write_json,
    write_jsonl,
)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CHECKPOINTS_DIR = "checkpoints"


# --- config.json ---------------------------------------------------------------------------------


def read_config(workdir: str | Path) -> TrainConfig:
    """The resolved TrainConfig a training workdir was run with."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{workdir}: no {CONFIG_FILE} (not a limajax training workdir)")
    return TrainConfig.from_dict(read_json(path))


def write_config(workdir: str | Path, config: TrainConfig) -> None:
    write_json(Path(workdir) / CONFIG_FILE, config.to_dict())


# What a resumed run may change: how it is run and recorded, not what it learns (review R5).
BOOKKEEPING = ("mesh", "save_every_steps", "log_every_steps", "max_to_keep")


def check_config(workdir: str | Path, config: TrainConfig) -> None:
    """A workdir belongs to one run: resuming with a different recipe is refused. Bookkeeping
    may change (checkpoints restore onto any mesh), and paths are compared resolved (./x, x/
    and /abs/x are one)."""
    workdir = Path(workdir)
    path = workdir / CONFIG_FILE
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"{workdir}: not a directory (--workdir)")
    if not path.exists():
        if (workdir / CHECKPOINTS_DIR).exists() and any((workdir / CHECKPOINTS_DIR).iterdir()):
            raise UserError(f"{workdir}: holds checkpoints but no {CONFIG_FILE}; "
                            "use a new --workdir")
        return
    try:
        old = TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, UserError) as e:
        raise UserError(f"{path}: not a limajax run config ({e}); use a new --workdir") from None
    old_d, new_d = _comparable(old), _comparable(config)
    diffs = [k for k in sorted(set(old_d) | set(new_d)) if old_d.get(k) != new_d.get(k)]
    if diffs:
        k = diffs[0]
        raise UserError(f"{workdir} holds another run's checkpoints ({k}: {old_d.get(k)!r} there, "
                        f"{new_d.get(k)!r} here{' and more' if len(diffs) > 1 else ''}); to "
                        "resume, give the same values; to start a new run, use a new --workdir")


def _comparable(config: TrainConfig) -> dict:
    return {k: v for k, v in _flat(resolved_paths(config).to_dict()).items()
            if k not in BOOKKEEPING}


def resolved_paths(config: TrainConfig) -> TrainConfig:
    """`config` with its paths absolute and normalised, as config.json records them: the run
    then means the same from any working directory."""
    def resolve(p):
        return None if p is None else str(Path(p).resolve())

    return dataclasses.replace(config, init=resolve(config.init),
                               tokenizer=resolve(config.tokenizer),
                               data=dataclasses.replace(config.data,
                                                        path=resolve(config.data.path)))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --- metrics.jsonl and TensorBoard ----------------------------------------------------------------


def read_metrics(workdir: str | Path) -> list[dict]:
    """Every record of a workdir's metrics.jsonl, in order."""
    return [row for _, _, row in read_jsonl(Path(workdir) / METRICS_FILE)]


def truncate_metrics(workdir: str | Path, step: int) -> None:
    """Keep the metrics of steps <= `step` (a resumed run repeats the ones after it)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return
    write_jsonl(path, [row for row in read_metrics(workdir) if row["step"] <= step])


def tensorboard_writer(workdir: str | Path, step: int):
    from tensorboardX import SummaryWriter

    # purge_step drops events a killed run wrote past the checkpoint we resume from.
    return SummaryWriter(str(Path(workdir) / "tensorboard"),
                         purge_step=step + 1 if step else None)


def log_metrics(workdir: str | Path, writer, record: dict) -> None:
    """Append a record to metrics.jsonl and TensorBoard (dev_* values under dev/)."""
    append_jsonl(Path(workdir) / METRICS_FILE, record)
    if writer is not None:
        for k, v in record.items():
            if k not in ("step", "epoch") and v is not None and math.isfinite(v):
                tag = f"dev/{k[4:]}" if k.startswith("dev_") else f"train/{k}"
                writer.add_scalar(tag, v, record["step"])


def plot_curves(workdir: str | Path) -> Path:
    """curves.png: training loss per step, the learning rate, and dev perplexity per epoch if
    the run has a dev split, from metrics.jsonl, so a user can look rather than read."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    steps = [r for r in rows if "loss" in r]
    dev = [r for r in rows if r.get("dev_ppl") is not None]
    panels = 3 if dev else 2
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.4 * panels), constrained_layout=True)
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
    axes[0].set(ylabel="training loss", title=f"{Path(workdir).resolve().name}: loss per step")
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=1, color="tab:orange")
    axes[1].set(xlabel="step", ylabel="learning rate")
    if dev:
        axes[2].plot([r["epoch"] for r in dev], [r["dev_ppl"] for r in dev], "o-",
                     color="tab:green")
        axes[2].set(xlabel="epoch", ylabel="dev perplexity")
        axes[2].xaxis.get_major_locator().set_params(integer=True)
    path = Path(workdir) / CURVES_FILE
    with staged_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


# --- checkpoints/ ---------------------------------------------------------------------------------


def checkpoint_manager(workdir: str | Path, max_to_keep: int | None = None
                       ) -> ocp.CheckpointManager:
    """The CheckpointManager of a training workdir (its directory is created on first save;
    saves are asynchronous)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINTS_DIR, options=options)


def save_state(manager: ocp.CheckpointManager, state, meta: dict) -> None:
    """Start an asynchronous save of a TrainState with `meta` (step, data position, epoch,
    config). A failure of the save before it (Orbax reports it here) is `SaveFailed`."""
    with save_failure_is_one_line(manager):
        manager.save(meta["step"], args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()), meta=ocp.args.JsonSave(meta)))


def check_saves(manager: ocp.CheckpointManager) -> None:
    """`SaveFailed` if an asynchronous save has failed since the last check (a full disk, any
    I/O error): cheap, and it never waits for a save still running. The loop calls it whenever
    metrics reach the host, so a failed save stops training at once, not an epoch later."""
    if not manager.is_saving_in_progress():
        finish_saves(manager)


def finish_saves(manager: ocp.CheckpointManager) -> None:
    """Wait for the saves in flight; a failed one is `SaveFailed`."""
    with save_failure_is_one_line(manager):
        manager.wait_until_finished()


class SaveFailed(UserError):
    """A checkpoint could not be written; the half-written one is removed, the ones before are
    intact, and rerunning (after making space) resumes from the last of them."""


@contextlib.contextmanager
def save_failure_is_one_line(manager: ocp.CheckpointManager):
    """Orbax and TensorStore raise ValueError, OSError or their own types (one per array that
    failed, from background threads) when a save fails: one `SaveFailed` naming the
    checkpoint, the reason (and for a full disk how much a checkpoint takes and how much is
    free), and the checkpoint a rerun resumes from."""
    quiet_orbax()
    try:
        yield
    except SaveFailed:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the save is reported the same way
        directory = Path(manager.directory)
        partial = sorted(directory.glob(f"*{_TMP_SUFFIX}*"))
        for path in partial:  # Orbax would remove them on the next start; nothing half-written
            shutil.rmtree(path, ignore_errors=True)  # is left now
        manager.reload()
        good = manager.latest_step()
        where = partial[0].name.split(_TMP_SUFFIX)[0] if partial else "a new checkpoint"
        raise SaveFailed(
            f"{directory / where}: the checkpoint could not be saved ({_save_reason(e)}"
            + (f"; a checkpoint takes about {_megabytes(_size(directory / str(good)))}, "
               f"{_megabytes(shutil.disk_usage(directory).free)} is free there"
               if good is not None and _NO_SPACE in str(e) else "")
            + "); training stopped; " + (
                "no checkpoint was saved before it" if good is None else
                f"the last good checkpoint is step {good}")
            + "; rerun the same command (after making space) to "
            + ("start again" if good is None else "resume from it")) from None


_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_NO_SPACE = os.strerror(errno.ENOSPC)


def _save_reason(error: BaseException) -> str:
    """The OS's words for an I/O error (TensorStore puts the errno in its message), else the
    first line of the message."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"\[os_error_code='(\d+)'\]", str(error))
    if code:
        return os.strerror(int(code.group(1)))
    return error_reason(error)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state):
    """(TrainState, meta) of checkpoint `step`, placed by the shardings in `abstract_state`
    (any mesh: a checkpoint written on 2x4 restores onto 4x2 or one device). A damaged
    checkpoint is a UserError naming what is wrong with it."""
    # Explicit abstract targets: a bare restore() in a fresh manager restores nothing.
    restored = _restore(manager, step, ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state._asdict()),
        meta=ocp.args.JsonRestore()))
    return type(abstract_state)(**restored["state"]), restored["meta"]


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """(TrainState, meta, {step: UserError} for each newer checkpoint that is damaged) of the
    newest checkpoint that restores, or None if there is none: one damaged file costs an epoch,
    not the run (newcomer F3)."""
    damaged = {}
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return (*restore_state(manager, step, abstract_state), damaged)
        except UserError as e:
            damaged[step] = e
    if damaged:
        raise UserError(f"{list(damaged.values())[-1]}; no checkpoint in {manager.directory} "
                        "restores (move the directory away to start again)")
    return None


def set_aside(manager: ocp.CheckpointManager, steps, *, lead: bool) -> list[Path]:
    """Rename damaged checkpoints to `STEP.damaged` (kept for inspection, invisible to Orbax):
    Orbax never saves a step it already holds, so a resumed run would otherwise train the
    epoch again and keep the damaged checkpoint in place of it."""
    moved = []
    for step in steps:
        where = Path(manager.directory) / str(step)
        target, n = where.with_name(f"{step}.damaged"), 1
        while target.exists():
            target, n = where.with_name(f"{step}.damaged.{n}"), n + 1
        if lead:
            where.rename(target)
        moved.append(target)
    multihost_utils.sync_global_devices("limajax: damaged checkpoints set aside")
    manager.reload()
    return moved


# The files a complete checkpoint has besides its array data; Orbax's own errors for a missing
# one are a pytree or KeyError traceback that names none of them.
_REQUIRED = ("state/_METADATA", "meta/metadata")


def _restore(manager: ocp.CheckpointManager, step: int, args, required=_REQUIRED):
    where = Path(manager.directory) / str(step)
    for name in required:
        if not (where / name).is_file():
            raise UserError(f"{where}: damaged checkpoint ({name} is missing)")
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)  # Orbax logs each failed read as an error before raising
    try:
        with damaged_is_one_line(f"{where}: damaged checkpoint"):
            return manager.restore(step, args=args)
    finally:
        absl.setLevel(level)


def checkpoints(workdir: str | Path) -> list[dict]:
    """The meta of every complete checkpoint in a workdir, oldest first (a damaged one's meta
    may be unreadable: it is left out)."""
    return _scan(workdir)[0]


def _scan(workdir: str | Path) -> tuple[list[dict], list[UserError]]:
    metas, damaged = [], []
    with checkpoint_manager(workdir) as manager:
        for step in manager.all_steps():
            try:
                metas.append(_restore(manager, step, ocp.args.Composite(
                    meta=ocp.args.JsonRestore()), required=("meta/metadata",))["meta"])
            except UserError as e:
                damaged.append(e)
    return metas, damaged


def epoch_step(workdir: str | Path, epoch: int) -> int:
    """The step of the checkpoint that ends `epoch` (1-based), for `--workdir W --epoch N`."""
    metas, damaged = _scan(workdir)
    for meta in metas:
        if meta.get("end_of_epoch") and meta["epoch"] == epoch:
            return meta["step"]
    have = sorted(m["epoch"] for m in metas if m.get("end_of_epoch"))
    raise UserError(f"{workdir}: no checkpoint for epoch {epoch} "
                    f"(epochs saved: {', '.join(map(str, have)) or 'none'})"
                    + "".join(f"; {e}" for e in damaged))


def restore_epoch_params(workdir: str | Path, epoch: int, abstract_params):
    """Only the parameters of the checkpoint ending `epoch` (for score/sample/serve/export),
    restored into `abstract_params` (ShapeDtypeStructs with shardings)."""
    step = epoch_step(workdir, epoch)
    with checkpoint_manager(workdir) as manager:
        restored = _restore(manager, step, ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                {"params": abstract_params},
                restore_args={"params": ocp.checkpoint_utils.construct_restore_args(
                    abstract_params)},
                partial_restore=True)))
    return restored["state"]["params"]
