"""The continuous-batching engine over the sampler, and answers as streamed text.

The `Engine` keeps `max_batch` decode slots in one sampling `State` and runs the compiled decode
loop a few steps at a time on its own thread. Between calls it hands out the new tokens, frees the
slots of finished answers at once, and prefills waiting requests into free slots, so a request
that arrives while others are decoding joins the running batch at the next step (what JetStream
and vLLM call continuous batching) instead of waiting for the batch to drain. Its drivers are
`serve` (serving.py), `chat` and the demo's judge.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import traceback
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from limajax import sharding
from limajax.config import bucket_length, buckets_for
from limajax.model import Llama
from limajax.sampling.sampler import (
    FINISH_REASONS,
    LENGTH,
    Request,
    Settings,
    State,
    answer_tokens,
    batch_arrays,
    check_prompt,
    context_length,
    decode,
    decode_after,
    prefill,
    prompt_logprobs,
    stop_ids,
)
from limajax.tokenizer import Tokenizer

PROMPT_TOKENS_PER_CALL = 8192  # rows x width of one prompt_logprobs call: [.., V] logits each
SCORING_WIDTHS = (16, 32, 64, 128, 256, 512, 1024)  # prompt_logprobs' widths, then the context


CONTEXT_TOKENS = 8  # prompt ids decoded before an answer: enough for its first piece's space


class TextStream:
    """A growing answer as text deltas, for streaming. Text that may still change is held back:
    a character whose bytes are not all decoded yet, and an ending that may begin a stop
    string. The answer ends at the first stop string, which is not part of it.

    `context`: the ids the answer continues, when it continues them as one text (a plain
    completion): the answer is decoded after them, so it keeps the spaces it has in context
    (SentencePiece drops a first piece's space when decoding it alone), as vLLM's incremental
    detokenizer does. A chat answer is its own utterance (encoded alone in training) and
    takes no context."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (),
                 context: Sequence[int] = ()):
        self.tokenizer, self.stop, self.text = tokenizer, [s for s in stop if s], ""
        self.context = list(context)[-CONTEXT_TOKENS:]
        self.prefix = decode_after(tokenizer, [], self.context)
        self.stopped = False

    def update(self, ids: Sequence[int], final: bool = False) -> str:
        """The new text after `ids` (the whole answer so far); sets `stopped` at a stop string."""
        text = decode_after(self.tokenizer, self.context, ids, self.prefix)
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            text, self.stopped, final = text[:min(cuts)], True, True
        if not final:
            text = text.rstrip("\ufffd")  # the replacement for a partial UTF-8 character
            hold = max((n for s in self.stop for n in range(1, len(s))
                        if text.endswith(s[:n])), default=0)
            text = text[:len(text) - hold]
        if not text.startswith(self.text):  # decoding re-spaced earlier text: send nothing new
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


@dataclasses.dataclass
class Job:
    """One answer being generated: its request, where its events go, and how far it got.

    Events: {"text": delta, "ids": new ids, and with Settings.logprobs "logprobs": [...],
    "top": [(ids, logprobs), ...]} as tokens come, then {"finish", "prompt_tokens",
    "completion_tokens"}, or {"error"} if the engine fails."""

    request: Request
    deliver: Callable[[dict], None]  # called on the engine's thread with each event
    stream: TextStream
    slot: int = -1
    cancelled: bool = False
    sent: int = 0  # answer ids already delivered


@nnx.jit(donate_argnames=("state",))
def insert(state: State, rows: State, slots) -> State:
    """Put prefilled rows into the running batch: row i into slot slots[i] (a slot past the
    batch drops the row: the padding rows of a prefill)."""
    def put(big, small):
        return big.at[slots].set(small, mode="drop")

    fields = {name: jax.tree.map(put, getattr(state, name), getattr(rows, name))
              for name in State._fields if name != "cache"}
    cache = jax.tree.map(lambda big, small: big.at[:, slots].set(small, mode="drop"),
                         state.cache, rows.cache)
    return State(**fields, cache=cache)


def row_bucket(n: int, data: int) -> int:
    """Rows of a prefill: the next power of two (few shapes to compile), whole over `data`."""
    return data * -(-(1 << (n - 1).bit_length()) // data)


class Engine:
    """Continuous batching over `max_batch` decode slots of `cache_length` tokens each.

    Each engine step admits every waiting request that finds a free slot in one prefill
    (rows padded to a power of two, width to the length bucket, as `sample` batches), then
    runs `steps_per_call` decode steps for all slots. `call(fn)` runs other device work (the
    log-probabilities of prompts) on the engine's thread between steps."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, mesh: Mesh, max_batch: int = 16,
                 cache_length: int | None = None, steps_per_call: int = 8):
        self.max_batch = sharding.whole_rows(max_batch, mesh)
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.cache_length = min(cache_length or context_length(model), context_length(model))
        self.steps_per_call = steps_per_call
        self.stops = stop_ids(tokenizer)
        self.waiting: queue.Queue[Job | None] = queue.Queue()  # None wakes the loop
        self.calls: queue.Queue[concurrent.futures.Future] = queue.Queue()
        self.slots: list[Job | None] = [None] * self.max_batch
        idle = [Request([tokenizer.bos_id], Settings(max_new_tokens=1))] * self.max_batch
        self.state = self._prefill(idle, finished=True)
        self.running, self.failure = True, None
        self.thread = threading.Thread(target=self._loop, name="limajax-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.failure is not None:
            raise RuntimeError(self.failure)
        check_prompt(job.request.ids, self.cache_length, "the prompt")
        self.waiting.put(job)

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` on the engine's thread before its next step; its result comes back in the
        future."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        future = concurrent.futures.Future()
        future.fn = fn
        self.calls.put(future)
        self.waiting.put(None)  # wake the loop if it waits for a request
        return future

    def busy(self) -> int:
        return sum(job is not None for job in self.slots)

    def queued(self) -> int:
        return self.waiting.qsize()

    def close(self) -> None:
        self.running = False
        self.waiting.put(None)  # wake the loop
        self.thread.join()

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[tuple]:
        """(log p of each token after the first [n-1], top ids [n-1, K], their log-probs) of
        each prompt, batched by length; call it through `call`."""
        out = [None] * len(prompts)
        # Finer than sample's buckets (which start at 256): scoring requests are short (an
        # lm-eval context and choice), and every padded position costs a [V] log-softmax.
        buckets = [w for w in SCORING_WIDTHS if w < self.cache_length] + [self.cache_length]
        widths = [bucket_length(len(p), buckets) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: widths[i])
        start = 0
        while start < len(order):
            width = widths[order[start]]
            n = max(1, PROMPT_TOKENS_PER_CALL // width)
            chunk = [i for i in order[start:start + n] if widths[i] == width]
            tokens = np.zeros((row_bucket(len(chunk), 1), width), np.int32)
            for r, i in enumerate(chunk):
                tokens[r, :len(prompts[i])] = prompts[i]
            with sharding.activate(self.mesh):
                chosen, ids, lps = jax.device_get(prompt_logprobs(self.model,
                                                                  jnp.asarray(tokens)))
            for r, i in enumerate(chunk):
                n_i = len(prompts[i]) - 1
                out[i] = (chosen[r, :n_i], ids[r, :n_i], lps[r, :n_i])
            start += len(chunk)
        return out

    def _prefill(self, requests: Sequence[Request], finished: bool = False) -> State:
        rows = min(row_bucket(len(requests), self.mesh.shape["data"]), self.max_batch)
        prompts, lengths, limits, knobs, keys, _ = batch_arrays(requests, rows,
                                                                self.cache_length)
        if finished:
            limits = lengths
        arrays = jax.device_put((prompts, lengths, limits, knobs, keys),
                                sharding.batch_sharding(self.mesh))
        with sharding.activate(self.mesh):
            return prefill(self.model, *arrays, cache_length=self.cache_length)

    def _admit(self, block: bool) -> int:
        """Prefill the waiting jobs that find a free slot, together (wait for one if nothing
        is running); run waiting calls. Returns how many jobs were admitted."""
        self._run_calls()
        jobs = []
        free = self.slots.count(None)
        while len(jobs) < free:
            try:
                job = self.waiting.get(block=block and not jobs)
            except queue.Empty:
                break
            if job is None:  # woken: a call came, or close()
                break
            if not job.cancelled:
                jobs.append(job)
        self._run_calls()
        if not jobs:
            return 0
        slots = [i for i, job in enumerate(self.slots) if job is None][:len(jobs)]
        for job, slot in zip(jobs, slots, strict=True):
            job.slot, self.slots[slot] = slot, job
        rows = self._prefill([job.request for job in jobs])
        padded = slots + [self.max_batch] * (rows.tokens.shape[0] - len(slots))  # dropped
        with sharding.activate(self.mesh):
            self.state = insert(self.state, rows, jnp.asarray(padded, jnp.int32))
        return len(jobs)

    def _span(self) -> int | None:
        """Cache slots the next decode call can reach: the busy slots' furthest position after
        `steps_per_call` more tokens, rounded up to a length bucket (a few shapes to compile);
        None when that is the whole cache."""
        furthest = max(len(job.request.ids) + job.sent for job in self.slots if job is not None)
        span = bucket_length(min(furthest + self.steps_per_call + 1, self.cache_length),
                             buckets_for(self.cache_length))
        return None if span >= self.cache_length else span

    def _run_calls(self) -> None:
        while not self.calls.empty():
            future = self.calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(future.fn())
                except Exception as e:  # the caller's request failed, not the engine
                    future.set_exception(e)

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as e:  # a bug, not a request's fault: fail every request, loudly
            traceback.print_exc()
            self.failure = f"the decoding engine stopped: {e!r}"
            waiting = []
            while not self.waiting.empty():
                waiting.append(self.waiting.get())
            for job in [*self.slots, *waiting]:
                if job is not None:
                    job.deliver({"error": self.failure})
            while not self.calls.empty():
                self.calls.get().set_exception(RuntimeError(self.failure))

    def _serve(self) -> None:
        while self.running:
            admitted = self._admit(block=not any(self.slots))
            if not any(self.slots):
                continue
            # Just-admitted answers get their first token after one step, not a full call.
            steps = 1 if admitted else self.steps_per_call
            with sharding.activate(self.mesh):
                self.state = decode(self.model, self.state, self.stops, jnp.int32(steps),
                                    span=self._span())
            fields = ["tokens", "length", "finish"]
            if any(job is not None and job.request.settings.logprobs for job in self.slots):
                fields += ["logprob", "top_ids", "top_logprobs"]
            got = dict(zip(fields, jax.device_get([getattr(self.state, f) for f in fields]),
                           strict=True))
            for slot, job in enumerate(self.slots):
                if job is not None:
                    self._harvest(job, {f: v[slot] for f, v in got.items()})

    def _harvest(self, job: Job, row: dict) -> None:
        """Send a job its new text; free its slot when it has finished, stopped or gone."""
        start, length, finish = len(job.request.ids), int(row["length"]), int(row["finish"])
        generated = row["tokens"][start:length].tolist()
        reason = FINISH_REASONS[finish]
        answer = answer_tokens(generated, reason)
        delta = job.stream.update(answer, final=bool(finish))
        new = slice(start + job.sent, start + len(answer))
        if delta or new.start < new.stop:
            event = {"text": delta, "ids": answer[job.sent:]}
            if job.request.settings.logprobs:
                event["logprobs"] = row["logprob"][new].tolist()
                event["top"] = list(zip(row["top_ids"][new].tolist(),
                                        row["top_logprobs"][new].tolist(), strict=True))
            job.sent = len(answer)
            job.deliver(event)
        if finish or job.stream.stopped or job.cancelled:
            self.slots[job.slot] = None
            job.deliver({"finish": "length" if reason == "length" and not job.stream.stopped
                         else "stop", "prompt_tokens": start, "completion_tokens": len(generated)})
            if not finish:  # ended by a stop string or by the client: stop decoding the row
                self.state = self.state._replace(
                    finish=self.state.finish.at[job.slot].set(LENGTH))
