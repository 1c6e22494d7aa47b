"""LIMA's sampler (LIMA §4.1): prefill, then a compiled decode loop over one state.

A batch of prompts of different lengths is right-padded and prefilled into a KV cache in one
forward pass. Then `lax.while_loop` advances one `State`: each step chooses a token from the last
logits (repetition penalty -> temperature -> top-p -> categorical draw, or the argmax), writes it
and runs the model on it. Nothing returns to Python until every row has stopped (EOT, EOS or its
length limit), so a batch is one compiled call; `decode` can also stop after a few steps, which
is how the engine (engine.py) streams tokens and admits new requests between steps.

Shapes compile once per (batch, prompt length, cache length) bucket. A row's random draws come
from (seed, prompt id, sample index, position) alone, never from the rows that share its batch,
so a resumed or re-batched run gives the same answers.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from limajax import sharding
from limajax.config import MAX_LEN, bucket_length, buckets_for
from limajax.errors import UserError
from limajax.model import KVCache, Llama, constrain
from limajax.tokenizer import Tokenizer

FINISH_REASONS = ("", "eot", "eos", "length")  # a row's finish code indexes this; 0 = running
RUNNING, EOT, EOS, LENGTH = range(4)


PENALTY_SCOPES = ("context", "generated")  # which ids the repetition penalty counts
# Log-probabilities reported per token: at most this many alternatives (OpenAI's chat limit, and
# vLLM's default max_logprobs). They are the model's own distribution (log-softmax of its
# logits), before the repetition penalty, temperature and top-p, as OpenAI and vLLM report them.
TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class Settings:
    """How tokens are chosen. None means LIMA §4.1's value, resolved here and nowhere else
    (the CLI and the HTTP API pass None through): temperature 0.7, top-p 0.9, and a repetition
    penalty of 1.2 when sampling or none (1.0) when greedy, so a greedy answer is the model's
    argmax, as transformers' greedy generate gives it. Temperature 0 means greedy.

    `penalty_scope`: "context" counts every id of the prompt and the answer so far (as
    transformers' processor does, and limajax always has); "generated" only the answer's ids,
    LIMA §4.1's wording ("previously generated tokens")."""

    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int = MAX_LEN
    greedy: bool = False
    seed: int = 0
    penalty_scope: str = "context"
    logprobs: bool = False  # record log-probabilities (TOP_LOGPROBS alternatives) per token

    def __post_init__(self):
        resolved = {"temperature": 0.7, "top_p": 0.9}  # LIMA §4.1
        for name, value in resolved.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if not self.temperature >= 0:  # also refuses NaN
            raise UserError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise UserError(f"repetition penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise UserError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if self.penalty_scope not in PENALTY_SCOPES:
            raise UserError(f"repetition penalty scope must be one of {', '.join(PENALTY_SCOPES)}"
                            f", got {self.penalty_scope!r}")
        if self.temperature == 0:
            object.__setattr__(self, "greedy", True)
        if self.repetition_penalty is None:
            object.__setattr__(self, "repetition_penalty", 1.0 if self.greedy else 1.2)

    def to_dict(self) -> dict:
        """How answers were chosen (what answer files record); `logprobs` changes no answer."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "logprobs"}


# --- logit processors: small pure functions, applied in this order (LIMA §4.1) -----------------


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array):
    """CTRL's penalty as transformers fixed it: for every id in `seen` (the context, or only
    the answer so far: Settings.penalty_scope; once however often it occurs), a positive logit
    is divided by the penalty and a negative one multiplied, so the penalty always makes the
    id less likely."""
    p = penalty[:, None]
    return jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)


def apply_temperature(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    return logits / temperature[:, None]


def apply_top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus: keep the smallest set of most probable ids whose probability reaches p; the rest
    get -inf. Formulated as transformers' TopPLogitsWarper (ascending sort, drop what sums to at
    most 1 - p, always keep the most probable) so both keep the same set."""
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    dropped = (cumulative <= 1 - top_p[:, None]).at[:, -1].set(False)
    smallest_kept = jnp.min(jnp.where(dropped, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where(logits < smallest_kept, -jnp.inf, logits)


class Knobs(NamedTuple):
    """Per-row sampling settings [B], so rows with different settings share a batch (serving)."""

    temperature: jax.Array
    top_p: jax.Array
    penalty: jax.Array
    greedy: jax.Array
    prompt_seen: jax.Array  # the penalty counts the prompt's ids (penalty_scope "context")
    logprobs: jax.Array  # record each chosen token's log-probability and the top alternatives

    @classmethod
    def of(cls, settings: Sequence[Settings]) -> Knobs:
        return cls(np.asarray([s.temperature for s in settings], np.float32),
                   np.asarray([s.top_p for s in settings], np.float32),
                   np.asarray([s.repetition_penalty for s in settings], np.float32),
                   np.asarray([s.greedy for s in settings], bool),
                   np.asarray([s.penalty_scope == "context" for s in settings], bool),
                   np.asarray([s.logprobs for s in settings], bool))


def choose(logits: jax.Array, seen: jax.Array, knobs: Knobs, keys: jax.Array) -> jax.Array:
    """Each row's next token: the penalised argmax if greedy, else a draw from the penalised,
    tempered, truncated distribution. The sort top-p needs is skipped when no row needs it."""
    logits = apply_repetition_penalty(logits, seen, knobs.penalty)

    def draw():
        x = apply_temperature(logits, jnp.where(knobs.greedy, 1.0, knobs.temperature))
        x = jax.lax.cond(jnp.all(knobs.top_p >= 1), lambda x: x,
                         lambda x: apply_top_p(x, knobs.top_p), x)
        return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)

    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    drawn = jax.lax.cond(jnp.all(knobs.greedy), lambda: greedy, draw)
    return jnp.where(knobs.greedy, greedy, drawn)


# --- the state machine ---------------------------------------------------------------------------


class State(NamedTuple):
    """Everything the decode loop carries; every field but the cache has the batch axis first."""

    tokens: jax.Array  # [B, S] the prompt, then what was generated
    length: jax.Array  # [B] tokens so far: the next one goes here
    limit: jax.Array  # [B] the row stops when its length reaches this
    finish: jax.Array  # [B] RUNNING, EOT, EOS or LENGTH
    seen: jax.Array  # [B, V] ids the repetition penalty counts
    logits: jax.Array  # [B, V] the next token's logits
    logprob: jax.Array  # [B, S] log p(token) under the model, where knobs.logprobs
    top_ids: jax.Array  # [B, S, TOP_LOGPROBS] the most probable ids at each position
    top_logprobs: jax.Array  # [B, S, TOP_LOGPROBS] and their log-probabilities
    keys: jax.Array  # [B, 2] the row's key: (seed, prompt id, sample index)
    knobs: Knobs
    cache: KVCache  # [L, B, S, K, H]


def row_keys(seed, prompt_hash, sample) -> jax.Array:
    """fold_in(fold_in(key(seed), prompt id), sample index) per row: the row's randomness."""

    def key(s, p, k):
        return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(s), p), k)

    return jax.vmap(key)(jnp.asarray(seed, jnp.uint32), jnp.asarray(prompt_hash, jnp.uint32),
                         jnp.asarray(sample, jnp.uint32))


def prompt_hash(prompt_id) -> int:
    """A stable 32-bit number for a prompt id of any JSON type."""
    return zlib.crc32(str(prompt_id).encode())


def constrain_cache(cache: KVCache) -> KVCache:
    """The cache is laid out like the activations: rows over `data`, K/V heads over `model`."""
    return KVCache(*(constrain(c, *sharding.CACHE_AXES) for c in cache))


@nnx.jit(static_argnames=("cache_length",))
def prefill(model: Llama, prompts, lengths, limits, knobs: Knobs, keys, *, cache_length: int
            ) -> State:
    """Run right-padded prompts [B, P] through the model into a cache of `cache_length` slots.

    Padding is written into cache slots past each prompt; a query only sees slots at or before
    its position, and decoding overwrites those slots in order, so padding is never attended to.
    """
    b, p = prompts.shape
    v = model.config.padded_vocab_size
    cache = constrain_cache(KVCache.empty(model.config, b, cache_length))
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    logits, cache = model(prompts, positions, cache=cache, last=lengths - 1)
    counted = (positions < lengths[:, None]) & knobs.prompt_seen[:, None]
    real = jnp.where(counted, prompts, v)  # v: out of range, dropped
    seen = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], real].set(True, mode="drop")
    tokens = jnp.zeros((b, cache_length), jnp.int32).at[:, :p].set(prompts)
    finish = jnp.where(lengths >= limits, LENGTH, RUNNING).astype(jnp.int32)
    logprob = jnp.zeros((b, cache_length), jnp.float32)
    top = jnp.zeros((b, cache_length, TOP_LOGPROBS), jnp.int32)
    return State(tokens, lengths, limits, finish, seen, logits[:, 0], logprob, top,
                 top.astype(jnp.float32), keys, knobs, constrain_cache(cache))


def top_logprobs(logits: jax.Array, ids: jax.Array):
    """log p(ids) under log-softmax(logits) [..., V], and the TOP_LOGPROBS most probable ids
    with theirs. Padded vocabulary entries are -inf (model.py), so they never appear."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, ids[..., None], axis=-1)[..., 0]
    best, best_ids = jax.lax.top_k(lp, TOP_LOGPROBS)
    return chosen, best_ids.astype(jnp.int32), best


def step(model: Llama, state: State, stop_ids: jax.Array, span: int | None = None) -> State:
    """Choose every running row's next token, record it, and compute the logits after it."""
    b, s = state.tokens.shape
    rows = jnp.arange(b)
    running = state.finish == RUNNING
    position = state.length
    keys = jax.vmap(jax.random.fold_in)(state.keys, position)
    token = jnp.where(running, choose(state.logits, state.seen, state.knobs, keys), 0)
    tokens = state.tokens.at[rows, jnp.where(running, position, s)].set(token, mode="drop")
    seen = state.seen.at[rows, jnp.where(running, token, state.seen.shape[1])].set(
        True, mode="drop")
    length = position + running

    def record(state):
        chosen, ids, lps = top_logprobs(state.logits, token)
        at = (rows, jnp.where(running & state.knobs.logprobs, position, s))
        return (state.logprob.at[at].set(chosen, mode="drop"),
                state.top_ids.at[at].set(ids, mode="drop"),
                state.top_logprobs.at[at].set(lps, mode="drop"))

    logprob, top_ids, top_lps = jax.lax.cond(  # the top-k costs nothing when no row asks
        jnp.any(state.knobs.logprobs & running), record,
        lambda state: (state.logprob, state.top_ids, state.top_logprobs), state)
    finish = jnp.select(
        [~running, token == stop_ids[0], token == stop_ids[1], length >= state.limit],
        [state.finish, EOT, EOS, LENGTH], RUNNING).astype(jnp.int32)
    # Stopped rows run along on their last slot; what they compute is never read.
    logits, cache = model(token[:, None], jnp.minimum(position, s - 1)[:, None],
                          cache=state.cache, span=span)
    return state._replace(tokens=tokens, length=length, finish=finish, seen=seen,
                          logits=logits[:, 0], logprob=logprob, top_ids=top_ids,
                          top_logprobs=top_lps, cache=constrain_cache(cache))


@nnx.jit
def prompt_logprobs(model: Llama, tokens: jax.Array):
    """For right-padded prompts [B, P]: log p(tokens[t] | tokens[:t]) for t >= 1 [B, P-1], and
    the top alternatives at each of those positions (what `echo` with `logprobs` reports)."""
    logits = model(tokens)
    return top_logprobs(logits[:, :-1], tokens[:, 1:])


@nnx.jit(donate_argnames=("state",), static_argnames=("span",))
def decode(model: Llama, state: State, stop_ids, max_steps, span: int | None = None) -> State:
    """Advance until every row has stopped or `max_steps` tokens were generated, in one loop.
    `span`: the running rows stay below this many cache slots, so attention reads only those
    (the engine's slots fill a bucket of the cache, not all of it)."""

    def cond(carry):
        _, state, n = carry
        return (n < max_steps) & jnp.any(state.finish == RUNNING)

    def body(carry):
        model, state, n = carry
        return model, step(model, state, stop_ids, span), n + 1

    return nnx.while_loop(cond, body, (model, state, jnp.int32(0)))[1]


# --- requests in, completions out ----------------------------------------------------------------


class Request(NamedTuple):
    """One answer to generate: prompt ids (BOS first), settings, and who it is for the RNG."""

    ids: list[int]
    settings: Settings
    prompt_id: object = 0
    sample: int = 0


class Completion(NamedTuple):
    tokens: list[int]  # generated ids, the stop token included
    finish: str  # "eot", "eos" or "length"


def answer_tokens(tokens: list[int], finish: str) -> list[int]:
    """The answer without the token that stopped it (EOT or EOS), which is not text."""
    return tokens[:-1] if finish in ("eot", "eos") else tokens


def context_length(model: Llama) -> int:
    """Tokens a prompt and its answer may fill together: LIMA §4.1's 2048, or less if the
    model's context is shorter."""
    return min(MAX_LEN, model.config.max_seq_len)


def stop_ids(tokenizer: Tokenizer) -> np.ndarray:
    """[EOT, EOS]; -1 where a model has no EOT (never matches)."""
    eot = -1 if tokenizer.eot_id is None else tokenizer.eot_id
    return np.asarray([eot, tokenizer.eos_id], np.int32)


def check_prompt(ids: Sequence[int], limit: int, where: str, room: int = 1) -> None:
    """The one prompt-too-long rule: a prompt and `room` answer tokens must fit in `limit`."""
    if len(ids) + room > limit:
        answer = ("leaving no room for an answer" if room == 1 else
                  f"and {room} are asked for the answer")
        raise UserError(f"{where}: this model's maximum context length is {limit} tokens; the "
                        f"prompt is {len(ids)} tokens, {answer}")


def batch_arrays(requests: Sequence[Request], batch: int, limit: int):
    """Right-padded prompts and per-row arrays for `prefill`, padded to `batch` rows with rows
    that are finished from the start; and the cache length bucket."""
    lengths = [len(r.ids) for r in requests]
    buckets = buckets_for(limit)
    width = bucket_length(max(lengths), buckets)
    cache_length = bucket_length(min(limit, max(n + r.settings.max_new_tokens for n, r in
                                                zip(lengths, requests, strict=True))), buckets)
    prompts = np.zeros((batch, width), np.int32)
    for i, r in enumerate(requests):
        prompts[i, :len(r.ids)] = r.ids
    filler = [1] * (batch - len(requests))  # padding rows: one token, already at their limit
    n = np.asarray(lengths + filler, np.int32)
    limits = np.asarray([min(len(r.ids) + r.settings.max_new_tokens, cache_length)
                         for r in requests] + filler, np.int32)
    settings = [r.settings for r in requests] + [Settings()] * len(filler)
    keys = row_keys([s.seed for s in settings],
                    [prompt_hash(r.prompt_id) for r in requests] + [0] * len(filler),
                    [r.sample for r in requests] + [0] * len(filler))
    return prompts, n, limits, Knobs.of(settings), keys, cache_length


def run_batch(model: Llama, mesh: Mesh, requests: Sequence[Request], batch: int,
              stops: np.ndarray) -> list[Completion]:
    """Generate every request of one batch to the end (one prefill, one decode call)."""
    limit = context_length(model)
    *arrays, cache_length = batch_arrays(requests, batch, limit)
    with sharding.activate(mesh):
        state = prefill(model, *jax.device_put(arrays, sharding.batch_sharding(mesh)),
                        cache_length=cache_length)
        state = decode(model, state, stops, jnp.int32(cache_length))
    tokens, length, finish = jax.device_get((state.tokens, state.length, state.finish))
    return [Completion(tokens[i, len(r.ids):length[i]].tolist(), FINISH_REASONS[finish[i]])
            for i, r in enumerate(requests)]


def generate(model: Llama, mesh: Mesh, requests: Sequence[Request], batch_size: int,
             stops: np.ndarray) -> Iterator[list[tuple[int, Completion]]]:
    """Answer all requests, in batches of prompts of similar length (shortest first), yielding
    each batch's (request index, completion) pairs as it finishes."""
    batch = sharding.whole_rows(batch_size, mesh)
    limit = context_length(model)
    for i, r in enumerate(requests):
        check_prompt(r.ids, limit, f"request {i} ({r.prompt_id})")
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].ids))
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        done = run_batch(model, mesh, [requests[i] for i in chunk], batch, stops)
        yield list(zip(chunk, done, strict=True))


def decode_after(tokenizer: Tokenizer, context: Sequence[int], ids: Sequence[int],
                 prefix: str | None = None) -> str:
    """The text `ids` add after `context`: decode(context + ids) minus decode(context)
    (`prefix`, if already known). A partial character at the end of the context is completed
    by the ids and counted as theirs."""
    if not context:
        return tokenizer.decode(ids)
    prefix = tokenizer.decode(context) if prefix is None else prefix
    prefix = prefix.rstrip("\ufffd")
    whole = tokenizer.decode([*context, *ids])
    return whole[len(prefix):] if whole.startswith(prefix) else tokenizer.decode(ids)
