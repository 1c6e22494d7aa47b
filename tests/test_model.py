"""The model on its own: KV-cache decoding, dropout, padded vocabulary, sharded == unsharded,
and every preset's sharding plan on a simulated 8x8 mesh."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_support as ts
from flax import nnx

from limajax import sharding
from limajax.config import PRESETS, ModelConfig
from limajax.errors import UserError
from limajax.model import KVCache, Llama

# Small but not degenerate: GQA (2 query heads per kv head), padded vocab (300 -> 384), 3 layers.
CFG = ModelConfig(dim=48, n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=300, multiple_of=16)


@nnx.jit
def forward(model, tokens, positions=None, rates=None, key=None):
    return model(tokens, positions, dropout_rates=rates, dropout_key=key)


@nnx.jit
def decode(model, tokens, positions, cache):
    return model(tokens, positions, cache=cache)


@pytest.fixture(scope="module")
def model():
    return Llama(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 11), 0, CFG.vocab_size)


def test_kv_cache_matches_full_forward(model, tokens):
    full = forward(model, tokens)
    cache = KVCache.empty(CFG, batch=2, length=16)
    # A 4-token prefill, then one token at a time.
    logits, cache = decode(model, tokens[:, :4], jnp.broadcast_to(jnp.arange(4), (2, 4)), cache)
    steps = [logits]
    for t in range(4, tokens.shape[1]):
        logits, cache = decode(model, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
        steps.append(logits)
    incremental = jnp.concatenate(steps, axis=1)
    real = slice(0, CFG.vocab_size)
    # float32 throughout; the two paths differ only in summation order.
    np.testing.assert_allclose(incremental[..., real], full[..., real], atol=1e-5)


def test_rows_decode_at_their_own_positions(model, tokens):
    """Rows of one batch may sit at different positions (prompts of different lengths)."""
    short = tokens[1:, :5]
    cache = KVCache.empty(CFG, batch=2, length=16)
    prefill = jnp.stack([tokens[0, :8], jnp.pad(short[0], (0, 3))])
    _, cache = decode(model, prefill, jnp.broadcast_to(jnp.arange(8), (2, 8)), cache)
    logits, _ = decode(model, jnp.stack([tokens[0, 8:9], tokens[1, 5:6]]), jnp.array([[8], [5]]),
                       cache)
    full = forward(model, jnp.stack([tokens[0, :9], jnp.pad(tokens[1, :6], (0, 3))]))
    np.testing.assert_allclose(logits[0, 0, :300], full[0, 8, :300], atol=1e-5)
    np.testing.assert_allclose(logits[1, 0, :300], full[1, 5, :300], atol=1e-5)


def test_padded_vocabulary_is_never_predicted(model, tokens):
    logits = forward(model, tokens)
    assert logits.shape[-1] == CFG.padded_vocab_size == 384
    assert bool(jnp.all(jnp.isneginf(logits[..., CFG.vocab_size:])))
    assert bool(jnp.all(jnp.isfinite(logits[..., :CFG.vocab_size])))


def test_dropout_only_when_asked_and_per_layer(model, tokens):
    plain = forward(model, tokens)
    # Rates of zero, even with a key, change nothing: LIMA §3's first layer has p = 0.
    zero = forward(model, tokens, rates=jnp.zeros(CFG.n_layers), key=jax.random.key(0))
    np.testing.assert_allclose(zero, plain, atol=1e-6)
    # Only the last layer dropping out still changes the output, and differs per key.
    rates = jnp.array([0.0, 0.0, 0.3])
    a = forward(model, tokens, rates=rates, key=jax.random.key(0))
    b = forward(model, tokens, rates=rates, key=jax.random.key(1))
    real = (..., slice(0, CFG.vocab_size))
    assert float(jnp.abs(a[real] - plain[real]).max()) > 1e-3
    assert float(jnp.abs(a[real] - b[real]).max()) > 1e-3


def test_remat_and_dtype_do_not_change_the_function(tokens):
    params = nnx.to_pure_dict(nnx.state(Llama(CFG, rngs=nnx.Rngs(3)), nnx.Param))
    ref = sharding.model_from_params(CFG.replace(remat="none"), params)(tokens)
    dots = sharding.model_from_params(CFG.replace(remat="dots"), params)
    np.testing.assert_allclose(dots(tokens), ref, atol=1e-6)
    bf16 = sharding.model_from_params(CFG.replace(dtype="bfloat16"), params)(tokens)
    real = (..., slice(0, CFG.vocab_size))
    # bfloat16 keeps ~3 significant digits; logits here are O(1).
    np.testing.assert_allclose(bf16[real], ref[real], atol=5e-2)


def test_sharded_forward_equals_single_device(tokens):
    mesh = sharding.make_mesh("2x4")
    cfg = CFG.replace(n_heads=8, n_kv_heads=4, dim=64)  # heads divide the model axis of 4
    sharded = sharding.init_model(cfg, mesh, seed=5)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(sharded, nnx.Param)))
    wq = nnx.state(sharded, nnx.Param)["layers"]["attention"]["wq"]["kernel"].get_value()
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "data", "model", None)
    single = sharding.model_from_params(cfg, params)
    batch = jnp.concatenate([tokens, tokens[::-1]])  # 4 rows: divides the data axis
    ref = np.asarray(nnx.jit(lambda m, t: m(t))(single, batch))
    with sharding.activate(mesh):
        out = nnx.jit(lambda m, t: m(t))(sharded, jax.device_put(batch,
                                                                  sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(out)[..., :300], ref[..., :300], atol=1e-5)
    # A KV cache placed by sharding.cache_shardings (rows on data, K/V heads on model) prefills
    # on the mesh to the same logits.
    placed = sharding.cache_shardings(cfg, batch=4, length=16, mesh=mesh)
    assert placed.k.spec == jax.sharding.PartitionSpec(None, "data", None, "model", None)
    cache = jax.device_put(KVCache.empty(cfg, batch=4, length=16), placed)
    positions = jnp.broadcast_to(jnp.arange(batch.shape[1]), batch.shape)
    with sharding.activate(mesh):
        logits, _ = decode(sharded, batch, positions, cache)
    np.testing.assert_allclose(np.asarray(logits)[..., :300], ref[..., :300], atol=1e-5)


def test_params_that_do_not_fit_the_config_are_named():
    params = nnx.to_pure_dict(nnx.state(Llama(CFG, rngs=nnx.Rngs(0)), nnx.Param))
    with pytest.raises(UserError, match="wq"):
        sharding.model_from_params(CFG.replace(n_heads=12, n_kv_heads=3, head_dim=8), params)


def test_config_invariants_are_explained():
    with pytest.raises(UserError, match="multiple of n_kv_heads"):
        ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=3)
    with pytest.raises(UserError, match="divisible by n_heads"):
        ModelConfig(dim=65, n_layers=2, n_heads=8)
    assert ModelConfig.from_dict(PRESETS["llama3.1-8b"].to_dict()) == PRESETS["llama3.1-8b"]


def test_meta_ffn_sizes():
    # reference/lima-and-llama.md §5.1: w1/w3 rows of Meta's checkpoints.
    sizes = {"llama1-7b": 11008, "llama1-13b": 13824, "llama1-33b": 17920, "llama1-65b": 22016,
             "llama2-70b": 28672, "llama3-8b": 14336}
    assert {k: PRESETS[k].ffn_dim for k in sizes} == sizes
    assert round(PRESETS["llama1-65b"].n_params / 1e9, 2) == 65.29
    assert round(PRESETS["llama2-70b"].n_params / 1e9, 2) == 68.98


PLAN_ALL_PRESETS = textwrap.dedent("""
    import json, math, jax
    from flax import nnx
    jax.config.update("jax_num_cpu_devices", 64)
    from limajax import sharding
    from limajax.config import PRESETS
    mesh = sharding.make_mesh("8x8")
    out = {}
    for name, cfg in PRESETS.items():
        replicated = []
        _, abstract = sharding.abstract_model(cfg, mesh, replicated)
        leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract))
        shards, per_device = {}, 0
        for path, a in leaves:
            shape = a.sharding.shard_shape(a.shape)
            for size, axis, local in zip(a.shape, a.sharding.spec + (None,) * 9, shape):
                assert axis is None or size % mesh.shape[axis] == 0, (name, path)
                assert axis is None or local * mesh.shape[axis] == size, (name, path)
            shards[jax.tree_util.keystr(path)] = [str(a.sharding.spec), list(shape)]
            per_device += a.dtype.itemsize * math.prod(shape)
        out[name] = {"shards": shards, "bytes": per_device, "replicated": replicated}
    print(json.dumps(out))
""")


def test_every_preset_shards_on_a_simulated_8x8_mesh():
    env = ts.subprocess_env()  # the script simulates its own 64 devices
    proc = subprocess.run([sys.executable, "-c", PLAN_ALL_PRESETS], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plans = json.loads(proc.stdout)
    assert set(plans) == set(PRESETS)
    wq = "['layers']['attention']['wq']['kernel']"
    # 65B: every matrix split 64 ways (fsdp over embed x tensor parallel over heads/mlp/vocab).
    p65 = plans["llama1-65b"]
    assert p65["replicated"] == []
    assert p65["shards"][wq] == ["P(None, 'data', 'model', None)", [80, 1024, 8, 128]]
    assert p65["shards"]["['tok_embeddings']['embedding']"][1] == [32000 // 8, 8192 // 8]
    # fp32 parameters: every matrix 1/64 per device (~4.1 GB); the RMSNorm scales (161 x 8192)
    # are replicated.
    norms = (2 * 80 + 1) * 8192
    assert p65["bytes"] == (PRESETS["llama1-65b"].n_params - norms) * 4 // 64 + norms * 4
    # 70B GQA: 8 kv heads on a model axis of 8 -> one kv head per device.
    assert plans["llama2-70b"]["shards"]["['layers']['attention']['wk']['kernel']"][1] == [
        80, 1024, 1, 128]
    # 33B's 52 heads cannot split 8 ways: they are replicated, and said so.
    assert sorted(plans["llama1-33b"]["replicated"]) == (
        [["heads", 52, "model"]] * 2 + [["kv_heads", 52, "model"]] * 2)
    # Every other LLaMA divides evenly; the CPU-sized tiny model's 4 kv heads are replicated.
    assert {name for name in PRESETS if plans[name]["replicated"]} == {"llama1-33b", "tiny"}
