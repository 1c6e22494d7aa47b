"""An OpenAI-compatible HTTP server over the continuous-batching engine (sampling/engine.py).

FastAPI on uvicorn: /v1/chat/completions (LIMA's dialogue format), /v1/completions (plain
continuation after BOS), /v1/models and /health, with the OpenAI fields clients send
(temperature, top_p, max_tokens, seed, stop, n, stream as server-sent events) and
`repetition_penalty` as an extension (LIMA §4.1 samples with 1.2). An omitted setting is None,
which `Settings` resolves to LIMA's value. This module only speaks HTTP: requests are pydantic
models, responses are built by the pure functions below, and the engine does the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from limajax import sharding
from limajax.checkpoint import load_for_inference
from limajax.errors import UserError
from limajax.sampling import Engine, Job, Request, Settings, TextStream
from limajax.sampling.sampler import check_prompt
from limajax.tokenizer import Tokenizer

# --- requests ------------------------------------------------------------------------------------


class Message(BaseModel):
    """An OpenAI chat message."""

    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    """The settings both endpoints take; None means LIMA §4.1's value (Settings resolves it,
    and checks the bounds)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    repetition_penalty: float | None = None  # extension (LIMA §4.1: 1.2)


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


def settings_from(body: Sampling, max_tokens: int | None, room: int) -> Settings:
    """A request's settings: what it names, else Settings' own defaults (LIMA §4.1). Without
    `max_tokens` an answer may fill the `room` left in the context; without a seed, a fresh
    one (OpenAI's behaviour: unseeded requests differ)."""
    return Settings(temperature=body.temperature, top_p=body.top_p,
                    repetition_penalty=body.repetition_penalty,
                    max_new_tokens=max_tokens or room,
                    seed=secrets.randbits(31) if body.seed is None else body.seed)


# --- responses: pure functions of what the engine produced --------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, created: int, model: str, texts: list[str], finishes: list[str],
                  prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": k, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}
                        for k, (text, finish) in enumerate(zip(texts, finishes, strict=True))],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_response(rid: str, created: int, model: str, texts: list[str],
                        finishes: list[str], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": k, "text": text, "finish_reason": finish, "logprobs": None}
                        for k, (text, finish) in enumerate(zip(texts, finishes, strict=True))],
            "usage": usage(prompt_tokens, completion_tokens)}


def stream_chunk(kind: str, rid: str, created: int, model: str, k: int | None = None,
                 text: str | None = None, finish: str | None = None, role: bool = False,
                 usage: dict | None = None) -> str:
    """One server-sent event: choice `k`'s new text or finish (chat: a delta), the assistant
    role that opens a chat choice, or (k None) the closing usage."""
    if k is None:
        choices = []
    elif kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else (
            {} if text is None else {"content": text})
        choices = [{"index": k, "delta": delta, "finish_reason": finish}]
    else:
        choices = [{"index": k, "text": text or "", "finish_reason": finish, "logprobs": None}]
    obj = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else
           "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    return f"data: {json.dumps(obj)}\n\n"


def openai_error(message: str, status: int = 400, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": "invalid_request_error", "param": param, "code": None}})


# --- the application -----------------------------------------------------------------------------


def make_app(engine: Engine, model_name: str):
    """The FastAPI application serving `engine` under `model_name`."""
    app = FastAPI(title="limajax", version="1")
    tokenizer: Tokenizer = engine.tokenizer

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

    async def answer(body: Sampling, ids: list[int], max_tokens: int | None, kind: str):
        check_prompt(ids, engine.cache_length, "the prompt", room=max_tokens or 1)
        settings = settings_from(body, max_tokens, engine.cache_length - len(ids))
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        todo = [Job(Request(ids, settings, "request", k),
                    lambda e, k=k: loop.call_soon_threadsafe(events.put_nowait, (k, e)),
                    TextStream(tokenizer, stop)) for k in range(body.n)]
        for job in todo:
            engine.submit(job)
        created = int(time.time())
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
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

        def generated() -> int:
            return sum(e["completion_tokens"] for e in done.values())

        if body.stream:
            async def sse():
                if kind == "chat":
                    for k in range(len(todo)):
                        yield stream_chunk(kind, rid, created, model_name, k, role=True)
                async for k, event in events_until_done():
                    yield stream_chunk(kind, rid, created, model_name, k, event.get("text"),
                                       event.get("finish"))
                yield stream_chunk(kind, rid, created, model_name,
                                   usage=usage(len(ids), generated()))
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        texts = [""] * len(todo)
        async for k, event in events_until_done():
            texts[k] += event.get("text", "")
        response = chat_response if kind == "chat" else completion_response
        return response(rid, created, model_name, texts, [done[k]["finish"] for k in
                                                          range(len(todo))],
                        len(ids), generated())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        ids = tokenizer.encode_prompt(conversation(body.messages))
        return await answer(body, ids, body.max_completion_tokens or body.max_tokens, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise UserError("prompt: give one string (batches of prompts are not served)")
            prompt = prompt[0]
        ids = tokenizer.encode_prompt([prompt], raw=True)
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

    mesh = sharding.inference_mesh(mesh_spec)
    model, tokenizer = load_for_inference(source, mesh, epoch=epoch)
    engine = Engine(model, tokenizer, mesh, max_batch, context)
    name = name or (source if epoch is None else f"{source}@epoch{epoch}")
    try:
        uvicorn.run(make_app(engine, name), host=host, port=port, log_level="warning")
    finally:
        engine.close()
