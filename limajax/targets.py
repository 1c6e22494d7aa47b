"""Accelerator slices `limajax plan --target` compiles for, without the hardware: compile-only
devices from the accelerator's own compiler (jax-stack-notes §10; MaxText's train_compile.py).

TPU slices are libtpu topologies (`jax[tpu]`); GPU hosts are XLA's CUDA compiler (`cuda-plan` extra)
given a device description (a GpuTargetConfigProto in text form, shipped in limajax/gpu_specs/,
derived from XLA's own xla/tools/hlo_opt/gpu_specs: each file says how). Cloud TPU names count
TensorCores for v5p (two per chip: v5p-8 is 4 chips) and chips for v5e and v6e. v4 is left
out: libtpu's compile-only v4 topologies have one device per TensorCore (v4:2x2x4 gives 32),
where JAX on a v4 slice sees one per chip (megacore), so its plans would be per core.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from jax.experimental import topologies

from limajax.errors import UserError

GPU_SPECS = Path(__file__).parent / "gpu_specs"
# What JAX may take of a GPU's memory when limajax plans or trains on one. The rest is the
# runtime's: the CUDA context, cuBLAS/cuDNN workspaces and NCCL's buffers, which the compiler
# does not see (JAX's default share is 0.75). `train` on a GPU sets XLA_PYTHON_CLIENT_MEM_FRACTION
# to this unless the user set it.
GPU_MEMORY_FRACTION = 0.89
# The TPU runtime keeps its own reserve out of the HBM the compiler is given.
TPU_MEMORY_FRACTION = 1.0


def share_gpu_memory() -> None:
    """`train`: let JAX take GPU_MEMORY_FRACTION of each GPU's memory, as `plan --target` plans
    against, unless the user set XLA_PYTHON_CLIENT_MEM_FRACTION. It must be set before JAX
    starts and changes nothing off a GPU."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(GPU_MEMORY_FRACTION))


def gpu_memory_notice() -> str:
    """The line `train` logs on a GPU: the share of its memory JAX may take."""
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")  # JAX's default
    return (f"notice: JAX may use {float(fraction):.0%} of each GPU's memory "
            f"(XLA_PYTHON_CLIENT_MEM_FRACTION={fraction}; `limajax plan --target` plans "
            f"against {GPU_MEMORY_FRACTION:.0%})")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" or "cuda"
    topology: str  # libtpu topology name, or the gpu_specs file's stem
    hosts: int
    devices: int
    memory: int  # bytes per device, from `memory_source`
    memory_source: str
    device_kind: str  # train.KNOWN_PEAKS' name for its peak FLOP/s

    @property
    def usable(self) -> int:
        """Device memory less the runtime's reserve: what a plan must fit."""
        share = GPU_MEMORY_FRACTION if self.platform == "cuda" else TPU_MEMORY_FRACTION
        return int(self.memory * share)

    @property
    def reserve_text(self) -> str:
        if self.platform == "cuda":
            return (f"{1 - GPU_MEMORY_FRACTION:.0%} kept for the CUDA context, cuBLAS/cuDNN "
                    f"workspaces and NCCL (XLA_PYTHON_CLIENT_MEM_FRACTION={GPU_MEMORY_FRACTION})")
        return "none beyond the TPU runtime's own (its compiler is given the chip's HBM)"

    @property
    def extra(self) -> str:
        """The pip extra with its compiler: cuda-plan compiles for a GPU, cuda runs on one."""
        return "tpu" if self.platform == "tpu" else "cuda-plan"


_GIB = 2**30


def _tpu(name, topology, hosts, chips, gib, kind):
    return Target(name, "tpu", topology, hosts, chips, gib * _GIB,
                  f"{gib} GiB HBM per chip, Cloud TPU documentation", kind)


def _gpu(name, spec, hosts, per_host, kind):
    text = (GPU_SPECS / f"{spec}.txtpb").read_text()
    size = int(next(line.split(":")[1] for line in text.splitlines()
                    if line.strip().startswith("device_memory_size")))
    return Target(name, "cuda", spec, hosts, hosts * per_host, size,
                  f"device_memory_size in limajax/gpu_specs/{spec}.txtpb", kind)


TARGETS: dict[str, Target] = {t.name: t for t in (
    _tpu("v5e-8", "v5e:2x4", 1, 8, 16, "TPU v5 lite"),
    _tpu("v5e-16", "v5e:4x4", 4, 16, 16, "TPU v5 lite"),
    _tpu("v5e-64", "v5e:8x8", 16, 64, 16, "TPU v5 lite"),
    _tpu("v5p-8", "v5p:2x2x1", 1, 4, 95, "TPU v5"),
    _tpu("v5p-16", "v5p:2x2x2", 2, 8, 95, "TPU v5"),
    _tpu("v5p-128", "v5p:4x4x4", 16, 64, 95, "TPU v5"),
    _tpu("v6e-8", "v6e:2x4", 1, 8, 32, "TPU v6 lite"),
    _tpu("v6e-16", "v6e:4x4", 4, 16, 32, "TPU v6 lite"),
    _gpu("a100-80gbx8", "a100-80gb", 1, 8, "NVIDIA A100"),
    _gpu("h100x8", "h100", 1, 8, "NVIDIA H100"),
    _gpu("h200x8", "h200", 1, 8, "NVIDIA H200"),
    _gpu("2xh200x8", "h200", 2, 8, "NVIDIA H200"),
    _gpu("b200x8", "b200", 1, 8, "NVIDIA B200"),
)}


def find(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"--target {name!r}: unknown; known: {', '.join(TARGETS)} "
                        "(`limajax plan --list-targets`)")
    return TARGETS[name]


def listing() -> str:
    """`plan --list-targets`: each target, its devices and memory per device, and the source."""
    rows = [f"{'target':<13}{'devices':>8}{'hosts':>7}{'memory/device':>15}  source"]
    for t in TARGETS.values():
        rows.append(f"{t.name:<13}{t.devices:>8}{t.hosts:>7}{t.memory / _GIB:>11.1f} GiB  "
                    f"{t.memory_source}; {t.platform} compiler via limajax[{t.extra}]")
    return "\n".join(rows)


def compile_only_devices(target: Target) -> list:
    """The target's devices as its compiler sees them (nothing runs on them). A UserError
    naming the extra to install when its compiler is missing."""
    missing = UserError(f"--target {target.name} needs the {target.platform.upper()} compiler: "
                        f'pip install "limajax[{target.extra}]"')
    if target.platform == "tpu":
        if not _installed("libtpu"):
            raise missing
        # No TPU VM here: tell libtpu so, or it prints warnings about its metadata server.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name.replace("v5e", "v5litepod"))
        # libtpu takes /tmp/libtpu_lockfile so that two processes never drive the same chips;
        # a second process that loads it meanwhile fails ("ABORTED: Internal error when
        # accessing libtpu multi-process lockfile"), which two plans or CI's tests running at
        # once hit. Compile-only devices open no chip, so the lock protects nothing here.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        return list(topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology).devices)
    if not _installed("jax_plugins.xla_cuda12"):
        raise missing
    # No driver here: let the plugin register anyway (it only compiles).
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    per_host = target.devices // target.hosts
    topo = topologies.get_topology_desc(
        platform="cuda", topology_name=target.topology,
        target_config=(GPU_SPECS / f"{target.topology}.txtpb").read_text(),
        topology=f"1x{target.hosts}x{per_host}")
    devices = list(topo.devices)
    assert len(devices) == target.devices, (target, len(devices))
    return devices


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def check_mesh(target: Target, mesh: str, devices_in_mesh: int) -> None:
    if devices_in_mesh != target.devices:
        shapes = [f"{d}x{target.devices // d}" for d in range(1, target.devices + 1)
                  if target.devices % d == 0]
        raise UserError(f"--mesh {mesh} has {devices_in_mesh} devices; --target {target.name} has "
                        f"{target.devices} (try --mesh {' or '.join(shapes[:4])}"
                        f"{', ...' if len(shapes) > 4 else ''})")
