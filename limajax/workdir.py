"""Training workdirs (DESIGN §3): what `limajax train` writes and `--workdir W --epoch N` reads.

    config.json     the resolved run config (a workdir belongs to one run)
    metrics.jsonl   one JSON object per logged step
    tensorboard/    the same metrics as TensorBoard events
    checkpoints/    an Orbax CheckpointManager: one checkpoint per epoch (plus any every-N-steps
                    ones), each the TrainState and a JSON item with the data position, the
                    epoch and the run config

All checkpoints are kept by default: LIMA §3 picks one among epochs 5-10 by hand. Saves are
asynchronous; Orbax writes each into a temporary directory and renames it when complete, so a
save cut short by a crash is never mistaken for a checkpoint (and the leftover is cleaned up on
the next start).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import orbax.checkpoint as ocp

from limajax.config import TrainConfig
from limajax.errors import UserError
from limajax.files import (
    append_jsonl,
    json_line,
    read_json,
    read_jsonl,
    staged_file,
    write_json,
)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
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


def check_config(workdir: str | Path, config: TrainConfig) -> None:
    """A workdir belongs to one run: resuming with a different recipe is refused (the mesh may
    change: checkpoints restore onto any mesh)."""
    workdir = Path(workdir)
    path = workdir / CONFIG_FILE
    if not path.exists():
        if (workdir / CHECKPOINTS_DIR).exists() and any((workdir / CHECKPOINTS_DIR).iterdir()):
            raise UserError(f"{workdir}: holds checkpoints but no {CONFIG_FILE}; "
                            "use a new --workdir")
        return
    try:
        old = TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, UserError) as e:
        raise UserError(f"{path}: not a limajax run config ({e}); use a new --workdir") from None
    old_d, new_d = _flat(old.to_dict()), _flat(config.to_dict())
    diffs = [k for k in sorted(set(old_d) | set(new_d))
             if k != "mesh" and old_d.get(k) != new_d.get(k)]
    if diffs:
        k = diffs[0]
        raise UserError(f"{workdir} holds another run's checkpoints ({k}: {old_d.get(k)!r} there, "
                        f"{new_d.get(k)!r} here{' and more' if len(diffs) > 1 else ''}); use a "
                        "new --workdir")


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
    keep = [row for row in read_metrics(workdir) if row["step"] <= step]
    with staged_file(path) as f:
        f.writelines(json_line(row) for row in keep)


def tensorboard_writer(workdir: str | Path, step: int):
    from tensorboardX import SummaryWriter

    # purge_step drops events a killed run wrote past the checkpoint we resume from.
    return SummaryWriter(str(Path(workdir) / "tensorboard"),
                         purge_step=step + 1 if step else None)


def log_metrics(workdir: str | Path, writer, record: dict) -> None:
    append_jsonl(Path(workdir) / METRICS_FILE, record)
    if writer is not None:
        for k, v in record.items():
            if k not in ("step", "epoch") and v is not None and math.isfinite(v):
                writer.add_scalar(f"train/{k}", v, record["step"])


# --- checkpoints/ ---------------------------------------------------------------------------------


def checkpoint_manager(workdir: str | Path, max_to_keep: int | None = None, *,
                       async_save: bool = True) -> ocp.CheckpointManager:
    """The CheckpointManager of a training workdir (its directory is created on first save)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINTS_DIR, options=options)


def _state_tree(state) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": state.rng}


def save_state(manager: ocp.CheckpointManager, state, meta: dict) -> None:
    """Start an asynchronous save of a TrainState with `meta` (step, data position, epoch,
    config)."""
    manager.save(meta["step"], args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_tree(state)), meta=ocp.args.JsonSave(meta)))


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state):
    """(TrainState, meta) of checkpoint `step`, placed by the shardings in `abstract_state`
    (any mesh: a checkpoint written on 2x4 restores onto 4x2 or one device)."""
    # Explicit abstract targets: a bare restore() in a fresh manager restores nothing.
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_state_tree(abstract_state)),
        meta=ocp.args.JsonRestore()))
    tree = restored["state"]
    state = type(abstract_state)(tree["step"], tree["params"], tree["opt_state"], tree["rng"])
    return state, restored["meta"]


def checkpoints(workdir: str | Path) -> list[dict]:
    """The meta of every complete checkpoint in a workdir, oldest first."""
    with checkpoint_manager(workdir) as manager:
        return [manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                for step in manager.all_steps()]


def epochs(workdir: str | Path) -> list[int]:
    """The epochs (1-based) whose ending checkpoint the workdir holds."""
    return sorted(m["epoch"] for m in checkpoints(workdir) if m.get("end_of_epoch"))


def epoch_step(workdir: str | Path, epoch: int) -> int:
    """The step of the checkpoint that ends `epoch` (1-based), for `--workdir W --epoch N`."""
    metas = checkpoints(workdir)
    for meta in metas:
        if meta.get("end_of_epoch") and meta["epoch"] == epoch:
            return meta["step"]
    have = sorted(m["epoch"] for m in metas if m.get("end_of_epoch"))
    raise UserError(f"{workdir}: no checkpoint for epoch {epoch} "
                    f"(epochs saved: {', '.join(map(str, have)) or 'none'})")


def restore_epoch_params(workdir: str | Path, epoch: int, abstract_params):
    """Only the parameters of the checkpoint ending `epoch` (for score/sample/serve/export),
    restored into `abstract_params` (ShapeDtypeStructs with shardings)."""
    step = epoch_step(workdir, epoch)
    with checkpoint_manager(workdir) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                {"params": abstract_params},
                restore_args={"params": ocp.checkpoint_utils.construct_restore_args(
                    abstract_params)},
                partial_restore=True)))
    return restored["state"]["params"]
