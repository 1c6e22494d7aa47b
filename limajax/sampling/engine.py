"""The continuous-batching engine over the sampler, and answers as streamed text.

The `Engine` keeps `max_batch` decode slots in one sampling `State` and runs the compiled decode
loop a few steps at a time on its own thread. Between calls it hands out the new tokens, frees the
slots of finished answers at once, and prefills waiting requests into free slots, so a request
that arrives while others are decoding joins the running batch at the next step (what JetStream
and vLLM call continuous batching) instead of waiting for the batch to drain. Its drivers are
`serve` (serving.py), `chat` and the demo's judge.
"""

from __future__ import annotations

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
from limajax.model import Llama
from limajax.sampling.sampler import (
    FINISH_REASONS,
    LENGTH,
    Knobs,
    Request,
    Settings,
    State,
    answer_tokens,
    batch_arrays,
    check_prompt,
    context_length,
    decode,
    prefill,
    stop_ids,
)
from limajax.tokenizer import Tokenizer


class TextStream:
    """A growing answer as text deltas, for streaming. Text that may still change is held back:
    a character whose bytes are not all decoded yet, and an ending that may begin a stop
    string. The answer ends at the first stop string, which is not part of it."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop, self.text = tokenizer, [s for s in stop if s], ""
        self.stopped = False

    def update(self, ids: Sequence[int], final: bool = False) -> str:
        """The new text after `ids` (the whole answer so far); sets `stopped` at a stop string."""
        text = self.tokenizer.decode(ids)
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
    """One answer being generated: its request, where its events go, and how far it got."""

    request: Request
    deliver: Callable[[dict], None]  # called on the engine's thread with each event
    stream: TextStream
    slot: int = -1
    cancelled: bool = False


@nnx.jit(donate_argnames=("state",))
def insert(state: State, row: State, slot) -> State:
    """Put a prefilled one-row state into slot `slot` of the running batch."""
    def put(big, small):
        return big.at[slot].set(small[0])

    fields = {name: jax.tree.map(put, getattr(state, name), getattr(row, name))
              for name in State._fields if name != "cache"}
    cache = jax.tree.map(lambda big, small: big.at[:, slot].set(small[:, 0]), state.cache,
                         row.cache)
    return State(**fields, cache=cache)


class Engine:
    """Continuous batching over `max_batch` decode slots of `cache_length` tokens each."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, mesh: Mesh, max_batch: int = 16,
                 cache_length: int | None = None, steps_per_call: int = 8):
        self.max_batch = sharding.whole_rows(max_batch, mesh)
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.cache_length = min(cache_length or context_length(model), context_length(model))
        self.steps_per_call = steps_per_call
        self.stops = stop_ids(tokenizer)
        self.waiting: queue.Queue[Job] = queue.Queue()
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

    def close(self) -> None:
        self.running = False
        self.waiting.put(None)  # wake the loop
        self.thread.join()

    def _prefill(self, requests: Sequence[Request], finished: bool = False) -> State:
        prompts, lengths, limits, knobs, keys, _ = batch_arrays(requests, len(requests),
                                                                self.cache_length)
        if finished:
            limits = lengths
        rows = sharding.batch_sharding(self.mesh) if len(requests) == self.max_batch else None
        with sharding.activate(self.mesh):
            put = (lambda x: jax.device_put(x, rows)) if rows is not None else jnp.asarray
            return prefill(self.model, put(prompts), put(lengths), put(limits),
                           Knobs(*(put(k) for k in knobs)), put(keys),
                           cache_length=self.cache_length)

    def _admit(self, block: bool) -> None:
        """Prefill waiting jobs into free slots (wait for one if nothing is running)."""
        while None in self.slots:
            try:
                job = self.waiting.get(block=block)
            except queue.Empty:
                return
            block = False
            if job is None or job.cancelled:
                continue
            job.slot = self.slots.index(None)
            self.slots[job.slot] = job
            row = self._prefill([job.request])
            with sharding.activate(self.mesh):
                self.state = insert(self.state, row, jnp.int32(job.slot))

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

    def _serve(self) -> None:
        while self.running:
            self._admit(block=not any(self.slots))
            if not any(self.slots):
                continue
            with sharding.activate(self.mesh):
                self.state = decode(self.model, self.state, self.stops,
                                    jnp.int32(self.steps_per_call))
            tokens, length, finish = jax.device_get(
                (self.state.tokens, self.state.length, self.state.finish))
            for slot, job in enumerate(self.slots):
                if job is not None:
                    self._harvest(job, tokens[slot], int(length[slot]), int(finish[slot]))

    def _harvest(self, job: Job, tokens: np.ndarray, length: int, finish: int) -> None:
        """Send a job its new text; free its slot when it has finished, stopped or gone."""
        start = len(job.request.ids)
        generated = tokens[start:length].tolist()
        reason = FINISH_REASONS[finish]
        delta = job.stream.update(answer_tokens(generated, reason), final=bool(finish))
        if delta:
            job.deliver({"text": delta})
        if finish or job.stream.stopped or job.cancelled:
            self.slots[job.slot] = None
            job.deliver({"finish": "length" if reason == "length" and not job.stream.stopped
                         else "stop", "prompt_tokens": start, "completion_tokens": len(generated)})
            if not finish:  # ended by a stop string or by the client: stop decoding the row
                self.state = self.state._replace(
                    finish=self.state.finish.at[job.slot].set(LENGTH))
