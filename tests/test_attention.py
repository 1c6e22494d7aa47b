"""The attention kernels (limajax/attention.py) against the XLA reference, forward and gradient:
cuDNN's call through jax.nn.dot_product_attention's XLA implementation (cuDNN itself needs a
GPU), and the Pallas GPU and TPU splash kernels in the Pallas interpreter on this CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from limajax import attention, sharding
from limajax.config import preset
from limajax.errors import UserError

B, T, N, K, H = 2, 128, 4, 2, 16  # grouped-query: 2 query heads per K/V head


@pytest.fixture(scope="module")
def packed():
    """Two rows: dialogues of 50 and 60 tokens then 18 padding; one dialogue of 128."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k, v = (jax.random.normal(key, (B, T, K, H)) for key in keys[1:])
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    seg[0, :50], seg[0, 50:110], seg[1] = 1, 2, 1
    pos[0, :50], pos[0, 50:110], pos[1] = np.arange(50), np.arange(60), np.arange(T)
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


KERNELS = {
    "cudnn": lambda q, k, v, s: attention.cudnn(q, k, v, s, implementation="xla"),
    "pallas": lambda q, k, v, s: attention.pallas(q, k, v, s, interpret=True, block=64),
    "splash": lambda q, k, v, s: attention.splash(q, k, v, s, interpret=True, block=128),
}


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_agrees_with_xla_forward_and_gradient(packed, name):
    q, k, v, pos, seg = packed
    real = jnp.asarray(seg > 0, jnp.float32)[:, :, None, None]  # padding outputs are unused
    kernel = KERNELS[name]

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)) * real)

    ref = attention.xla(q, k, v, pos, pos, seg, seg)
    out = kernel(q, k, v, seg)
    np.testing.assert_allclose(out * real, ref * real, atol=2e-6)
    got = jax.grad(loss(lambda *a: kernel(*a, seg)), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda *a: attention.xla(*a, pos, pos, seg, seg)), argnums=(0, 1, 2))(
        q, k, v)
    # float32 sums over up to 128 keys in another order (blockwise online softmax).
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_splash_inside_shard_map_in_the_model_on_a_2x4_mesh(packed):
    """The whole model on a mesh (batch over data, heads over model): splash == xla."""
    _, _, _, pos, seg = packed
    config = preset("tiny").replace(n_layers=1)
    mesh = sharding.make_mesh("2x4")
    tokens = jnp.asarray(np.random.RandomState(0).randint(1, 500, (B, T)), jnp.int32)
    logits = {}
    for kernel in ("xla", "splash"):
        graphdef, params = nnx.split(sharding.init_model(config.replace(attention=kernel), mesh))
        with sharding.activate(mesh):
            logits[kernel] = jax.jit(
                lambda p, g=graphdef: nnx.merge(g, p)(tokens, pos, segment_ids=seg))(params)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(logits["splash"])[real],
                               np.asarray(logits["xla"])[real], atol=1e-5)


def test_auto_picks_by_platform_and_impossible_choices_are_user_errors():
    assert [attention.choose("auto", p) for p in ("tpu", "gpu", "cpu")] == [
        "splash", "pallas", "xla"]
    assert attention.choose("cudnn", "tpu") == "cudnn"
    assert attention.describe("auto", "gpu") == "attention: pallas (auto on gpu)"
    assert "Pallas interpreter" in attention.describe("splash", "cpu")
    with pytest.raises(UserError, match="the cudnn kernel runs on gpu, not tpu"):
        attention.describe("cudnn", "tpu")
    with pytest.raises(UserError, match="attention must be one of"):
        preset("tiny").replace(attention="flash")
