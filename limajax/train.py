"""Fine-tuning with LIMA's recipe (LIMA §3): one pure `train_step` and a plain epoch loop.

The loop reads top to bottom (DESIGN §2): build the state (fresh, from --init, or restored from
the workdir's latest checkpoint), then `for batch in epoch: state, metrics = train_step(state,
batch)` with logging and checkpointing inline. Dropout randomness is `fold_in(key, step)`, and
the data position is saved with every checkpoint, so a resumed run repeats the uninterrupted one
bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
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
from jax.sharding import Mesh, NamedSharding

from limajax import attention, data, optim, sharding, targets
from limajax.checkpoint import resolve_init
from limajax.config import ModelConfig, TrainConfig
from limajax.errors import UserError
from limajax.model import token_nll
from limajax.progress import bar as progress_bar
from limajax.tokenizer import save_to
from limajax.workdir import (
    CHECKPOINTS_DIR,
    check_config,
    check_saves,
    checkpoint_manager,
    finish_saves,
    log_metrics,
    plot_curves,
    resolved_paths,
    restore_latest,
    save_state,
    set_aside,
    tensorboard_writer,
    truncate_metrics,
    write_config,
)


class TrainState(NamedTuple):
    """Everything a step changes, plus the base RNG key (fold_in(rng, step) gives each step's)."""

    step: jax.Array  # int32 []
    params: dict  # pure dict of arrays, the model's nnx state
    opt_state: Any
    rng: jax.Array  # uint32 [2]


Batch = dict[str, Any]  # data.BATCH_KEYS: int32 [R, T], loss_mask float32 [R, T]
BATCH_KEYS = data.BATCH_KEYS


class Loader(Protocol):
    """What the loop needs from data.Batches: fixed-size batches of this process's rows, and a
    position {"epoch", "index"} (of the next batch) to save and restore."""

    steps_per_epoch: int

    def __iter__(self) -> Iterator[Batch]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def dropout_rates(n_layers: int, top: float) -> jax.Array:
    """LIMA §3: residual dropout p = 0.0 at the bottom layer rising linearly to `top` at the
    last (Megatron-LLM's --lima_dropout: linspace(0, top, L))."""
    return jnp.linspace(0.0, top, n_layers, dtype=jnp.float32)


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


def build(config: TrainConfig, mesh: Mesh, steps_per_epoch: int) -> Setup:
    """Everything about a run that does not need memory: shapes, shardings, the optimiser."""
    if config.model.remat == "auto":
        raise UserError("model.remat auto is chosen by a plan (limajax plan, or limajax train, "
                        "which plans first); resolve it with plan.resolve_remat")
    graphdef, abstract = sharding.abstract_model(config.model, mesh)
    total = config.epochs * steps_per_epoch
    tx = optim.optimizer(config.optim, total, optim.decay_mask(abstract))
    params = nnx.to_pure_dict(abstract)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.opt_state_shardings(tx, opt_abstract, param_shardings, mesh)
    if config.optim.host_offload:
        opt_shardings = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_shardings)
    replicated = sharding.replicated_sharding(mesh)
    shardings = TrainState(replicated, param_shardings, opt_shardings, replicated)
    shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_abstract,
                        jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return Setup(config, mesh, graphdef, tx, shardings, abstract_state, total)


def make_train_step(setup: Setup):
    """The jitted step: (state, global batch) -> (state, metrics); the old state is donated.
    Call (or lower) it inside `sharding.activate(setup.mesh)`."""
    config, graphdef, tx = setup.config, setup.graphdef, setup.tx
    rates = dropout_rates(config.model.n_layers, config.dropout)
    n_micro = config.data.accumulation_steps
    lr_at = optim.schedule(config.optim, setup.total_steps)
    param_shardings = setup.state_shardings.params
    micro_sharding = sharding.micro_batch_sharding(setup.mesh)
    host_opt = setup.state_shardings.opt_state
    device_opt = jax.tree.map(lambda s: s.with_memory_kind("device"), host_opt)

    def summed_loss(params, batch, key, layers_sum=None):
        model = nnx.merge(graphdef, params)
        logits = model(batch["inputs"], batch["positions"], segment_ids=batch["segment_ids"],
                       dropout_rates=rates if config.dropout > 0 else None,
                       dropout_key=key if config.dropout > 0 else None, accumulator=layers_sum)
        return jnp.sum(token_nll(logits, batch["targets"]) * batch["loss_mask"])

    grad_fn = jax.value_and_grad(summed_loss)
    # With remat full, the layers' backward pass adds each micro batch's gradient into the
    # running sum itself (model.layers_adding_into): one gradient tree, not two.
    in_place = config.model.remat == "full"
    adding_fn = jax.value_and_grad(summed_loss, argnums=(0, 3))

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
                total, grads = carry
                if in_place:  # the layers' sum comes back added to; the rest as before
                    loss, (g, layers) = adding_fn(state.params, mb, jax.random.fold_in(key, i),
                                                  grads["layers"])
                    grads = {k: layers if k == "layers" else jax.tree.map(jnp.add, v, g[k])
                             for k, v in grads.items()}
                else:
                    loss, g = grad_fn(state.params, mb, jax.random.fold_in(key, i))
                    grads = jax.tree.map(jnp.add, grads, g)
                grads = jax.lax.with_sharding_constraint(grads, param_shardings)
                return (total + loss, grads), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss_sum, grads), _ = jax.lax.scan(
                accumulate, (jnp.zeros((), jnp.float32), zeros),
                (jnp.arange(n_micro), jax.tree.map(split, batch)))
        grads = jax.tree.map(lambda g: g / n_tokens, grads)
        grad_norm = optax.tree.norm(grads)
        opt_state = state.opt_state
        if config.optim.host_offload:  # moments from host memory for the update, and back
            opt_state = jax.device_put(opt_state, device_opt)
        updates, opt_state = tx.update(grads, opt_state, state.params)
        if config.optim.host_offload:
            opt_state = jax.device_put(opt_state, host_opt)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / n_tokens, "grad_norm": grad_norm, "lr": lr_at(state.step),
                   "target_tokens": n_tokens}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    batch_shardings = {k: setup.batch_sharding for k in BATCH_KEYS}
    return jax.jit(step, in_shardings=(setup.state_shardings, batch_shardings),
                   out_shardings=(setup.state_shardings,
                                  sharding.replicated_sharding(setup.mesh)),
                   donate_argnums=0)


def make_eval_step(setup: Setup):
    """The jitted dev-set step: (params, global batch) -> (summed -log p of the target tokens,
    their count); no dropout, nothing updated."""
    graphdef = setup.graphdef

    def evaluate(params, batch: Batch):
        logits = nnx.merge(graphdef, params)(batch["inputs"], batch["positions"],
                                             segment_ids=batch["segment_ids"])
        nll = token_nll(logits, batch["targets"]) * batch["loss_mask"]
        return jnp.sum(nll), jnp.sum(batch["loss_mask"])

    batch_shardings = {k: setup.batch_sharding for k in BATCH_KEYS}
    return jax.jit(evaluate, in_shardings=(setup.state_shardings.params, batch_shardings),
                   out_shardings=sharding.replicated_sharding(setup.mesh))


def dev_loss(setup: Setup, evaluate, params, dev: Loader) -> float:
    """Mean -log p per target token over one pass of the dev split (inside
    `sharding.activate(setup.mesh)`, as the loop's steps are)."""
    dev.set_state({"epoch": 0, "index": 0})
    sums = []  # left on the devices until the pass is done
    for _, batch in zip(range(dev.steps_per_epoch), dev, strict=False):
        sums.append(evaluate(params, put_batch(batch, setup)))
    total, count = np.asarray(jax.device_get(sums), np.float64).sum(axis=0) if sums else (0, 0)
    return float(total) / max(float(count), 1.0)


def init_state(setup: Setup, params: dict | None = None) -> TrainState:
    """A fresh TrainState: random parameters (or `params`, e.g. from --init) and zero moments."""
    config, mesh = setup.config, setup.mesh
    if params is None:
        params = nnx.to_pure_dict(nnx.state(sharding.init_model(config.model, mesh, config.seed)))
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(params)
    replicated = sharding.replicated_sharding(mesh)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    rng = jax.device_put(jax.random.PRNGKey(config.seed), replicated)
    return TrainState(step, params, opt_state, rng)


def put_batch(batch: Batch, setup: Setup) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays sharded over `data`."""
    s = setup.batch_sharding
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(batch[k]), s) for k in BATCH_KEYS}
    # Every process holds the same number of rows (data.Batches splits the global rows evenly).
    global_rows = len(batch["inputs"]) * jax.process_count()
    return {k: jax.make_array_from_process_local_data(
        s, np.asarray(batch[k]), (global_rows, *np.shape(batch[k])[1:])) for k in BATCH_KEYS}


# --- what a step costs: FLOPs, peaks, MFU ---------------------------------------------------


# Dense (no sparsity) peak FLOP/s per chip from the vendors' data sheets, by compute dtype.
# float32 matmuls run at TF32 on NVIDIA tensor cores and as bfloat16 passes on TPUs at JAX's
# default precision, so those are their float32 peaks. Longer names first: "H100 PCIe" before
# "H100". device_kind spellings: "TPU v5 lite" is v5e, "TPU v5" v5p, "TPU v6 lite" v6e.
# The alias rows repeat their figures on purpose: each name a device reports reads as one row.
KNOWN_PEAKS = {
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12},
    "NVIDIA B200": {"bfloat16": 2250e12, "float16": 2250e12, "float32": 1100e12},
    "NVIDIA A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float16": 197e12, "float32": 197e12},
    "TPU v5e": {"bfloat16": 197e12, "float16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float16": 918e12, "float32": 918e12},
    "TPU v6e": {"bfloat16": 918e12, "float16": 918e12, "float32": 918e12},
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


def peak_flops(dtype: str, override: float | None = None) -> tuple[float | None, str]:
    """The whole mesh's peak FLOP/s for `dtype` compute and where the figure came from; None
    (MFU unknown, written as null) for a device missing from KNOWN_PEAKS."""
    if override is not None:
        return override, "--peak-flops"
    devices = jax.devices()
    kind = devices[0].device_kind
    for name, peaks in KNOWN_PEAKS.items():
        if kind.startswith(name):
            return peaks[dtype] * len(devices), f"{kind} {dtype} data sheet"
    if devices[0].platform == "cpu":
        # Simulated CPU devices share the host's cores: the host's matmul rate is the peak.
        return measure_matmul_peak(dtype) * jax.process_count(), "measured CPU matmul"
    return None, f"unknown for device {kind!r}"


# --- the loop -------------------------------------------------------------------------------


class Diverged(Exception):
    """The loss became NaN or infinite; the run stopped before saving that state."""



def train(config: TrainConfig, workdir: str | Path, loader: Loader, *, mesh: Mesh | None = None,
          init_params=None, peak: float | None = None, progress: bool = True,
          tokenizer=None, dev: Loader | None = None) -> list[dict]:
    """Train (or resume) in `workdir` on batches from `loader`; returns this session's metrics.

    `loader` is data.Batches (or anything with its steps_per_epoch, get_state/set_state and
    iteration). `init_params`: None (random), a params dict, or mesh -> params (loaded only if
    there is no checkpoint to resume). `tokenizer`: copied into the workdir so its epochs need
    nothing else. `dev`: one pass of the dev split, scored at every epoch's end. The workdir
    follows DESIGN §3 (limajax/workdir.py). The setup checks are train_recipe's.
    """
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    config = resolved_paths(config)
    setup = build(config, mesh, loader.steps_per_epoch)
    with _Run(config, Path(workdir), peak) as run:
        state, position, step = run.start(setup, init_params, tokenizer)
        train_step = make_train_step(setup)
        evaluate = make_eval_step(setup) if dev is not None else None
        loader.set_state(position)
        batches = iter(loader)

        def fetch():
            """The next batch, already on its way to the devices, and the data position after
            it (what a checkpoint taken after its step records)."""
            return put_batch(next(batches), setup), loader.get_state()

        upcoming = fetch() if position["epoch"] < config.epochs else None
        with sharding.activate(mesh):  # steps are dispatched; the host does not wait for them
            for epoch in range(position["epoch"], config.epochs):
                first = position["index"] if epoch == position["epoch"] else 0
                bar = progress_bar(total=loader.steps_per_epoch, initial=first, unit="step",
                                   desc=f"train, epoch {epoch + 1}/{config.epochs}",
                                   enabled=progress and jax.process_index() == 0)
                epoch_start, epoch_records = time.perf_counter(), []
                for index in range(first, loader.steps_per_epoch):
                    batch, after = upcoming
                    state, metrics = train_step(state, batch)
                    step += 1
                    run.pending.append((step, epoch + 1, batch["inputs"].shape, metrics))
                    end_of_epoch = index + 1 == loader.steps_per_epoch
                    every = config.save_every_steps
                    mid_save = bool(every and step % every == 0) and not end_of_epoch
                    if not (mid_save or end_of_epoch):
                        upcoming = fetch()  # host -> devices while the step runs
                    if mid_save or end_of_epoch or step % config.log_every_steps == 0:
                        epoch_records += run.flush(bar)
                    bar.update()  # on a terminal a bar, in a log a line at each quarter
                    if mid_save:
                        run.save(state, step, epoch, after, end_of_epoch=False)
                        upcoming = fetch()  # after the save: a kill here leaves it started
                bar.close()
                seconds = time.perf_counter() - epoch_start  # before the dev pass
                loss = None if evaluate is None else dev_loss(setup, evaluate, state.params, dev)
                run.end_epoch(epoch, epoch_records, seconds, loss)
                # The epoch's checkpoint, after what reports it (LIMA §3: one per epoch).
                run.save(state, step, epoch + 1, after, end_of_epoch=True)
                if epoch + 1 < config.epochs:
                    upcoming = fetch()  # after the save: a kill here leaves it started
        return run.finish()


class _Run(contextlib.AbstractContextManager):
    """A training session's bookkeeping: the workdir's files and checkpoints, the peak for MFU,
    the steps whose metrics are still on the devices (`pending`). Leaving it finishes the saves
    in flight and closes the checkpoints and TensorBoard, however the session ends."""

    def __init__(self, config: TrainConfig, workdir: Path, peak: float | None):
        self.config, self.workdir, self.writer = config, workdir, None
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
        self.peak, self.peak_source = peak_flops(config.model.dtype, peak)
        self.manager = checkpoint_manager(workdir, config.max_to_keep)  # closed by __exit__
        self.pending: list = []  # (step, epoch, batch shape, metrics on the devices)
        self.logged: list[dict] = []  # the session's records; the clock starts in `start`

    def __exit__(self, *exc) -> None:
        try:
            finish_saves(self.manager)
        finally:
            self.manager.close()
            if self.writer is not None:
                self.writer.close()

    def start(self, setup: Setup, init_params, tokenizer) -> tuple[TrainState, dict, int]:
        """The state to train from, the data position of its next batch and its step: the latest
        good checkpoint (a damaged one is set aside, its epoch trained again), or a fresh state;
        then the workdir's files for a session from that step (the lead's): the config, the
        tokenizer, metrics.jsonl cut back to the checkpoint, and a TensorBoard writer."""
        config, workdir = self.config, self.workdir
        state, position = self._restore(setup, init_params)
        step = int(jax.device_get(state.step))
        if jax.process_index() == 0:
            write_config(workdir, config)
            if tokenizer is not None:
                save_to(workdir, tokenizer.path, tokenizer.spec)
            truncate_metrics(workdir, step)  # a killed run's steps past the checkpoint
            self.writer = tensorboard_writer(workdir, step)
        if self.peak is None:
            log(f"notice: MFU is {self.peak_source}; metrics.jsonl records it as null (pass "
                "--peak-flops FLOP/s to know it)")
        self.start_time = self.window = time.perf_counter()
        return state, position, step

    def _restore(self, setup: Setup, init_params) -> tuple[TrainState, dict]:
        config, manager = self.config, self.manager
        restored = restore_latest(manager, setup.abstract_state)
        if restored is None:
            params = init_params(setup.mesh) if callable(init_params) else init_params
            return init_state(setup, params), {"epoch": 0, "index": 0}
        state, meta, damaged = restored
        for error in damaged.values():
            log(f"notice: {error}; using the one before")
        for path in set_aside(manager, damaged, lead=jax.process_index() == 0):
            log(f"notice: the damaged checkpoint is kept as {path}; its epoch is trained again")
        latest, position = meta["step"], meta["data"]
        if position["epoch"] >= config.epochs:
            log(f"the run in {self.workdir} is complete ({config.epochs} epochs, step {latest})")
        else:
            log(f"resuming from the checkpoint at step {latest}: epoch "
                f"{position['epoch'] + 1}, batch {position['index'] + 1} next")
        return state, position

    def flush(self, bar) -> list[dict]:
        """The pending steps' metrics, brought to the host in one sync (at the log cadence and
        before every checkpoint, so a NaN stops the run before its state is kept); the records
        at the cadence go to metrics.jsonl. Returns the records."""
        config, now = self.config, time.perf_counter()
        records, bad = host_metrics(self.pending, (now - self.window) / len(self.pending),
                                    config.model, self.peak, now - self.start_time)
        self.pending, self.window = [], now
        check_saves(self.manager)  # a failed save stops the run now, not an epoch later
        for record in records:
            if jax.process_index() == 0 and record["step"] % config.log_every_steps == 0:
                log_metrics(self.workdir, self.writer, record)
        if bad is not None:
            finish_saves(self.manager)
            good = self.manager.latest_step()
            raise Diverged(
                f"the loss is {bad['loss']} at step {bad['step']} (epoch {bad['epoch']}); "
                "stopped; " + ("no checkpoint was saved before it (lower optim.lr?)" if good is
                               None else f"the last good checkpoint is step {good} in "
                               f"{self.workdir / CHECKPOINTS_DIR}"))
        bar.set_postfix_str(f"loss {records[-1]['loss']:.4f}, "
                            f"{records[-1]['tokens_per_sec']:.0f} tokens/s", refresh=False)
        self.logged += records
        return records

    def save(self, state: TrainState, step: int, epoch: int, data_position: dict, *,
             end_of_epoch: bool) -> None:
        """Start saving `state` with where the run is: the step, the epochs done, the data
        position of the next batch and the config."""
        save_state(self.manager, state, {"step": step, "epoch": epoch,
                                         "end_of_epoch": end_of_epoch, "data": data_position,
                                         "config": self.config.to_dict()})

    def end_epoch(self, epoch: int, records: list[dict], seconds: float,
                  dev: float | None) -> None:
        """The epoch's line: its mean loss, dev loss (LIMA App. B: dev perplexity beside
        quality, per epoch), and its tokens/s and MFU over the epoch's wall time (compilation
        included in the first), not the last step's; then the curves."""
        if jax.process_index() != 0:
            return
        config, step = self.config, records[-1]["step"]
        dev_text = ""
        if dev is not None:
            dev_text = f", dev loss {dev:.4f} (perplexity {math.exp(dev):.2f})"
            log_metrics(self.workdir, self.writer, {"step": step, "epoch": epoch + 1,
                                                    "dev_loss": dev, "dev_ppl": math.exp(dev)})
        tokens = sum(r["rows"] * r["seq_len"] for r in records)
        flops = sum(r["rows"] * r["seq_len"] * config.model.flops_per_token(r["seq_len"])
                    for r in records)
        mfu = ("MFU unknown" if self.peak is None else
               f"MFU {flops / seconds / self.peak:.1%} (peak: {self.peak_source})")
        log(f"epoch {epoch + 1}/{config.epochs}: step {step}, mean loss "
            f"{np.mean([r['loss'] for r in records]):.4f}{dev_text}, lr "
            f"{records[-1]['lr']:.3g}, {tokens / seconds:.0f} tokens/s, {mfu}, "
            f"{time.perf_counter() - self.start_time:.1f} s")
        plot_curves(self.workdir)

    def finish(self) -> list[dict]:
        """"done" only once the last checkpoint is written; the session's metrics."""
        finish_saves(self.manager)
        if self.logged:
            log(finished_message(self.workdir, self.config.epochs))
        return self.logged


def finished_message(workdir: Path, epochs: int) -> str:
    """Where the run's checkpoints are and the commands that use them (score, sample, export)."""
    which = "the checkpoint of epoch 1" if epochs == 1 else \
        f"one checkpoint per epoch (1-{epochs})"
    return (f"done: {which} in {workdir / CHECKPOINTS_DIR}; "
            f"LIMA §3 picks one of epochs 5-10 by dev perplexity and samples. Use epoch N with\n"
            f"  limajax score --workdir {workdir} --epoch N --input TEXTS.jsonl --output "
            f"SCORES.jsonl\n"
            f"  limajax sample --workdir {workdir} --epoch N --prompts PROMPTS.jsonl --output "
            f"ANSWERS.jsonl\n"
            f"  limajax export --to hf --workdir {workdir} --epoch N --output HF_DIR")


def host_metrics(pending: list, seconds_per_step: float, model: ModelConfig,
                 peak: float | None, elapsed: float) -> tuple[list[dict], dict | None]:
    """The metrics.jsonl records of steps whose metrics were left on the devices (one
    device_get for all of them; speed is the window's average: no step was timed alone), up to
    the first step whose loss is not finite, and that step ({step, epoch, loss}) or None."""
    fetched = jax.device_get([m for *_, m in pending])
    records = []
    for (step, epoch, (rows, t), _), m in zip(pending, fetched, strict=True):
        if not math.isfinite(m["loss"]):
            return records, {"step": step, "epoch": epoch, "loss": float(m["loss"])}
        tokens_per_sec = rows * t / seconds_per_step
        records.append({
            "step": step, "epoch": epoch, "loss": float(m["loss"]), "lr": float(m["lr"]),
            "grad_norm": float(m["grad_norm"]), "tokens_per_sec": tokens_per_sec,
            "mfu": None if peak is None else tokens_per_sec * model.flops_per_token(t) / peak,
            "time": elapsed, "seq_len": t, "rows": rows,
            "target_tokens": int(m["target_tokens"])})
    return records, None


def log(message: str) -> None:
    """A line on stderr from the lead process only."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def train_recipe(config: TrainConfig, workdir: str | Path, *, peak: float | None = None,
                 progress: bool = True) -> list[dict]:
    """`limajax train`: settle the recipe's model, tokenizer and data, then train (or resume)
    in `workdir`."""
    mesh = sharding.make_mesh(config.mesh)  # the one parse of --mesh (start counted devices)
    if jax.default_backend() == "gpu":
        log(targets.gpu_memory_notice())
    # The setup checks, once and before anything loads (train() trusts its caller).
    sharding.check(config, mesh)
    m = config.model  # a kernel this platform lacks fails here
    kernel = attention.describe(m.attention, heads=(m.n_heads, m.n_kv_heads, mesh.shape["model"]))
    if config.init is None and config.tokenizer is None and config.data.path is None:
        log(f"notice: a random model on the sample data: its tokenizer, {data.SAMPLE_TOKENIZER}")
        config = dataclasses.replace(config, tokenizer=str(data.SAMPLE_TOKENIZER))
    config, tokenizer, init_params = resolve_init(config)  # the parameters load in train()
    check_config(workdir, config)
    data_axis = mesh.shape["data"]
    loader = data.batches_for(config, tokenizer, data_axis)
    log(kernel)
    for line in sharding.replication_notices(config.model, mesh):
        log(line)
    steps, epochs = loader.steps_per_epoch, config.epochs
    log(f"{config.model.n_params / 1e6:,.2f}M parameters, {steps} step{'s' * (steps != 1)} per "
        f"epoch x {epochs} epoch{'s' * (epochs != 1)}, global batch {config.data.batch_size}, "
        f"mesh {config.mesh}; {loader.trimmed()} of {len(loader.source)} dialogues trimmed at "
        f"{config.data.max_len} tokens (LIMA §3 keeps their beginning)")
    return train(config, workdir, loader, mesh=mesh, peak=peak, progress=progress,
                 init_params=init_params, tokenizer=tokenizer,
                 dev=data.batches_for(config, tokenizer, data_axis, "dev"))
