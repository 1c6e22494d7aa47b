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
from limajax.config import ModelConfig, TrainConfig, json_line
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


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) per position; logits [B, T, V] float32, padded vocab at -inf."""
    # logsumexp minus the target's logit, picked by a one-hot mask: its gradient is a select,
    # not the scatter a gather's would be (slow on CPU, and awkward on a vocab-sharded axis).
    hit = jnp.arange(logits.shape[-1]) == targets[..., None]
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


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
    params = nnx.to_pure_dict(abstract)
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


# Dense (no sparsity) peak FLOP/s per chip from the vendors' data sheets, by compute dtype.
# float32 matmuls run at TF32 on NVIDIA tensor cores and as bfloat16 passes on TPUs at JAX's
# default precision, so those are their float32 peaks. Longer names first: "H100 PCIe" before
# "H100". device_kind spellings: "TPU v5 lite" is v5e, "TPU v5" v5p, "TPU v6 lite" v6e.
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


def run(config: TrainConfig, workdir: str | Path, loader: Loader, *, mesh: Mesh | None = None,
        init_params=None, peak: float | None = None,
        progress: bool = True) -> list[dict]:
    """Train (or resume) in `workdir` on batches from `loader`; returns this session's metrics.

    `loader` is data.Batches (or anything with its steps_per_epoch, get_state/set_state and
    iteration). `init_params`: None (random), a params dict, or mesh -> params (loaded only if
    there is no checkpoint to resume). The workdir follows DESIGN §3: config.json,
    metrics.jsonl, checkpoints/, and TensorBoard event files.
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
            if position["epoch"] >= config.epochs:
                say(f"the run in {workdir} is complete ({config.epochs} epochs, step {latest})")
            else:
                say(f"resuming from the checkpoint at step {latest}: epoch "
                    f"{position['epoch'] + 1}, batch {position['index'] + 1} next")
        else:
            params = init_params(mesh) if callable(init_params) else init_params
            state, position = init_state(setup, params), {"epoch": 0, "index": 0}
        step = int(jax.device_get(state.step))
        metrics_path = workdir / "metrics.jsonl"
        if main:
            write_json(workdir / "config.json", config.to_dict())
            truncate_metrics(metrics_path, step)  # a killed run's steps past the checkpoint
        writer = tensorboard_writer(workdir, step) if main else None
        train_step = make_train_step(setup)
        peak_flops_total, peak_source = peak_flops(config.model.dtype, peak)
        if peak_flops_total is None:
            say(f"notice: MFU is {peak_source}; metrics.jsonl records it as null (pass "
                "--peak-flops FLOP/s to know it)")
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
                          "mfu": None if peak_flops_total is None else
                          b * t * flops_per_token(config.model, t) / dt / peak_flops_total,
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
                    f"{last['tokens_per_sec']:.0f} tokens/s, {mfu_text(last['mfu'], peak_source)}, "
                    f"{time.time() - start:.1f} s")
        return logged
    finally:
        manager.wait_until_finished()
        manager.close()
        if main and "writer" in locals() and writer is not None:
            writer.close()


def mfu_text(mfu: float | None, source: str) -> str:
    return "MFU unknown" if mfu is None else f"MFU {mfu:.1%} (peak: {source})"


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
        f.write(json_line(record))
    if writer is not None:
        for k, v in record.items():
            if k not in ("step", "epoch") and v is not None and math.isfinite(v):
                writer.add_scalar(f"train/{k}", v, record["step"])


# --- a run from a recipe: model, tokenizer and data resolved (what `limajax train` calls) -------

# The fields that make two model configs the same network; dtype, remat and the vocabulary
# padding are the run's choice.
ARCHITECTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "norm_eps",
                "rope_theta", "rope_scaling", "tie_embeddings")


def resolve(config: TrainConfig):
    """(config with the model's vocabulary settled, tokenizer, init-params loader or None).

    With `init`, the model directory's config must agree with the recipe's architecture; its
    vocabulary (LIMA's EOT included) and tokenizer are used. Without, the recipe's model is
    initialised at random for `tokenizer` plus EOT.
    """
    from limajax import checkpoint
    from limajax.tokenizer import Tokenizer

    if config.init is not None:
        stored = checkpoint.read_model_config(config.init)
        for name in ARCHITECTURE:
            if getattr(stored, name) != getattr(config.model, name):
                raise UserError(
                    f"--init {config.init}: its model.json has {name} = "
                    f"{getattr(stored, name)!r} but the recipe's model has "
                    f"{getattr(config.model, name)!r}; pick the recipe for that model")
        if checkpoint.tokenizer_path(config.init) is None:
            raise UserError(f"--init {config.init}: the model directory has no tokenizer.model")
        tokenizer = Tokenizer.from_path(config.init)
        if tokenizer.eot_id is None:
            raise UserError(f"--init {config.init}: the model has no EOT token (LIMA §3); "
                            "convert it with --add-eot")
        model = config.model.replace(vocab_size=stored.vocab_size,
                                     vocab_multiple=stored.vocab_multiple)
        if model.padded_vocab_size != stored.padded_vocab_size:
            raise UserError(f"--init {config.init}: padded vocabulary {stored.padded_vocab_size}"
                            f" differs from the recipe's {model.padded_vocab_size}")
        config = dataclasses.replace(config, model=model)

        def init_params(mesh):
            params, _, _ = checkpoint.load_model_dir(config.init, shardings=mesh)
            # e.g. a model directory converted to bfloat16: train on float32 master weights.
            return jax.tree.map(lambda p: p.astype(config.model.param_dtype), params)

        return config, tokenizer, init_params
    if config.tokenizer is None:
        raise UserError("a random model needs a tokenizer: --set tokenizer=PATH/tokenizer.model, "
                        "or start from a converted model with --init MODEL_DIR")
    tokenizer = Tokenizer.from_path(config.tokenizer).with_eot()
    model = config.model.replace(vocab_size=tokenizer.vocab_size)
    return dataclasses.replace(config, model=model), tokenizer, None


def training_source(config: TrainConfig):
    """The training dialogues: a prepared dataset (--data) or the embedded sample data."""
    from limajax import data

    if config.data.path is not None:
        return data.load(config.data.path, "train")
    rows, _ = data.read_gair_file(data.SAMPLE_DATA / "train.jsonl", "train")
    return [{"conversations": list(r.conversations)} for r in rows]


def make_loader(config: TrainConfig, tokenizer, source):
    from limajax import data

    d = config.data
    buckets = sorted({b for b in data.BUCKETS if b < d.max_len} | {d.max_len})
    return data.Batches(source, tokenizer, batch_size=d.batch_size, seed=d.seed,
                        num_epochs=config.epochs, max_len=d.max_len, buckets=buckets,
                        train_on_prompts=d.train_on_prompt)


def train(config: TrainConfig, workdir: str | Path, *, peak: float | None = None,
          progress: bool = True) -> list[dict]:
    """`limajax train`: resolve the recipe, then run (or resume) it in `workdir`."""
    mesh = sharding.make_mesh(config.mesh)
    check_mesh(config, mesh)
    config, tokenizer, init_params = resolve(config)
    check_workdir(Path(workdir), config)
    loader = make_loader(config, tokenizer, training_source(config))
    say(f"{config.model.n_params / 1e6:,.2f}M parameters, {loader.steps_per_epoch} steps per "
        f"epoch x {config.epochs} epochs, global batch {config.data.batch_size}, mesh "
        f"{config.mesh}")
    return run(config, workdir, loader, mesh=mesh, peak=peak, progress=progress,
               init_params=init_params)


# --- plan: compile the real step ahead of time and read its memory (`limajax plan`) -------------

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'32GiB' -> 34359738368; '16GB' -> 16e9. A size needs its unit: a bare '32' could mean
    GiB or bytes, and reading it either way has given wrong answers (newcomer F4)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"--device-memory {text!r}: expected a size with its unit, like 32GiB, "
                        "16GB or 80GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def per_device_bytes(tree) -> int:
    """Bytes of the largest shard of every array in a tree of sharded ShapeDtypeStructs."""
    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shape) * jnp.dtype(a.dtype).itemsize
    return total


@dataclasses.dataclass
class Plan:
    """Per-device memory of one train step, from the compiler and from arithmetic."""

    config: TrainConfig
    devices: int
    seq_len: int
    device_memory: int
    params: int
    opt_state: int
    batch: int
    compiled_arguments: int
    compiled_outputs: int
    compiled_aliased: int
    compiled_temp: int
    analytic: dict[str, float]
    compile_seconds: float

    @property
    def total(self) -> int:
        """What the step needs at its peak: inputs + outputs not written in place + temporaries."""
        return self.compiled_arguments + self.compiled_outputs - self.compiled_aliased + \
            self.compiled_temp

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory

    def format(self) -> str:
        c, m = self.config, self.config.model
        a = self.analytic
        micro = c.data.micro_batch_size or c.data.batch_size
        rows = [
            f"plan: {m.n_params / 1e9:,.2f}B parameters, mesh {c.mesh} ({self.devices} devices), "
            f"global batch {c.data.batch_size} x {self.seq_len} tokens (micro batch {micro}), "
            f"params {m.param_dtype}, compute {m.dtype}, remat {m.remat}",
            f"{'per device':<34}{'compiled':>14}{'analytic':>14}",
            f"{'  parameters':<34}{gib(self.params):>14}{gib(a['params']):>14}",
            f"{'  optimizer state (AdamW mu, nu)':<34}{gib(self.opt_state):>14}"
            f"{gib(a['opt_state']):>14}",
            f"{'  batch':<34}{gib(self.batch):>14}{gib(a['batch']):>14}",
            f"{'  temporaries (grads, activations)':<34}{gib(self.compiled_temp):>14}"
            f"{gib(a['temp']):>14}",
            f"{'    of which: gradients':<34}{'':>14}{gib(a['grads']):>14}",
            f"{'    of which: saved activations':<34}{'':>14}{gib(a['activations']):>14}",
            f"{'    of which: one layer recomputed':<34}{'':>14}{gib(a['layer']):>14}",
            f"{'    of which: logits and loss':<34}{'':>14}{gib(a['logits']):>14}",
            f"{'  outputs not updated in place':<34}"
            f"{gib(self.compiled_outputs - self.compiled_aliased):>14}{'':>14}",
            f"{'  total':<34}{gib(self.total):>14}{gib(a['total']):>14}",
            f"device memory {gib(self.device_memory)}: "
            + ("fits" if self.fits else "DOES NOT FIT")
            + f" ({self.total / self.device_memory:.0%} used; compiled in "
            f"{self.compile_seconds:.1f} s on {jax.devices()[0].platform})",
        ]
        return "\n".join(rows)


def analytic_memory(config: TrainConfig, mesh: Mesh, seq_len: int) -> dict[str, float]:
    """Bytes per device by arithmetic: fully sharded state, and activations as remat keeps them."""
    m, d = config.model, config.data
    data, model = mesh.shape["data"], mesh.shape["model"]
    n_dev = data * model
    act = jnp.dtype(m.dtype).itemsize
    n = m.n_params + (m.padded_vocab_size - m.vocab_size) * m.dim * (
        1 if m.tie_embeddings else 2)
    param_bytes = jnp.dtype(m.param_dtype).itemsize
    rows = (d.micro_batch_size or d.batch_size) // data  # rows per device in one micro batch
    t, dim = seq_len, m.dim
    heads, ffn, vocab = m.n_heads // model, m.ffn_dim // model, m.padded_vocab_size // model
    out = {"params": n * param_bytes / n_dev, "opt_state": 2 * n * 4 / n_dev,
           "batch": 4 * d.batch_size * t * 4 / data}
    accumulators = 1 if d.accumulation_steps == 1 else 2  # + the running sum
    out["grads"] = accumulators * n * 4 / n_dev
    # remat "full" keeps each layer's input (the residual stream) for the backward pass.
    saved = {"full": rows * t * dim * act,
             "dots": rows * t * (4 * dim + 3 * ffn + 2 * m.n_heads // model * m.head_dim) * act,
             "none": rows * t * (6 * dim + 4 * ffn + 3 * heads * t) * act}[m.remat]
    out["activations"] = m.n_layers * saved
    # One layer at a time: its gathered weights, f32 attention scores and probabilities, and
    # the feed-forward hidden state, forward and backward.
    layer_weights = (m.n_params - m.vocab_size * dim * 2) / m.n_layers / model * act
    out["layer"] = (2 * layer_weights + 3 * rows * heads * t * t * 4
                    + 4 * rows * t * ffn * act + 6 * rows * t * dim * act)
    # float32 logits, their log-softmax and gradient, for the vocabulary shard.
    out["logits"] = 3 * rows * t * vocab * 4
    out["temp"] = out["grads"] + out["activations"] + out["layer"] + out["logits"]
    out["total"] = out["params"] + out["opt_state"] + out["batch"] + out["temp"]
    return out


def plan(config: TrainConfig, device_memory: int, *, seq_len: int | None = None,
         mesh: Mesh | None = None) -> Plan:
    """Lower and compile the real train_step on abstract sharded inputs: nothing is allocated."""
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    check_mesh(config, mesh)
    t = seq_len or config.data.max_len
    setup = build(config, mesh, steps_per_epoch=1)
    step = make_train_step(setup)
    b = config.data.batch_size
    batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=setup.batch_sharding) for k in BATCH_KEYS}
    t0 = time.perf_counter()
    with sharding.activate(mesh):
        compiled = step.jitted.lower(setup.abstract_state, batch).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    return Plan(config, mesh.size, t, device_memory,
                params=per_device_bytes(setup.abstract_state.params),
                opt_state=per_device_bytes(setup.abstract_state.opt_state),
                batch=per_device_bytes(batch),
                compiled_arguments=mem.argument_size_in_bytes,
                compiled_outputs=mem.output_size_in_bytes,
                compiled_aliased=mem.alias_size_in_bytes,
                compiled_temp=mem.temp_size_in_bytes,
                analytic=analytic_memory(config, mesh, t), compile_seconds=seconds)
