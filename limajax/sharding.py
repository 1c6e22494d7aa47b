"""Where every array lives: a `data x model` mesh and the one table from logical axes to it.

Parameters are sharded on both axes (DESIGN §4): fully sharded data parallel over `data`
(ZeRO-3: each device holds 1/D of every matrix along `embed`) and tensor parallel over `model`
(heads, mlp, vocab). Activations (and the KV cache) are split by batch over `data` and by
heads/mlp over `model`. This module is the only place parallelism is decided: the table, the
one resolver from logical names to a PartitionSpec (the model's activation constraints use it
through `activate`), every sharding built from them, the divisibility checks, and starting the
devices and processes of a run.
"""

from __future__ import annotations

import contextlib
import os
import sys

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from limajax import model as model_lib
from limajax.config import ModelConfig, TrainConfig
from limajax.errors import UserError
from limajax.model import KVCache, Llama, logical_axes

RULES: tuple[tuple[str, str | None], ...] = (
    # parameters
    ("vocab", "model"),
    ("embed", "data"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations and the KV cache
    ("act_batch", "data"),
    ("act_heads", "model"),
    ("act_kv_heads", "model"),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
)
CACHE_AXES = ("layers", "act_batch", None, "act_kv_heads", None)  # KVCache [L, B, S, K, H]


# --- devices, processes and the mesh -------------------------------------------------------------


def parse_mesh(spec: str) -> tuple[int, int]:
    """'8x8' -> (data, model) = (8, 8)."""
    parts = spec.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--mesh {spec!r}: expected DATAxMODEL with positive integers, e.g. 2x4")
    return int(parts[0]), int(parts[1])


def mesh_devices(spec: str) -> int:
    """How many devices a 'DxM' mesh spans."""
    data, model = parse_mesh(spec)
    return data * model


def start(mesh: str, coordinator: str | None = None, num_processes: int | None = None,
          process_id: int | None = None) -> None:
    """Ready the devices of a run on `mesh` before JAX's first operation: join a multi-process
    run if asked (or if SLURM / a TPU pod says so), and on a CPU host simulate the devices the
    mesh needs (DESIGN §4). Every command that uses devices calls this first."""
    devices = mesh_devices(mesh)
    if coordinator is not None or num_processes is not None or process_id is not None:
        if None in (coordinator, num_processes, process_id):
            raise UserError("--coordinator, --num-processes and --process-id go together")
        if devices % num_processes:
            raise UserError(f"mesh {mesh} ({devices} devices) does not split over "
                            f"{num_processes} processes")
        # Each CPU process simulates its share of the mesh (no effect on accelerators). Not
        # simulate_devices: it queries the backend, which must wait for initialize().
        jax.config.update("jax_num_cpu_devices", devices // num_processes)
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get(
            "TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # JAX finds the coordinator on SLURM and TPU pods
        return
    simulate_devices(devices)


def simulate_devices(n: int) -> None:
    """On a CPU host, simulate n devices if a mesh needs more than there are (DESIGN §4).

    Must run before JAX's first operation: the CPU device count is fixed once the backend
    starts. On accelerators this changes nothing and the real device count is checked later.
    """
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        return  # backend already running: make_mesh checks the count
    if jax.default_backend() == "cpu" and n > 1:
        print(f"notice: simulating {n} devices on the CPU", file=sys.stderr)


def make_mesh(spec: str, devices=None) -> Mesh:
    """A (data, model) mesh over all devices; the shape must use every one of them."""
    data, model = parse_mesh(spec)
    devices = jax.devices() if devices is None else devices
    if data * model != len(devices):
        raise UserError(f"mesh {data}x{model} needs {data * model} devices, found "
                        f"{len(devices)} ({devices[0].platform})")
    grid = np.asarray(devices).reshape(data, model)
    return Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def inference_mesh(spec: str) -> Mesh:
    """The mesh of score, sample, chat and serve: the first devices that `spec` ('DxM') needs
    (a host may have more than one command uses)."""
    return make_mesh(spec, jax.devices()[:mesh_devices(spec)])


def single_device_mesh() -> Mesh:
    return inference_mesh("1x1")


def check(config: TrainConfig, mesh: Mesh) -> None:
    """Divisibility a train step relies on, checked before anything is built (DESIGN §2)."""
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


def whole_rows(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up so the rows split evenly over the data axis."""
    data = mesh.shape["data"]
    return data * -(-batch_size // data)


# --- the one resolver ------------------------------------------------------------------------


def spec_for(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
             replicated: list[tuple[str, int, str]] | None = None) -> PartitionSpec:
    """Logical names -> PartitionSpec; a dimension its mesh axis does not divide is replicated
    (e.g. LLaMA-33B's 52 heads on a model axis of 8) and, if asked, reported as (logical
    name, size, mesh axis) in `replicated`."""
    rules = dict(RULES)
    axes = []
    for name, size in zip(names, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        if axis is not None and size % mesh.shape[axis]:
            if replicated is not None:
                replicated.append((name, size, axis))
            axis = None
        axes.append(axis)
    return PartitionSpec(*axes)


@contextlib.contextmanager
def activate(mesh: Mesh):
    """The mesh, the logical rules and the model's activation layout (this module's resolver)
    in force while tracing the model."""
    token = model_lib.ACTIVATION_LAYOUT.set(lambda names, shape: spec_for(names, shape, mesh))
    try:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
            yield
    finally:
        model_lib.ACTIVATION_LAYOUT.reset(token)


# --- shardings of parameters, optimiser state, batches and caches ---------------------------------


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh,
                    replicated: list[tuple[str, int, str]] | None = None):
    """NamedShardings for every variable of an (abstract) model state, from its logical names."""

    def sharding(v: nnx.Variable):
        shape = v.get_value().shape
        return v.replace(NamedSharding(mesh, spec_for(logical_axes(v), shape, mesh, replicated)))

    return jax.tree.map(sharding, state, is_leaf=_is_variable)


def replication_notices(config: ModelConfig, mesh: Mesh) -> list[str]:
    """One line per parameter whose dimension its mesh axis does not divide, which is therefore
    replicated over that axis (as is standard for K/V heads fewer than the model axis, e.g. 70B's
    8 on 16), with what the copy costs each device: never silent (review R3)."""
    state = nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    itemsize = np.dtype(config.param_dtype).itemsize
    lines = []
    for path, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_variable):
        shape, dropped = v.get_value().shape, []
        spec = spec_for(logical_axes(v), shape, mesh, dropped)
        if not dropped:
            continue
        kept = int(np.prod([mesh.shape[a] for a in spec if a is not None]))
        lost = int(np.prod([mesh.shape[axis] for _, _, axis in dropped]))
        what = ", ".join(f"{n} ({size}) over {axis} ({mesh.shape[axis]})"
                         for n, size, axis in dropped)
        per_device = int(np.prod(shape)) * itemsize / kept
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        lines.append(f"notice: {name} {list(shape)}: {what} does not divide, so it "
                     f"is replicated there: +{(per_device - per_device / lost) / 2**20:,.2f} MiB "
                     f"per device ({config.param_dtype}; AdamW's two moments add twice that in "
                     "training)")
    return lines


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (scalars: the step, the RNG key, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token arrays [B, T]: rows split over `data`, replicated over `model`."""
    return NamedSharding(mesh, PartitionSpec("data"))


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Micro batches [n_micro, B/n_micro, T]: each micro batch split over `data` like a batch."""
    return NamedSharding(mesh, PartitionSpec(None, "data"))


def opt_state_shardings(tx: optax.GradientTransformation, opt_abstract, param_shardings,
                        mesh: Mesh):
    """Adam's moments live where their parameters do; counters are replicated."""
    return optax.tree_map_params(
        tx, lambda _, s: s, opt_abstract, param_shardings,
        transform_non_params=lambda _: replicated_sharding(mesh),
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def cache_shardings(config: ModelConfig, batch: int, length: int, mesh: Mesh) -> KVCache:
    """Where a KVCache.empty(config, batch, length) lives: like the activations it holds."""
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    s = NamedSharding(mesh, spec_for(CACHE_AXES, shape, mesh))
    return KVCache(s, s)


# --- models placed on a mesh ---------------------------------------------------------------------


def abstract_model(config: ModelConfig, mesh: Mesh,
                   replicated: list[tuple[str, int, str]] | None = None):
    """(graphdef, abstract param state with shardings): a model's plan, nothing allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    shardings = state_shardings(state, mesh, replicated)
    abstract = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                    sharding=s.get_value())),
        state, shardings, is_leaf=_is_variable)
    return graphdef, abstract


def abstract_params(config: ModelConfig, mesh: Mesh | None = None) -> dict:
    """The params' ShapeDtypeStructs placed by the sharding table on `mesh` (None: the first
    device): targets to restore into."""
    return nnx.to_pure_dict(abstract_model(config, mesh or single_device_mesh())[1])


def init_model(config: ModelConfig, mesh: Mesh, seed: int = 0) -> Llama:
    """A randomly initialised model, each shard created on its own device (never whole)."""
    graphdef, abstract = abstract_model(config, mesh)
    out_shardings = jax.tree.map(lambda v: v.get_value().sharding, abstract, is_leaf=_is_variable)

    def init():
        return nnx.state(Llama(config, rngs=nnx.Rngs(seed)))

    with activate(mesh):
        state = jax.jit(init, out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)


def model_from_params(config: ModelConfig, params: dict, mesh: Mesh | None = None) -> Llama:
    """A model holding `params` (a pure dict, e.g. from convert or a model directory), placed
    according to the sharding table on `mesh` (one device if None)."""
    mesh = single_device_mesh() if mesh is None else mesh
    graphdef, abstract = abstract_model(config, mesh)
    expected = nnx.to_pure_dict(abstract)
    shapes_ok = jax.tree.map(lambda a, p: a.shape == np.shape(p), expected, params)
    if not all(jax.tree.leaves(shapes_ok)):
        bad = [jax.tree_util.keystr(k) for k, ok in jax.tree_util.tree_leaves_with_path(shapes_ok)
               if not ok]
        raise UserError(f"parameters do not match the model config: {', '.join(bad)}")

    def place(a: jax.ShapeDtypeStruct, p):
        # jax arrays (e.g. restored into their shards) move device to device, never via host.
        p = p.astype(a.dtype) if isinstance(p, jax.Array) else np.asarray(p, a.dtype)
        return jax.device_put(p, a.sharding)

    placed = jax.tree.map(place, expected, params)
    nnx.replace_by_pure_dict(abstract, placed)
    return nnx.merge(graphdef, abstract)
