"""AdamW with LIMA's schedule and weight-decay mask (LIMA §3).

LIMA §3: AdamW with beta1 0.9, beta2 0.95 and weight decay 0.1; the learning rate starts at
1e-5 with no warm-up and decays linearly to 1e-6 "by the end of training", i.e. it is 1e-6 at
the last step. The Alpaca-65B baseline is trained with Stanford Alpaca's schedule instead
(`schedule="cosine"`: a 3% linear warm-up from 0, then cosine decay), as transformers'
get_cosine_schedule_with_warmup computes it for Stanford's train.py.
Weight decay touches matrices only (embeddings, projections, output), never the
RMSNorm scales: decaying a gain towards zero would shrink the layer, not regularise it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from limajax.config import OptimConfig
from limajax.model import logical_axes


def warmup_steps(config: OptimConfig, total_steps: int) -> int:
    """warmup_steps, or warmup_ratio of the run rounded up (transformers' get_warmup_steps)."""
    return config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)


def schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr(step) for step = 0 .. total_steps-1, after a linear warm-up from 0 when there is one.
    "linear" (LIMA §3): from lr to end_lr, both ends included. "cosine" (Stanford Alpaca):
    half a cosine from lr that reaches end_lr at step total_steps, as transformers' schedule
    does (so the last step's rate is just above end_lr)."""
    warmup = warmup_steps(config, total_steps)
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup,
                                                  max(total_steps, warmup + 1), config.end_lr)
    decay = optax.linear_schedule(config.lr, config.end_lr, max(total_steps - 1 - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.lr, warmup), decay],
                                [warmup])


def decay_mask(abstract_state: nnx.State) -> dict:
    """A pure dict like the params: True where weight decay applies (matrices only)."""

    def is_matrix(v: nnx.Variable) -> bool:  # two axes besides the stacked `layers` one
        return sum(n != "layers" for n in logical_axes(v)) >= 2

    mask = jax.tree.map(lambda v: v.replace(is_matrix(v)), abstract_state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(mask)


def stored_as(tx: optax.GradientTransformation, dtype: str) -> optax.GradientTransformation:
    """`tx` with its floating-point state (Adam's moments) kept in `dtype` between steps and
    computed in float32: half the memory in bfloat16. The parameters stay float32: LIMA's
    updates (lr 1e-5) are below bfloat16's resolution of a weight."""
    def cast(tree, to):
        return jax.tree.map(
            lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(tx.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = tx.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def optimizer(config: OptimConfig, total_steps: int, mask) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on `mask`) at LIMA's schedule,
    its moments stored in config.moments_dtype."""
    adamw = optax.adamw(schedule(config, total_steps), b1=config.b1, b2=config.b2,
                        eps=config.eps, weight_decay=config.weight_decay, mask=mask)
    if config.moments_dtype != "float32":
        adamw = stored_as(adamw, config.moments_dtype)
    if config.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
