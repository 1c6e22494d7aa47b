"""An OpenAI-compatible HTTP server over the sampler, with continuous batching.

The `Engine` keeps `max_batch` decode slots in one sampling `State` and runs the compiled decode
loop a few steps at a time on its own thread. Between calls it hands out the new tokens, frees the
slots of finished answers at once, and prefills waiting requests into free slots, so a request
that arrives while others are decoding joins the running batch at the next step (what JetStream
and vLLM call continuous batching) instead of waiting for the batch to drain.

The HTTP side is FastAPI on uvicorn: /v1/chat/completions (LIMA's dialogue format),
/v1/completions (plain continuation after BOS), /v1/models and /health, with the OpenAI fields
clients send (temperature, top_p, max_tokens, seed, stop, n, stream as server-sent events) and
`repetition_penalty` as an extension (LIMA §4.1 samples with 1.2). Omitted settings are LIMA's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import queue
import secrets
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from flax import nnx
from jax.sharding import Mesh
from pydantic import BaseModel, Field

from limajax import sharding
from limajax.checkpoint import load_for_inference
from limajax.errors import UserError
from limajax.model import Llama
from limajax.sampling import (
    FINISH_REASONS,
    LENGTH,
    Knobs,
    Request,
    Settings,
    State,
    TextStream,
    batch_arrays,
    check_prompt,
    context_length,
    decode,
    prefill,
    prompt_ids,
    stop_ids,
)
from limajax.tokenizer import Tokenizer


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
        text_ids = generated[:-1] if reason in ("eot", "eos") else generated
        delta = job.stream.update(text_ids, final=bool(finish))
        if delta:
            job.deliver({"text": delta})
        if finish or job.stream.stopped or job.cancelled:
            self.slots[job.slot] = None
            job.deliver({"finish": "length" if reason == "length" and not job.stream.stopped
                         else "stop", "prompt_tokens": start, "completion_tokens": len(generated)})
            if not finish:  # ended by a stop string or by the client: stop decoding the row
                self.state = self.state._replace(
                    finish=self.state.finish.at[job.slot].set(LENGTH))


# --- the OpenAI-compatible HTTP API ---------------------------------------------------------------


class Message(BaseModel):
    """An OpenAI chat message."""

    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    """The settings both endpoints take; None means LIMA §4.1's value."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    repetition_penalty: float | None = Field(None, gt=0)  # extension (LIMA §4.1: 1.2)


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(Sampling):
    prompt: str | list[str]


def conversation(messages: list[Message]) -> list[str]:
    """OpenAI messages -> LIMA's alternating turns, user first and last. LIMA has no
    system turn: a system message is put before the first user turn's text."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    turns = [m for m in messages if m.role != "system"]
    for i, m in enumerate(turns):
        if m.role != ("user" if i % 2 == 0 else "assistant"):
            raise UserError("messages: turns must alternate user, assistant, ..., user")
    if not turns or turns[-1].role != "user":
        raise UserError("messages: the last turn must be the user's")
    texts = [m.content for m in turns]
    if system:
        texts[0] = f"{system}\n\n{texts[0]}"
    return texts


def openai_error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": "invalid_request_error", "param": param, "code": None}})


def make_app(engine: Engine, model_name: str):
    """The FastAPI application serving `engine` under `model_name`."""
    app = FastAPI(title="limajax", version="1")
    tokenizer = engine.tokenizer

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return openai_error(f"{where}: {first.get('msg')}" if where else first.get("msg"),
                            param=where or None)

    @app.exception_handler(UserError)
    async def user_error(_, exc: UserError):
        return openai_error(str(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "limajax"}]}

    def jobs(body: Sampling, ids: list[int], max_tokens: int | None, deliver) -> list[Job]:
        settings = Settings(
            temperature=0.7 if body.temperature is None else body.temperature,
            top_p=0.9 if body.top_p is None else body.top_p,
            repetition_penalty=body.repetition_penalty,
            max_new_tokens=max_tokens or engine.cache_length,
            seed=secrets.randbits(31) if body.seed is None else body.seed)
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        return [Job(Request(ids, settings, "request", k), lambda e, k=k: deliver(k, e),
                    TextStream(tokenizer, stop)) for k in range(body.n)]

    async def answer(body: Sampling, ids: list[int], max_tokens, kind: str):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        todo = jobs(body, ids, max_tokens, lambda k, e: loop.call_soon_threadsafe(
            events.put_nowait, (k, e)))
        for job in todo:
            engine.submit(job)
        created, rid = int(time.time()), f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-" \
            f"{uuid.uuid4().hex}"

        def usage(done: dict) -> dict:
            prompt = len(ids)
            completion = sum(e["completion_tokens"] for e in done.values())
            return {"prompt_tokens": prompt, "completion_tokens": completion,
                    "total_tokens": prompt + completion}

        def chunk(choices, **extra) -> str:
            obj = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else
                   "text_completion", "created": created, "model": model_name,
                   "choices": choices, **extra}
            return f"data: {json.dumps(obj)}\n\n"

        def choice(k, text=None, finish=None):
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                return {"index": k, "delta": delta, "finish_reason": finish}
            return {"index": k, "text": text or "", "finish_reason": finish, "logprobs": None}

        done: dict[int, dict] = {}  # choice -> its finish event

        async def events_until_done():
            try:
                while len(done) < len(todo):
                    k, event = await events.get()
                    if "error" in event:
                        raise RuntimeError(event["error"])  # a 500: the server's fault
                    if "finish" in event:
                        done[k] = event
                    yield k, event
            finally:  # the client went away: stop generating for it
                for job in todo:
                    job.cancelled = True

        if body.stream:
            async def sse():
                if kind == "chat":
                    yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""},
                                  "finish_reason": None} for k in range(len(todo))])
                async for k, event in events_until_done():
                    if "text" in event:
                        yield chunk([choice(k, event["text"])])
                    else:
                        yield chunk([choice(k, None if kind == "chat" else "", event["finish"])])
                yield chunk([], usage=usage(done))
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        texts = [""] * len(todo)
        async for k, event in events_until_done():
            if "text" in event:
                texts[k] += event["text"]
        if kind == "chat":
            choices = [{"index": k, "message": {"role": "assistant", "content": texts[k]},
                        "finish_reason": done[k]["finish"], "logprobs": None}
                       for k in range(len(todo))]
        else:
            choices = [{"index": k, "text": texts[k], "finish_reason": done[k]["finish"],
                        "logprobs": None} for k in range(len(todo))]
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created, "model": model_name, "choices": choices,
                "usage": usage(done)}

    def fits(ids: list[int]) -> None:
        if len(ids) >= engine.cache_length:
            raise UserError(f"This model's maximum context length is {engine.cache_length} "
                            f"tokens; the prompt is {len(ids)} tokens, with no room for an answer")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        ids = prompt_ids(tokenizer, conversation(body.messages), raw=False)
        fits(ids)
        return await answer(body, ids, body.max_completion_tokens or body.max_tokens, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise UserError("prompt: give one string (batches of prompts are not served)")
            prompt = prompt[0]
        ids = prompt_ids(tokenizer, [prompt], raw=True)
        fits(ids)
        return await answer(body, ids, body.max_tokens, "completion")

    return app


@contextlib.contextmanager
def running(engine: Engine, name: str, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `engine` from a thread of this process, on a free port, while the block runs (the
    demo's judge, tests); yields the OpenAI base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(engine, name), host=host, port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="limajax-serve", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"serving on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serve(source: str, *, epoch: int | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_batch: int = 16, mesh_spec: str = "1x1", context: int | None = None,
          name: str | None = None) -> None:
    """`limajax serve`: load the model, start the engine, and serve until interrupted."""
    import uvicorn

    mesh = sharding.make_mesh(mesh_spec, jax.devices()[:sharding.mesh_devices(mesh_spec)])
    model, tokenizer = load_for_inference(source, mesh, epoch=epoch)
    engine = Engine(model, tokenizer, mesh, max_batch, context)
    name = name or (source if epoch is None else f"{source}@epoch{epoch}")
    try:
        uvicorn.run(make_app(engine, name), host=host, port=port, log_level="warning")
    finally:
        engine.close()
