"""Fine-tuning with LIMA's recipe (LIMA §3): one pure `train_step` and a plain epoch loop.

The loop reads top to bottom (DESIGN §2): build the state (fresh, from --init, or restored from
the workdir's latest checkpoint), then `for batch in epoch: state, metrics = train_step(state,
batch)` with logging and checkpointing inline. Dropout randomness is `fold_in(key, step)`, and
the data position is saved with every checkpoint, so a resumed run repeats the uninterrupted one
bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from limajax import optim, sharding
from limajax.config import ModelConfig, TrainConfig
from limajax.errors import UserError


class TrainState(NamedTuple):
    """Everything a step changes, plus the base RNG key (fold_in(rng, step) gives each step's)."""

    step: jax.Array  # int32 []
    params: dict  # pure dict of arrays, the model's nnx state
    opt_state: Any
    rng: jax.Array  # uint32 [2]


Batch = dict[str, Any]  # inputs, targets, positions int32 [B, T]; loss_mask float32 [B, T]
BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions")


class Loader(Protocol):
    """What the loop needs from data.py: fixed-size batches of this process's rows, by epoch."""

    steps_per_epoch: int

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]: ...


def dropout_rates(n_layers: int, top: float) -> jax.Array:
    """LIMA §3: residual dropout p = 0.0 at the bottom layer rising linearly to `top` at the
    last (Megatron-LLM's --lima_dropout: linspace(0, top, L))."""
    return jnp.linspace(0.0, top, n_layers, dtype=jnp.float32)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) per position; logits [B, T, V] float32, padded vocab at -inf."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


# --- the step -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static pieces of a run: model graph, optimiser, mesh and the shardings of everything."""

    config: TrainConfig
    mesh: Mesh
    graphdef: Any
    tx: optax.GradientTransformation
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    total_steps: int

    @property
    def batch_sharding(self) -> NamedSharding:
        return sharding.batch_sharding(self.mesh)


def check_mesh(config: TrainConfig, mesh: Mesh) -> None:
    """Divisibility the step relies on, checked before anything is built (DESIGN §2)."""
    data, model = mesh.shape["data"], mesh.shape["model"]
    d = config.data
    if d.batch_size % data:
        raise UserError(f"batch_size {d.batch_size} does not divide across the data axis of "
                        f"mesh {data}x{model} ({data}); use a batch that is a multiple "
                        f"of {data}")
    if d.micro_batch_size is not None and d.micro_batch_size % data:
        raise UserError(f"micro_batch_size {d.micro_batch_size} does not divide across the data "
                        f"axis ({data}) of mesh {data}x{model}")
    if config.model.n_heads % model:
        raise UserError(f"n_heads {config.model.n_heads} does not divide across the model axis "
                        f"({model}) of mesh {data}x{model}")


def build(config: TrainConfig, mesh: Mesh, steps_per_epoch: int) -> Setup:
    """Everything about a run that does not need memory: shapes, shardings, the optimiser."""
    graphdef, abstract = sharding.abstract_model(config.model, mesh)
    total = config.epochs * steps_per_epoch
    tx = optim.optimizer(config.optim, total, optim.decay_mask(abstract))
    params = abstract.to_pure_dict()
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(tx.init, params)
    # Adam's moments live where their parameters do; counters are replicated.
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, opt_abstract, param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    shardings = TrainState(replicated, param_shardings, opt_shardings, replicated)
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_abstract,
                        jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return Setup(config, mesh, graphdef, tx, shardings, abstract_state, total)


def make_train_step(setup: Setup):
    """The jitted step: (state, global batch) -> (state, metrics); the old state is donated."""
    config, graphdef, tx = setup.config, setup.graphdef, setup.tx
    rates = dropout_rates(config.model.n_layers, config.dropout)
    n_micro = config.data.accumulation_steps
    lr_at = optim.schedule(config.optim, setup.total_steps)
    param_shardings = setup.state_shardings.params
    micro_sharding = NamedSharding(setup.mesh, PartitionSpec(None, "data"))

    def summed_loss(params, batch, key):
        model = nnx.merge(graphdef, params)
        logits = model(batch["inputs"], batch["positions"],
                       dropout_rates=rates if config.dropout > 0 else None,
                       dropout_key=key if config.dropout > 0 else None)
        return jnp.sum(token_nll(logits, batch["targets"]) * batch["loss_mask"])

    grad_fn = jax.value_and_grad(summed_loss)

    def step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(state.rng, state.step)
        # LIMA's loss: mean over the target tokens of the whole global batch, so it is the same
        # with or without accumulation and for a short last batch (its padding rows count 0).
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        if n_micro == 1:
            loss_sum, grads = grad_fn(state.params, batch, key)
        else:
            def split(x):  # [B, ...] -> [n_micro, B/n_micro, ...], each micro batch on every shard
                x = x.reshape(x.shape[0] // n_micro, n_micro, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, micro_sharding)

            def accumulate(carry, micro):
                i, mb = micro
                loss, g = grad_fn(state.params, mb, jax.random.fold_in(key, i))
                total, grads = carry
                grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, grads, g),
                                                         param_shardings)
                return (total + loss, grads), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss_sum, grads), _ = jax.lax.scan(
                accumulate, (jnp.zeros((), jnp.float32), zeros),
                (jnp.arange(n_micro), jax.tree.map(split, batch)))
        grads = jax.tree.map(lambda g: g / n_tokens, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / n_tokens, "grad_norm": grad_norm, "lr": lr_at(state.step),
                   "target_tokens": n_tokens}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    batch_shardings = {k: setup.batch_sharding for k in BATCH_KEYS}
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    jitted = jax.jit(step, in_shardings=(setup.state_shardings, batch_shardings),
                     out_shardings=(setup.state_shardings, replicated), donate_argnums=0)

    def run(state, batch):
        with sharding.activate(setup.mesh):
            return jitted(state, batch)

    run.jitted = jitted
    return run


def init_state(setup: Setup, params: dict | None = None) -> TrainState:
    """A fresh TrainState: random parameters (or `params`, e.g. from --init) and zero moments."""
    config, mesh = setup.config, setup.mesh
    if params is None:
        params = nnx.to_pure_dict(nnx.state(sharding.init_model(config.model, mesh, config.seed)))
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    rng = jax.device_put(jax.random.PRNGKey(config.seed), replicated)
    return TrainState(step, params, opt_state, rng)


def put_batch(batch: Batch, setup: Setup) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays sharded over `data`."""
    s = setup.batch_sharding
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(batch[k]), s) for k in BATCH_KEYS}
    global_rows = setup.config.data.batch_size
    return {k: jax.make_array_from_process_local_data(
        s, np.asarray(batch[k]), (global_rows, *np.shape(batch[k])[1:])) for k in BATCH_KEYS}


# --- what a step costs: FLOPs, peaks, MFU ---------------------------------------------------


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, Chowdhery et al. 2022, App. B): 6 x the parameters that
    multiply (all but the embedding lookup) + 12 x layers x dim x sequence for attention."""
    matmul_params = model.n_params - (0 if model.tie_embeddings else model.vocab_size * model.dim)
    attention = 12 * model.n_layers * model.n_heads * model.head_dim * seq_len
    return 6.0 * matmul_params + attention


# Dense bfloat16 peaks per chip, from the vendors' data sheets.
KNOWN_PEAKS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
}


def measure_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the first device: the CPU's practical peak."""
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    f(x, x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x, x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))


def peak_flops(dtype: str, override: float | None = None) -> tuple[float, str]:
    """The whole mesh's peak FLOP/s and where the figure came from."""
    if override:
        return override, "--peak-flops"
    devices = jax.devices()
    kind = devices[0].device_kind
    for name, peak in KNOWN_PEAKS.items():
        if kind.startswith(name):
            return peak * len(devices), f"{kind} data sheet"
    if devices[0].platform == "cpu":
        # Simulated CPU devices share the host's cores: the host's matmul rate is the peak.
        return measure_matmul_peak(dtype) * jax.process_count(), "measured CPU matmul"
    return math.nan, f"unknown device {kind!r} (use --peak-flops)"


# --- the loop -------------------------------------------------------------------------------


class Diverged(Exception):
    """The loss became NaN or infinite; the run stopped before saving that state."""


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def run_config_json(config: TrainConfig) -> dict:
    return config.to_dict()


def check_workdir(workdir: Path, config: TrainConfig) -> None:
    """A workdir belongs to one run: resuming with a different recipe is refused (the mesh may
    change: checkpoints restore onto any mesh)."""
    path = workdir / "config.json"
    if not path.exists():
        if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
            raise UserError(f"{workdir}: holds checkpoints but no config.json; "
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


def run(config: TrainConfig, workdir: str | Path, loader, *, mesh: Mesh | None = None,
        init_params: dict | None = None, peak: float | None = None,
        progress: bool = True) -> list[dict]:
    """Train (or resume) in `workdir` on batches from `loader`; returns this session's metrics.

    `loader` is data.Batches (or anything with its steps_per_epoch, get_state/set_state and
    iteration). The workdir follows DESIGN §3: config.json, metrics.jsonl, checkpoints/, and
    TensorBoard event files.
    """
    from tqdm import tqdm

    from limajax import checkpoint

    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    check_mesh(config, mesh)
    workdir = Path(workdir)
    main = jax.process_index() == 0
    check_workdir(workdir, config)
    setup = build(config, mesh, loader.steps_per_epoch)
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
    manager = checkpoint.train_manager(workdir, config.max_to_keep)
    try:
        latest = manager.latest_step()
        if latest is not None:
            state, meta = checkpoint.restore_train_state(manager, latest, setup.abstract_state)
            position = meta["data"]
            say(f"resuming from the checkpoint at step {latest}: epoch {position['epoch'] + 1}, "
                f"batch {position['index'] + 1} next")
        else:
            state, position = init_state(setup, init_params), {"epoch": 0, "index": 0}
        step = int(jax.device_get(state.step))
        metrics_path = workdir / "metrics.jsonl"
        if main:
            write_json(workdir / "config.json", config.to_dict())
            truncate_metrics(metrics_path, step)  # a killed run's steps past the checkpoint
        writer = tensorboard_writer(workdir, step) if main else None
        train_step = make_train_step(setup)
        peak_flops_total, peak_source = peak_flops(config.model.dtype, peak)
        loader.set_state(position)
        batches = iter(loader)
        steps_per_epoch, logged = loader.steps_per_epoch, []
        start = time.time()
        for epoch in range(position["epoch"], config.epochs):
            first = position["index"] if epoch == position["epoch"] else 0
            bar = tqdm(total=steps_per_epoch, initial=first, unit="step", leave=False,
                       desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and main))
            epoch_losses = []
            for index in range(first, steps_per_epoch):
                batch = put_batch(next(batches), setup)
                t0 = time.perf_counter()
                state, m = train_step(state, batch)
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                dt = time.perf_counter() - t0
                step += 1
                if not math.isfinite(m["loss"]):
                    raise Diverged(f"the loss is {m['loss']} at step {step} (epoch {epoch + 1}); "
                                   f"stopped; the last good checkpoint is step "
                                   f"{manager.latest_step()}")
                b, t = batch["inputs"].shape
                record = {"step": step, "epoch": epoch + 1, "loss": m["loss"], "lr": m["lr"],
                          "grad_norm": m["grad_norm"], "tokens_per_sec": b * t / dt,
                          "mfu": b * t * flops_per_token(config.model, t) / dt / peak_flops_total,
                          "time": time.time() - start, "seq_len": t,
                          "target_tokens": int(m["target_tokens"])}
                epoch_losses.append(m["loss"])
                if main and step % config.log_every_steps == 0:
                    log_metrics(metrics_path, writer, record)
                logged.append(record)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
                bar.update()
                end_of_epoch = index + 1 == steps_per_epoch
                every = config.save_every_steps
                if end_of_epoch or (every and step % every == 0):
                    checkpoint.save_train_state(manager, state, {
                        "step": step, "epoch": epoch + 1 if end_of_epoch else epoch,
                        "end_of_epoch": end_of_epoch, "data": loader.get_state(),
                        "config": config.to_dict()})
            bar.close()
            if main:
                last = logged[-1]
                say(f"epoch {epoch + 1}/{config.epochs}: step {step}, mean loss "
                    f"{np.mean(epoch_losses):.4f}, lr {last['lr']:.3g}, "
                    f"{last['tokens_per_sec']:.0f} tokens/s, MFU {last['mfu']:.1%} "
                    f"(peak: {peak_source}), {time.time() - start:.1f} s")
        return logged
    finally:
        manager.wait_until_finished()
        manager.close()
        if main and "writer" in locals() and writer is not None:
            writer.close()


def say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps <= `step` (a resumed run repeats the ones after it)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def tensorboard_writer(workdir: Path, step: int):
    from tensorboardX import SummaryWriter

    # purge_step drops events a killed run wrote past the checkpoint we resume from.
    return SummaryWriter(str(workdir / "tensorboard"), purge_step=step + 1 if step else None)


def log_metrics(path: Path, writer, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for k, v in record.items():
            if k not in ("step", "epoch"):
                writer.add_scalar(f"train/{k}", v, record["step"])
