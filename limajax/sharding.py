"""Where every array lives: a `data x model` mesh and the one table from logical axes to it.

Parameters are sharded on both axes (DESIGN §4): fully sharded data parallel over `data`
(ZeRO-3: each device holds 1/D of every matrix along `embed`) and tensor parallel over `model`
(heads, mlp, vocab). Activations are split by batch over `data` and by heads/mlp over `model`.
This table is the only place parallelism is decided.
"""

from __future__ import annotations

import contextlib
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from limajax.config import ModelConfig
from limajax.errors import UserError
from limajax.model import Llama

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
    # activations
    ("act_batch", "data"),
    ("act_heads", "model"),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
)


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


def ensure_devices(n: int) -> None:
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


def make_mesh(spec: str | tuple[int, int], devices=None) -> Mesh:
    """A (data, model) mesh over all devices; the shape must use every one of them."""
    data, model = parse_mesh(spec) if isinstance(spec, str) else spec
    devices = jax.devices() if devices is None else devices
    if data * model != len(devices):
        raise UserError(f"mesh {data}x{model} needs {data * model} devices, found "
                        f"{len(devices)} ({devices[0].platform})")
    grid = np.asarray(devices).reshape(data, model)
    return Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def single_device_mesh() -> Mesh:
    return make_mesh((1, 1), jax.devices()[:1])


def spec_for(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
             replicated: list[str] | None = None) -> PartitionSpec:
    """Logical names -> PartitionSpec; a dimension its mesh axis does not divide is replicated
    (e.g. LLaMA-33B's 52 heads on a model axis of 8) and, if asked, reported."""
    rules = dict(RULES)
    axes = []
    for name, size in zip(names, shape, strict=True):
        axis = rules.get(name) if name is not None else None
        if axis is not None and size % mesh.shape[axis]:
            if replicated is not None:
                replicated.append(f"{name} ({size}) over {axis} ({mesh.shape[axis]})")
            axis = None
        axes.append(axis)
    return PartitionSpec(*axes)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, replicated: list[str] | None = None):
    """NamedShardings for every variable of an (abstract) model state, from its logical names."""

    def sharding(v: nnx.Variable):
        names = v.get_metadata().get("out_sharding") or (None,) * len(v.get_value().shape)
        return v.replace(NamedSharding(mesh, spec_for(names, v.get_value().shape, mesh,
                                                      replicated)))

    return jax.tree.map(sharding, state, is_leaf=_is_variable)


def abstract_model(config: ModelConfig, mesh: Mesh, replicated: list[str] | None = None):
    """(graphdef, abstract param state with shardings): a model's plan, nothing allocated."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    shardings = state_shardings(state, mesh, replicated)
    abstract = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                    sharding=s.get_value())),
        state, shardings, is_leaf=_is_variable)
    return graphdef, abstract


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token arrays [B, T]: rows split over `data`, replicated over `model`."""
    return NamedSharding(mesh, PartitionSpec("data"))


@contextlib.contextmanager
def activate(mesh: Mesh):
    """The mesh and the logical rules in force while tracing the model."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        yield
