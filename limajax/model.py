"""LLaMA (Touvron et al. 2023; Llama 2 and 3) in Flax NNX.

Shape legend, used in einsum strings and comments:
  B batch, T query length, S key length, D model dim, N heads, K kv heads, G heads per kv head,
  Q = T*G queries per kv head, H head dim, F feed-forward dim, V padded vocabulary, L layers.

Parameters carry logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp, layers, norm);
activations carry act_* names. limajax/sharding.py alone maps them onto a mesh. Queries and keys
use Hugging Face's half-split rotary layout; Meta's interleaved weights are permuted on
conversion (reference/lima-and-llama.md §5.3).
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from limajax import attention
from limajax.config import ModelConfig

# How logical names become a layout, installed by sharding.activate: the model names the axes of
# its activations and never sees a mesh. None (the default): activations are left to XLA.
ACTIVATION_LAYOUT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "activation_layout", default=None)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Pin an activation's layout by logical names; a no-op outside sharding.activate."""
    layout = ACTIVATION_LAYOUT.get()
    return x if layout is None else jax.lax.with_sharding_constraint(x, layout(names, x.shape))


class KVCache(NamedTuple):
    """Keys (after rotary) and values of every layer, one slot per position."""

    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, length: int) -> KVCache:
        shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype))


def rope_frequencies(config: ModelConfig) -> jax.Array:
    """theta^(-2j/H) for j < H/2, with Llama-3.1's wavelength-dependent scaling if configured."""
    h = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated (HF _compute_llama3_parameters).
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    mid = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return jnp.where(wavelen > low_wavelen, inv_freq / s.factor,
                     jnp.where(wavelen < high_wavelen, inv_freq, mid))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, H] by position; pairs are (i, i + H/2) (half-split layout), in f32."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def dropout(x: jax.Array, rate: jax.Array, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with a traced rate, so each scanned layer can have its own (LIMA §3)."""
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


NORMAL_INIT = nnx.initializers.normal(0.02)  # LLaMA's initialiser scale


def param_init(names: tuple[str, ...], init=NORMAL_INIT):
    # Logical names only: sharding.py places the parameters (jit with out_shardings), so they
    # are never sharded eagerly at construction and a model builds on one device with no mesh.
    return nnx.with_partitioning(init, names, eager_sharding=False)


def logical_axes(v: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names a parameter was created with (None for an unnamed axis)."""
    return v.get_metadata().get("out_sharding") or (None,) * len(v.get_value().shape)


class RMSNorm(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.eps = config.norm_eps
        init = param_init(("norm",), nnx.initializers.ones)
        self.scale = nnx.Param(init(rngs.params(), (config.dim,), config.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32 whatever the compute dtype, as Meta and HF do.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def dense(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """Contract x's last n_in axes with kernel's first n_in, as one 2-D matmul over all tokens.

    Flattening matters: XLA's CPU kernel-gradient of a 3-D einsum such as BTD,DF->BTF (which
    contracts over both B and T) is ~2.5x slower than the same product as [B*T, D] @ [D, F].
    """
    k_in, k_out = kernel.shape[:n_in], kernel.shape[n_in:]
    lead = x.shape[:x.ndim - n_in]
    y = jnp.dot(x.reshape(-1, math.prod(k_in)), kernel.reshape(math.prod(k_in), -1),
                preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(*lead, *k_out)


class Projection(nnx.Module):
    """A bias-free linear map whose kernel keeps its logical axes (e.g. D -> N x H for wq); the
    first `in_axes` axes of the kernel are contracted with the input's last ones."""

    def __init__(self, shape: tuple[int, ...], names: tuple[str, ...], config: ModelConfig,
                 rngs: nnx.Rngs, in_axes: int = 1):
        self.n_in, self.dtype = in_axes, config.dtype
        self.kernel = nnx.Param(param_init(names)(rngs.params(), shape, config.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.n_in)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        self.kernel = config.attention
        self.wq = Projection((d, n, h), ("embed", "heads", "head_dim"), config, rngs)
        self.wk = Projection((d, k, h), ("embed", "kv_heads", "head_dim"), config, rngs)
        self.wv = Projection((d, k, h), ("embed", "kv_heads", "head_dim"), config, rngs)
        self.wo = Projection((n, h, d), ("heads", "head_dim", "embed"), config, rngs,
                             in_axes=2)

    def __call__(self, x, positions, segment_ids, inv_freq,
                 cache: tuple[jax.Array, jax.Array] | None, span: int | None = None):
        q = constrain(apply_rope(self.wq(x), positions, inv_freq),
                      "act_batch", None, "act_heads", None)
        k = apply_rope(self.wk(x), positions, inv_freq)
        v = self.wv(x)
        if cache is None:
            # Packed rows: segment ids keep each dialogue to itself (limajax/attention.py).
            out = attention.attend(self.kernel, q, k, v, positions, segment_ids,
                                   ACTIVATION_LAYOUT.get())
        else:
            # Write this step's keys and values at their positions; attend over every slot, or
            # over the first `span` (static) when the caller knows no row reaches further.
            rows = jnp.arange(x.shape[0])[:, None]
            k = cache[0].at[rows, positions].set(k.astype(cache[0].dtype))
            v = cache[1].at[rows, positions].set(v.astype(cache[1].dtype))
            cache = (k, v)
            k, v = (k, v) if span is None else (k[:, :span], v[:, :span])
            slots = jnp.broadcast_to(jnp.arange(k.shape[1]), (k.shape[0], k.shape[1]))
            out = attention.xla(q, k, v, positions, slots)
        return self.wo(out), cache


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.dim, config.ffn_dim
        self.w1 = Projection((d, f), ("embed", "mlp"), config, rngs)
        self.w2 = Projection((f, d), ("mlp", "embed"), config, rngs)
        self.w3 = Projection((d, f), ("embed", "mlp"), config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(jax.nn.silu(self.w1(x)) * self.w3(x), "act_batch", None, "act_mlp")
        return self.w2(h)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config, rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.ffn_norm = RMSNorm(config, rngs=rngs)
        self.feed_forward = FeedForward(config, rngs=rngs)

    def __call__(self, x, positions, segment_ids, inv_freq, cache, dropout_rate, dropout_key,
                 span=None):
        # LIMA §3: residual dropout on each sub-layer's output, before the residual add.
        keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        a, cache = self.attention(self.attention_norm(x), positions, segment_ids, inv_freq,
                                  cache, span)
        h = x + dropout(a, dropout_rate, keys[0])
        out = h + dropout(self.feed_forward(self.ffn_norm(h)), dropout_rate, keys[1])
        return constrain(out, "act_batch", None, None), cache


CHECKPOINT_POLICIES = {  # config.remat -> what jax.checkpoint saves
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.tok_embeddings = nnx.Embed(
            config.padded_vocab_size, config.dim, dtype=config.dtype,
            param_dtype=config.param_dtype, embedding_init=param_init(("vocab", "embed")),
            rngs=rngs)

        # L blocks built at once with parameters stacked on a leading "layers" axis.
        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(config, rngs=rngs)
        if not config.tie_embeddings:
            self.output = Projection((config.dim, config.padded_vocab_size),
                                     ("embed", "vocab"), config, rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                 dropout_rates: jax.Array | None = None, dropout_key: jax.Array | None = None,
                 last: jax.Array | None = None, span: int | None = None,
                 accumulator: dict | None = None):
        """Logits [B, T, V] (float32) for tokens [B, T] at positions [B, T] (default 0..T-1).

        segment_ids [B, T] (0 = padding) keep packed sequences from attending to each other.

        With a cache, returns (logits, updated cache). dropout_rates [L] with a dropout_key turns
        on residual dropout; without them the model is deterministic (evaluation, sampling).
        `last` [B] (an index into T per row) computes only those tokens' logits, [B, 1, V]: a
        sampler's prefill needs only each prompt's last one. `span` (static, with a cache):
        attend over the cache's first `span` slots only (decoding rows that all sit below it).
        `accumulator` (training with remat full): a gradient sum shaped like the layers'
        parameters (a pure dict); differentiated with respect to it, this call gives that sum
        plus the layers' gradient, added layer by layer as the backward pass goes
        (`layers_adding_into`), and no gradient for the layers' parameters themselves.
        """
        config = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = constrain(self.tok_embeddings(tokens), "act_batch", None, None)
        inv_freq = rope_frequencies(config)
        rates = jnp.zeros(config.n_layers) if dropout_rates is None else dropout_rates
        keys = None if dropout_key is None else jax.random.split(dropout_key, config.n_layers)
        layer_caches = None if cache is None else (cache.k, cache.v)

        def layer(x, block, layer_cache, rate, key):
            return block(x, positions, segment_ids, inv_freq, layer_cache, rate, key, span)

        # Recompute activations in the backward pass ("auto" is resolved before training, by
        # limajax/plan.py; a model that only runs forward has nothing to recompute).
        if config.remat not in ("none", "auto"):
            layer = nnx.remat(layer, policy=CHECKPOINT_POLICIES[config.remat])
        run_layers = nnx.scan(layer, in_axes=(nnx.Carry, 0, 0, 0, 0), out_axes=(nnx.Carry, 0),
                              transform_metadata={nnx.PARTITION_NAME: "layers"})
        if cache is not None:
            # The cache rides in the carry, each layer's slots written back into it, so XLA
            # updates it in place; as the scan's input and output it would be held twice.
            def cached(carry, block, rate, key, i):
                x, (ks, vs) = carry
                x, (k, v) = layer(x, block, (ks[i], vs[i]), rate, key)
                return (x, (jax.lax.dynamic_update_index_in_dim(ks, k, i, 0),
                            jax.lax.dynamic_update_index_in_dim(vs, v, i, 0)))

            x, layer_caches = nnx.scan(
                cached, in_axes=(nnx.Carry, 0, 0, 0, 0), out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: "layers"})(
                    (x, layer_caches), self.layers, rates, keys, jnp.arange(config.n_layers))
        elif accumulator is None:
            x, layer_caches = run_layers(x, self.layers, layer_caches, rates, keys)
        else:
            x = layers_adding_into(lambda x, layers, rates, keys: run_layers(
                x, layers, None, rates, keys)[0], self.layers, accumulator, x, rates, keys)

        if last is not None:
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)
        x = self.norm(x)
        if config.tie_embeddings:
            logits = dense(x, self.tok_embeddings.embedding[...].astype(x.dtype).T, 1)
        else:
            logits = self.output(x)
        logits = constrain(logits.astype(jnp.float32), "act_batch", None, "act_vocab")
        # Padding rows of the vocabulary are never predicted.
        logits = jnp.where(jnp.arange(logits.shape[-1]) < config.vocab_size, logits, -jnp.inf)
        if cache is None:
            return logits
        return logits, KVCache(*layer_caches)


def layers_adding_into(run: Callable, layers: nnx.Module, accumulator: dict, x, rates, keys):
    """`run(x, layers, rates, keys)` over the stacked layers, whose backward pass adds each
    layer's parameter gradient into `accumulator` in place (its cotangent is the new sum).

    Gradient accumulation (LIMA §3's batch of 32 in micro batches) would otherwise hold two
    gradient trees: the sum so far and the micro batch's own, which the layers' scan builds
    whole before it can be added. Here the backward pass is a loop over the layers that
    recomputes each from its saved input (what remat full does anyway) and writes
    sum[i] + grad[i] into the sum's buffer: one float32 tree fewer (30.4 GiB per device for
    LIMA-65B on one 8x H200 node, README "plan")."""
    graphdef, state = nnx.split(layers)
    # The sum arrives as a pure dict (the train state's); it flattens as the State does.
    assert all(a is b for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(state)),
                                      jax.tree.leaves(state), strict=True))
    total = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(accumulator))
    n = jax.tree.leaves(state)[0].shape[0]

    def one(tree, i):  # layer i of stacked arrays, keeping the layer axis (length 1)
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1), tree)

    def apply(x, state, rates, keys):
        return run(x, nnx.merge(graphdef, state), rates, keys)

    @jax.custom_vjp
    def stack(x, state, total, rates, keys):
        return apply(x, state, rates, keys)

    def forward(x, state, total, rates, keys):
        def body(x, i):
            return apply(x, one(state, i), one(rates, i), one(keys, i)), x

        y, inputs = jax.lax.scan(body, x, jnp.arange(n))
        return y, (inputs, state, total, rates, keys)

    def backward(saved, ct):
        inputs, state, total, rates, keys = saved

        def body(carry, i):
            ct, total = carry
            _, vjp = jax.vjp(lambda x, p: apply(x, p, one(rates, i), one(keys, i)),
                             inputs[i], one(state, i))
            ct, grad = vjp(ct)
            total = jax.tree.map(lambda t, g: jax.lax.dynamic_update_slice_in_dim(
                t, jax.lax.dynamic_slice_in_dim(t, i, 1) + g, i, 0), total, grad)
            return (ct, total), None

        (ct, total), _ = jax.lax.scan(body, (ct, total), jnp.arange(n), reverse=True)
        return ct, None, total, None, None

    stack.defvjp(forward, backward)
    return stack(x, state, total, rates, keys)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) per position; logits [B, T, V] float32, padded vocab at -inf."""
    # logsumexp minus the target's logit, picked by a one-hot mask: its gradient is a select,
    # not the scatter a gather's would be (slow on CPU, and awkward on a vocab-sharded axis).
    hit = jnp.arange(logits.shape[-1]) == targets[..., None]
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
