"""`limajax plan`: compile the real train step ahead of time on abstract sharded inputs and read
its memory per device, beside an estimate by arithmetic. Nothing is allocated, so a 65B run on
an 8x8 mesh is planned on a laptop (jax-stack-notes §6). With a target (limajax/targets.py)
the accelerator's own compiler does it on compile-only devices; without one the CPU compiler
stands in for it (jax-stack-notes §10, README "plan" for how far apart they are)."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from limajax import attention, sharding, targets
from limajax.config import MAX_LEN, ModelConfig, TrainConfig, bucket_length, buckets_for
from limajax.errors import UserError
from limajax.sampling import sampler
from limajax.targets import Target
from limajax.train import BATCH_KEYS, KNOWN_PEAKS, build, make_train_step

LIMA_EXAMPLES = 1000  # LIMA §2: the training set a whole run's estimate is for
# `model.remat: auto` tries these cheapest first: "none" saves every activation, "dots" the
# matmul outputs, "full" only each layer's input (about a third more FLOPs: the forward again).
REMAT_ORDER = ("none", "dots", "full")

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'32GiB' -> 34359738368; '16GB' -> 16e9. A size needs its unit: a bare '32' could mean
    GiB or bytes, and reading it either way has given wrong answers (newcomer F4)."""
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
    compiled: Compiled  # the step's memory as its compiler assigns it, and its cost model
    analytic: dict[str, float]
    kernel: str  # the attention kernel compiled (and estimated)
    platform: str  # whose compiler: "cpu" (the stand-in), "tpu" or "cuda"
    target: Target | None = None
    remat_tried: tuple[tuple[str, str], ...] = ()  # remat auto: (policy, why not) before this
    notices: tuple[str, ...] = ()  # for stderr: replicated parameters, the attention kernel

    def estimates(self) -> list[str]:
        """Step time, tokens/s, MFU and a whole run's time from the compiler's cost model."""
        c, step = self.config, self.compiled.optimal_seconds
        if step is None:
            return [f"estimates: none (the {self.platform} compiler gives no cost model here)"]
        tokens = c.data.batch_size * self.seq_len / step
        kind = self.target.device_kind if self.target else None
        peak = KNOWN_PEAKS.get(kind, {}).get(c.model.dtype)
        mfu = ("MFU unknown" if peak is None else
               f"MFU {tokens * c.model.flops_per_token(self.seq_len) / (peak * self.devices):.0%}")
        steps = math.ceil(LIMA_EXAMPLES / c.data.batch_size) * c.epochs
        return [f"estimates (the {self.platform} compiler's cost model, not a measurement): "
                f"step {step:.3g} s, {tokens:,.0f} tokens/s at full rows, {mfu}; {c.epochs} "
                f"epochs of LIMA's {LIMA_EXAMPLES:,} examples ({steps} steps) "
                f"{steps * step / 3600:.1f} h"]

    @property
    def total(self) -> int:
        return self.compiled.total

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
            f"params {m.param_dtype}, compute {m.dtype}, moments {c.optim.moments_dtype}, "
            f"remat {m.remat}, attention {self.kernel}",
            *[f"remat auto: {policy} does not fit ({why})" for policy, why in self.remat_tried],
            f"{'per device':<34}{'compiled':>14}{'analytic':>14}",
            f"{'  parameters':<34}{gib(self.params):>14}{gib(a['params']):>14}",
            f"{'  optimizer state (AdamW mu, nu)':<34}{gib(self.opt_state):>14}"
            f"{gib(a['opt_state']):>14}",
            f"{'  batch':<34}{gib(self.batch):>14}{gib(a['batch']):>14}",
            f"{'  temporaries (grads, activations)':<34}{gib(self.compiled.temp):>14}"
            f"{gib(a['temp']):>14}",
            f"{'    of which: gradients':<34}{'':>14}{gib(a['grads']):>14}",
            f"{'    of which: AdamW update':<34}{'':>14}{gib(a['update']):>14}",
            f"{'    of which: saved activations':<34}{'':>14}{gib(a['activations']):>14}",
            f"{'    of which: one layer recomputed':<34}{'':>14}{gib(a['layer']):>14}",
            f"{'      (its attention: ' + self.kernel + ')':<34}{'':>14}"
            f"{gib(a['attention']):>14}",
            f"{'    of which: logits and loss':<34}{'':>14}{gib(a['logits']):>14}",
            f"{'  outputs not updated in place':<34}"
            f"{gib(self.compiled.outputs - self.compiled.aliased):>14}{'':>14}",
            f"{'  total':<34}{gib(self.total):>14}{gib(a['total']):>14}",
        ]
        return "\n".join(rows + verdict_rows(
            self.target, self.device_memory, self.total, "used", self.compiled.seconds,
            self.estimates(), ' (README "plan": 40 GiB high for LIMA-65B on one 8x H200 node)'))


def verdict_rows(t: Target | None, device_memory: int, total: int, used: str, seconds: float,
                 estimates: list[str], stand_in: str = "") -> list[str]:
    """A plan's closing lines: the target, whether `total` fits the memory (`used`: of what),
    whose compiler (`stand_in`: what is known of the CPU compiler's distance), and with a
    target the estimates."""
    verdict = (("fits" if total <= device_memory else "DOES NOT FIT")
               + f" ({total / device_memory:.0%} {used})")
    if t is None:
        return [f"device memory {gib(device_memory)}: {verdict}; compiled in {seconds:.1f} s by "
                f"the CPU compiler, a stand-in for the accelerator's{stand_in}; --target "
                "compiles with the accelerator's own"]
    return [f"target {t.name}: {t.devices} devices on {t.hosts} host(s), {gib(t.memory)} per "
            f"device ({t.memory_source}); runtime reserve: {t.reserve_text}",
            f"device memory {gib(device_memory)} usable: {verdict}; compiled in {seconds:.1f} s "
            f"by the {t.platform} compiler", *estimates]


def analytic_memory(config: TrainConfig, mesh: Mesh, seq_len: int,
                    platform: str | None = None) -> dict[str, float]:
    """Bytes per device by arithmetic: fully sharded state, and activations as remat keeps them;
    attention as the kernel `model.attention` means on `platform` (default: this one) keeps it."""
    m, d = config.model, config.data
    data, model = mesh.shape["data"], mesh.shape["model"]
    n_dev = data * model
    act = jnp.dtype(m.dtype).itemsize
    n = m.n_params + (m.padded_vocab_size - m.vocab_size) * m.dim * (
        1 if m.tie_embeddings else 2)
    param_bytes = jnp.dtype(m.param_dtype).itemsize
    moment_bytes = jnp.dtype(config.optim.moments_dtype).itemsize
    rows = (d.micro_batch_size or d.batch_size) // data  # rows per device in one micro batch
    t, dim = seq_len, m.dim
    heads, ffn, vocab = m.n_heads // model, m.ffn_dim // model, m.padded_vocab_size // model
    out = {"params": n * param_bytes / n_dev, "opt_state": 2 * n * moment_bytes / n_dev,
           "batch": len(BATCH_KEYS) * d.batch_size * t * 4 / data}
    # + the running sum, unless remat full, where the layers' backward pass adds into it
    # (model.layers_adding_into) and only the few parameters outside the layers come twice.
    accumulators = 1 if d.accumulation_steps == 1 or m.remat == "full" else 2
    out["grads"] = accumulators * n * 4 / n_dev
    # AdamW's update is computed whole (float32, like the parameters) before it is applied:
    # one more parameter-sized tree. This is the 4.3 GiB the compiler reported above the
    # arithmetic for LIMA-65B on 8x8 before it was counted (3.8 GiB of it).
    out["update"] = n * 4 / n_dev
    # remat "full" keeps each layer's input (the residual stream) for the backward pass.
    saved = {"full": rows * t * dim * act,
             "dots": rows * t * (4 * dim + 3 * ffn + 2 * m.n_heads // model * m.head_dim) * act,
             "none": rows * t * (6 * dim + 4 * ffn + 3 * heads * t) * act}[m.remat]
    out["activations"] = m.n_layers * saved
    # One layer at a time: its gathered weights, attention, and the feed-forward hidden state,
    # forward and backward. XLA's attention holds float32 scores and probabilities [T, T] per
    # head (and their gradient); a fused kernel only its output and a logsumexp per query.
    kernel = attention.choose(m.attention, platform)
    scores = (3 * rows * heads * t * t * 4 if kernel == "xla"
              else rows * heads * t * (2 * m.head_dim * act + 2 * 4))
    out["attention"] = scores
    layer_weights = (m.n_params - m.vocab_size * dim * 2) / m.n_layers / model * act
    out["layer"] = 2 * layer_weights + scores + (4 * ffn + 6 * dim) * rows * t * act
    # float32 logits, their log-softmax and gradient, for the vocabulary shard.
    out["logits"] = 3 * rows * t * vocab * 4
    out["temp"] = (out["grads"] + out["update"] + out["activations"] + out["layer"]
                   + out["logits"])
    out["total"] = out["params"] + out["opt_state"] + out["batch"] + out["temp"]
    return out


def placed(config: TrainConfig, device_memory: int | None, mesh: Mesh | None,
           target: Target | None) -> tuple[Mesh, int]:
    """The mesh to compile on and the memory per device to plan against: with `target`, its
    compile-only devices and usable memory (unless `device_memory` says otherwise)."""
    if target is not None:
        targets.check_mesh(target, config.mesh, sharding.mesh_devices(config.mesh))
        if mesh is None:
            mesh = sharding.make_mesh(config.mesh, targets.compile_only_devices(target))
        device_memory = target.usable if device_memory is None else device_memory
    if device_memory is None:
        raise UserError("plan: give --device-memory (or --target)")
    return (sharding.make_mesh(config.mesh) if mesh is None else mesh), device_memory


def plan(config: TrainConfig, device_memory: int | None = None, *, seq_len: int | None = None,
         mesh: Mesh | None = None, target: Target | None = None) -> Plan:
    """Lower and compile the real train_step on abstract sharded inputs: nothing is allocated.
    With `target`, on its compile-only devices by its compiler, against its usable memory
    (unless `device_memory` says otherwise). `model.remat: auto` takes the cheapest policy that
    fits (REMAT_ORDER)."""
    mesh, device_memory = placed(config, device_memory, mesh, target)
    m = config.model  # a kernel the platform lacks fails here, before any compile
    notices = (*sharding.replication_notices(m, mesh), attention.describe(
        m.attention, mesh.devices.flat[0].platform, (m.n_heads, m.n_kv_heads, mesh.shape["model"])))
    t = seq_len or config.data.max_len
    if config.model.remat != "auto":
        return _compile(config, device_memory, t, mesh, target, notices)
    tried = []
    for policy in REMAT_ORDER:
        candidate = dataclasses.replace(config, model=config.model.replace(remat=policy))
        platform = mesh.devices.flat[0].platform
        estimate = analytic_memory(candidate, mesh, t, platform)["total"]
        # The arithmetic is within some 20% of the compilers (README): a policy it puts far
        # past the memory is not worth a compile.
        if policy != REMAT_ORDER[-1] and estimate > 1.25 * device_memory:
            tried.append((policy, f"arithmetic: {gib(estimate)}, not compiled"))
            continue
        result = _compile(candidate, device_memory, t, mesh, target, notices)
        if result.fits or policy == REMAT_ORDER[-1]:
            result.remat_tried = tuple(tried)
            return result
        tried.append((policy, f"compiled: {gib(result.total)}"))
    raise AssertionError("unreachable")


def resolve_remat(config: TrainConfig, mesh: Mesh) -> tuple[TrainConfig, str]:
    """`train` with `model.remat: auto`: the policy plan chooses against the memory JAX may use
    on this mesh's devices, and the line saying so. A CPU reports no limit: "full" there."""
    stats = mesh.devices.flat[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        chosen = dataclasses.replace(config, model=config.model.replace(remat="full"))
        return chosen, ("remat auto: full (this device reports no memory limit to plan "
                        "against; --set model.remat=none|dots to choose)")
    limit = stats["bytes_limit"]
    result = plan(config, limit, mesh=mesh)
    chosen = result.config  # the recipe with the policy that fits
    why = "".join(f"; {p} does not fit ({w})" for p, w in result.remat_tried)
    return chosen, (f"remat auto: {chosen.model.remat} (plan: {gib(result.total)} of "
                    f"{gib(limit)} per device{why})")


def _compile(config: TrainConfig, device_memory: int, t: int, mesh: Mesh,
             target: Target | None, notices: tuple[str, ...]) -> Plan:
    sharding.check(config, mesh)
    platform = mesh.devices.flat[0].platform
    setup = build(config, mesh, steps_per_epoch=1)
    step = make_train_step(setup)
    b = config.data.batch_size
    batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=setup.batch_sharding) for k in BATCH_KEYS}
    c = compile_memory(step, mesh, setup.abstract_state, batch)
    return Plan(config, mesh.size, t, device_memory,
                params=per_device_bytes(setup.abstract_state.params),
                opt_state=per_device_bytes(setup.abstract_state.opt_state),
                batch=per_device_bytes(batch),
                compiled=c, analytic=analytic_memory(config, mesh, t, platform),
                kernel=attention.choose(config.model.attention, platform),
                platform=platform, target=target, notices=notices)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Per-device bytes of one compiled program as its compiler assigns them, and its cost
    model (None where the compiler has none)."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments
    temp: int
    seconds: float  # compile time
    cost: dict | None = None
    out_shardings: Any = None

    @property
    def total(self) -> int:
        """What the program needs at its peak: inputs + outputs not written in place +
        temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temp

    @property
    def optimal_seconds(self) -> float | None:
        seconds = (self.cost or {}).get("optimal_seconds")
        return float(seconds) if seconds and seconds > 0 else None


def compile_memory(jitted, mesh: Mesh, *abstract_args) -> Compiled:
    """Lower and compile `jitted` on abstract sharded arguments (nothing allocated) and read
    its memory and cost analyses."""
    t0 = time.perf_counter()
    try:
        with sharding.activate(mesh):
            compiled = jitted.lower(*abstract_args).compile()
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        sizes = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                 mem.temp_size_in_bytes)
        outs = compiled.output_shardings
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program past the chip's HBM, naming its temporaries
        # ("HLO temporaries (139.75G) exceeds available HBM (95.74G)"): that is a plan too.
        found = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or found is None:
            raise
        cost, outs = None, None
        sizes = (per_device_bytes(abstract_args), 0, 0, int(float(found.group(1)) * 2**30))
    return Compiled(*sizes, seconds=time.perf_counter() - t0, cost=dict(cost) if cost else None,
                    out_shardings=outs)


# --- `plan --sample BATCHxCONTEXT`: the sampler's prefill and decode step -------------------


def parse_sample(text: str) -> tuple[int, int]:
    """'8x2048' -> (rows, context tokens)."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text.lower())
    if not m or not int(m.group(1)) or not int(m.group(2)):
        raise UserError(f"--sample {text!r}: expected BATCHxCONTEXT with positive integers, "
                        "e.g. 8x2048 (rows decoded together x prompt + answer tokens)")
    return int(m.group(1)), int(m.group(2))


@dataclasses.dataclass
class SamplePlan:
    """Per-device memory of LIMA's sampler (sampling/sampler.py) on an inference mesh: the
    prefill of `batch` prompts into a KV cache of `cache_length` slots, and one decode step
    over that cache, each compiled by the mesh's compiler."""

    model: ModelConfig
    mesh: str
    devices: int
    batch: int
    context: int
    cache_length: int  # the cache bucket the sampler pads `context` to
    device_memory: int
    params: int
    cache: int  # the KV cache: 2 x layers x rows x slots x K/V heads x head_dim per shard
    state: int  # the rest of the decode state (tokens, seen ids, logits, log-probs)
    prefill: Compiled
    decode: Compiled
    platform: str
    target: Target | None = None
    notices: tuple[str, ...] = ()  # for stderr: the parameters the mesh replicates

    @property
    def total(self) -> int:
        return max(self.prefill.total, self.decode.total)

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory

    def estimates(self) -> list[str]:
        """Prefill time and decode tokens/s from the compiler's cost model."""
        pre, step = self.prefill.optimal_seconds, self.decode.optimal_seconds
        if pre is None or step is None:
            given = [f"{name} {c.cost['optimal_seconds']:.3g}" for name, c in
                     (("prefill", self.prefill), ("decode", self.decode))
                     if "optimal_seconds" in (c.cost or {})]
            why = (f"its cost model gives no valid time: optimal_seconds {', '.join(given)}"
                   if given else "it gives no cost model here")
            return [f"estimates: none (the {self.platform} compiler: {why})"]
        return [f"estimates (the {self.platform} compiler's cost model, not a measurement): "
                f"prefill of {self.batch} x {self.cache_length} tokens {pre:.3g} s; decode "
                f"step {step * 1e3:.3g} ms over the full cache, {self.batch / step:,.0f} "
                "tokens/s"]

    def format(self) -> str:
        m = self.model
        rows = [
            f"plan --sample: {m.n_params / 1e9:,.2f}B parameters, mesh {self.mesh} "
            f"({self.devices} devices), {self.batch} rows x {self.context} tokens (cache "
            f"{self.cache_length} slots; prefill of prompts that fill it), params "
            f"{m.param_dtype}, compute and cache {m.dtype}, attention xla (the cached path)",
            f"{'per device':<34}{'prefill':>14}{'decode step':>14}",
            f"{'  parameters':<34}{gib(self.params):>14}{gib(self.params):>14}",
            f"{'  KV cache':<34}{gib(self.cache):>14}{gib(self.cache):>14}",
            f"{'  other decode state':<34}{gib(self.state):>14}{gib(self.state):>14}",
            f"{'  compiled: arguments':<34}{gib(self.prefill.arguments):>14}"
            f"{gib(self.decode.arguments):>14}",
            f"{'  compiled: temporaries':<34}{gib(self.prefill.temp):>14}"
            f"{gib(self.decode.temp):>14}",
            f"{'  compiled: outputs not in place':<34}"
            f"{gib(self.prefill.outputs - self.prefill.aliased):>14}"
            f"{gib(self.decode.outputs - self.decode.aliased):>14}",
            f"{'  total':<34}{gib(self.prefill.total):>14}{gib(self.decode.total):>14}",
        ]
        return "\n".join(rows + verdict_rows(self.target, self.device_memory, self.total,
                                             "used at the larger",
                                             self.prefill.seconds + self.decode.seconds,
                                             self.estimates()))


def plan_sample(config: TrainConfig, batch: int, context: int,
                device_memory: int | None = None, *, mesh: Mesh | None = None,
                target: Target | None = None) -> SamplePlan:
    """Compile the sampler's prefill and one decode step, as `sample` and `serve` run them
    (run_batch: rows over `data`, the model and its cache over `model`), on abstract inputs:
    nothing is allocated. `batch` is rounded up to whole rows per data shard and `context` to
    the sampler's cache bucket, as `sample` does."""
    mesh, device_memory = placed(config, device_memory, mesh, target)
    m = config.model
    limit = min(MAX_LEN, m.max_seq_len)  # sampler.context_length
    if context > limit:
        raise UserError(f"--sample ...x{context}: this model's context is {limit} tokens")
    b = sharding.whole_rows(batch, mesh)
    length = bucket_length(context, buckets_for(limit))
    graphdef, abstract = sharding.abstract_model(m, mesh)
    params = nnx.to_pure_dict(abstract)
    rows = sharding.batch_sharding(mesh)

    def row_array(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rows)

    knobs = sampler.Knobs(*(row_array((b,), dtype) for dtype in (
        jnp.float32, jnp.float32, jnp.float32, jnp.bool_, jnp.bool_, jnp.bool_)))
    prompts = (row_array((b, length), jnp.int32), row_array((b,), jnp.int32),
               row_array((b,), jnp.int32), knobs, row_array((b, 2), jnp.uint32))

    def prefill(params, *inputs):
        return sampler.prefill(nnx.merge(graphdef, params), *inputs, cache_length=length)

    pre = compile_memory(jax.jit(prefill), mesh, params, *prompts)
    with sharding.activate(mesh):
        shapes = jax.eval_shape(prefill, params, *prompts)
    # The decode step takes the state as prefill lays it out; where the TPU compiler refused
    # prefill (past its HBM) there is none, so as the sampler constrains it.
    layout = pre.out_shardings or jax.tree.map(lambda _: rows, shapes)._replace(
        cache=sharding.cache_shardings(m, b, length, mesh))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         shapes, layout)

    def step(params, state, stops):
        return sampler.step(nnx.merge(graphdef, params), state, stops)

    stops = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=sharding.replicated_sharding(mesh))
    dec = compile_memory(jax.jit(step, donate_argnums=1), mesh, params, state, stops)
    cache = per_device_bytes(state.cache)
    platform = mesh.devices.flat[0].platform
    return SamplePlan(m, config.mesh, mesh.size, b, context, length, device_memory,
                      params=per_device_bytes(params), cache=cache,
                      state=per_device_bytes(state) - cache, prefill=pre, decode=dec,
                      platform=platform, target=target,
                      notices=tuple(sharding.replication_notices(m, mesh)))
