"""softmax(q k^T / sqrt(H)) v, masked by causality and by segment, through one of several kernels.

    xla     two einsums over the whole [B, K, Q, S] score tensor: the reference, any platform
    cudnn   jax.nn.dot_product_attention's cuDNN fused kernel (GPU); its public API takes no
            segment ids, so packed rows pass a dense [B, 1, T, S] segment mask
    pallas  Pallas GPU flash attention (Triton), which takes segment ids itself
    splash  Pallas TPU splash attention with SegmentIds, inside shard_map
`auto` takes splash on TPU, pallas on GPU (it honours segments without a dense mask; which of
pallas and cudnn is faster has not been measured here: tools/bench_gpu.py measures both) and
xla elsewhere. On CPU the Pallas kernels run in their interpreter, which is how they are tested.

Shapes as in model.py: q [B, T, N, H], k and v [B, S, K, H]; positions and segment ids [B, T].
Segment 0 is padding; with no segment ids every token belongs to one sequence.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from limajax.config import ATTENTION_KERNELS as KERNELS
from limajax.errors import UserError


def platform_here() -> str:
    """The platform being compiled for: the active mesh's devices (compile-only TPU or GPU
    devices under `limajax plan --target`), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    return _family(jax.default_backend() if mesh.empty else mesh.abstract_device.platform)


def _family(platform: str) -> str:
    return "gpu" if platform in ("cuda", "rocm") else platform


def choose(kernel: str, platform: str | None = None) -> str:
    """The kernel `auto` means on `platform` (default: platform_here); others are themselves."""
    if kernel != "auto":
        return kernel
    platform = platform_here() if platform is None else _family(platform)
    return {"tpu": "splash", "gpu": "pallas"}.get(platform, "xla")


def xla(q, k, v, q_positions, k_positions, q_segments=None, k_segments=None):
    """The reference: every score materialised; causal by position, so it also serves the KV
    cache (keys at cache slots 0..S-1, queries at their positions)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    g = n // kv
    # Each K/V head serves G query heads: fold them into the query axis (Q = T*G), so
    # attention is two 4-D einsums, ~1.9x faster forward+backward than 5-D ones on XLA CPU.
    q = q.reshape(b, t, kv, g, h).swapaxes(2, 3).reshape(b, t * g, kv, h)
    scores = jnp.einsum("BQKH,BSKH->BKQS", q, k, preferred_element_type=jnp.float32)
    # Key s is visible to query q iff s <= q's position and, when packed, in q's segment.
    visible = k_positions[:, None, :] <= jnp.repeat(q_positions, g, axis=1)[:, :, None]
    if q_segments is not None:
        visible &= k_segments[:, None, :] == jnp.repeat(q_segments, g, axis=1)[:, :, None]
    scores = jnp.where(visible[:, None], scores / math.sqrt(h), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKQS,BSKH->BQKH", probs, v)
    return out.reshape(b, t, g, kv, h).swapaxes(2, 3).reshape(b, t, n, h)


def cudnn(q, k, v, segments=None, implementation="cudnn", layout: Callable | None = None):
    """cuDNN's fused attention; `implementation="xla"` runs the same call on any platform.
    cuDNN needs Q, K and V sharded alike: where the K/V heads do not divide the model axis
    (so they are replicated while the query heads are split), each K/V head is repeated for its
    query heads first (repeats_kv says so once per run)."""
    if layout is not None and repeats_kv(q.shape[2], k.shape[2], _axis_size("model")):
        g = q.shape[2] // k.shape[2]
        spec = layout(("act_batch", None, "act_heads", None), q.shape)
        k, v = (jax.lax.with_sharding_constraint(jnp.repeat(x, g, axis=2), spec) for x in (k, v))
    mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        implementation=implementation)


def pallas(q, k, v, segments=None, interpret=False, block=128):
    """Pallas GPU flash attention (causal by index, segment ids native)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu

    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # the kernel wants N K/V heads
    blocks = gpu.BlockSizes(block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block,
                            block_q_dq=block, block_kv_dq=block)
    return gpu.mha(q, k, v, segments, sm_scale=1 / math.sqrt(q.shape[-1]), causal=True,
                   block_sizes=blocks, interpret=interpret)


def splash(q, k, v, segments=None, layout: Callable | None = None, interpret=False, block=512):
    """Pallas TPU splash attention, one example at a time (vmap) and, under a mesh, one shard
    at a time (shard_map with batch and heads placed as the activation layout says)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sa
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q.shape
    g = n // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))  # [B, N, T, H], the kernel's layout
    q = q / math.sqrt(h)
    segments = jnp.ones((b, t), jnp.int32) if segments is None else segments
    spec = None if layout is None else layout(("act_batch", "act_heads", None, None), q.shape)
    heads_here = n if spec is None or spec[1] is None else n // _axis_size(spec[1])
    block = min(block, t)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads_here)])
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)

    def run(q, k, v, segments):
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(
            q, k, v, segments)

    if spec is not None:
        rows = layout(("act_batch", None), segments.shape)
        run = jax.shard_map(run, in_specs=(spec, spec, spec, rows), out_specs=spec,
                            check_vma=False)
    return run(q, k, v, segments).swapaxes(1, 2)


def _axis_size(axis) -> int:
    mesh = jax.sharding.get_abstract_mesh()
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape.get(a, 1) for a in names)


def repeats_kv(n_heads: int, n_kv_heads: int, model_axis: int) -> bool:
    """Whether cudnn repeats K/V heads: fewer of them than the query heads, not dividing the
    model axis (sharding.py replicates them then, while the query heads are split)."""
    return n_kv_heads < n_heads and model_axis > 1 and n_kv_heads % model_axis != 0


def attend(kernel: str, q, k, v, positions, segments=None, layout: Callable | None = None):
    """Self-attention over one packed or padded batch (query i sees keys 0..i of its segment)
    with `kernel` (a name from KERNELS). The model's KV-cache path calls xla() directly."""
    platform = platform_here()
    kernel = choose(kernel, platform)
    interpret = platform == "cpu"  # the Pallas kernels' interpreter
    if kernel == "xla":
        return xla(q, k, v, positions, positions, segments, segments)
    if kernel == "cudnn":
        return cudnn(q, k, v, segments, layout=layout)
    if kernel == "pallas":
        return pallas(q, k, v, segments, interpret=interpret,
                      block=min(128, q.shape[1]))
    if kernel == "splash":
        return splash(q, k, v, segments, layout=layout, interpret=interpret)
    raise ValueError(f"unknown attention kernel {kernel!r}; known: {', '.join(KERNELS)}")


# Where each kernel runs: natively, or (cpu) in the Pallas interpreter, which is slow and
# meant for tests.
PLATFORMS = {"xla": ("cpu", "gpu", "tpu"), "cudnn": ("gpu",), "pallas": ("gpu", "cpu"),
             "splash": ("tpu", "cpu")}


@functools.cache
def describe(kernel: str, platform: str | None = None, heads: tuple[int, int, int] | None = None
             ) -> str:
    """The line logged once at the start of a run: which kernel `kernel` means here and why;
    a UserError if it cannot run on this platform. `heads`: (query heads, K/V heads, model
    axis size), to say when cudnn repeats K/V heads."""
    platform = platform_here() if platform is None else _family(platform)
    chosen = choose(kernel, platform)
    if platform not in PLATFORMS[chosen]:
        raise UserError(f"model.attention={kernel}: the {chosen} kernel runs on "
                        f"{' or '.join(PLATFORMS[chosen])}, not {platform}")
    why = f"auto on {platform}" if kernel == "auto" else f"model.attention on {platform}"
    slow = ", in the Pallas interpreter (slow: for tests)" if (
        chosen in ("pallas", "splash") and platform == "cpu") else ""
    repeat = ""
    if chosen == "cudnn" and heads is not None and repeats_kv(*heads):
        repeat = (f"; its {heads[1]} K/V heads do not divide the model axis ({heads[2]}) and "
                  f"cuDNN needs Q, K and V sharded alike, so each is repeated for its "
                  f"{heads[0] // heads[1]} query heads")
    return f"attention: {chosen} ({why}{slow}){repeat}"
