"""An OpenAI-compatible HTTP server over the continuous-batching engine (sampling/engine.py).

FastAPI on uvicorn: /v1/chat/completions (LIMA's dialogue format), /v1/completions (plain
continuation after BOS, as lm-evaluation-harness, OpenAI's legacy clients and vLLM speak it:
batched prompts, token ids, echo, log-probabilities), /tokenize and /detokenize (vLLM's shapes),
/v1/models, /health and /metrics (Prometheus). Requests take the OpenAI fields clients send and
`repetition_penalty` / `repetition_penalty_scope` as extensions; an omitted setting is None,
which `Settings` resolves to LIMA §4.1's value. This module only speaks HTTP: requests are
pydantic models, responses are built by the pure functions below, and the engine does the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from limajax import sharding
from limajax.checkpoint import load_for_inference
from limajax.errors import UserError
from limajax.formats import system_first
from limajax.sampling import Engine, Job, Settings, TextStream
from limajax.sampling import Request as SamplingRequest
from limajax.sampling.engine import CONTEXT_TOKENS
from limajax.sampling.sampler import TOP_LOGPROBS, check_prompt, decode_after
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
    max_tokens: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    repetition_penalty: float | None = None  # extension (LIMA §4.1: 1.2)
    repetition_penalty_scope: str | None = None  # extension: "context" or "generated"
    cap_max_tokens: bool = False  # extension: cap max_tokens at the room left, not a 400


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)


class CompletionBody(Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)


class TokenizeBody(BaseModel):
    """vLLM's /tokenize request."""

    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeBody(BaseModel):
    tokens: list[int]
    model: str | None = None


def conversation(messages: list[Message]) -> list[str]:
    """OpenAI messages -> LIMA's alternating turns, user first and last. LIMA has no
    system turn: a system message is put before the first user turn's text."""
    # formats.system_first: the rule `data prepare` trains by, so a model is asked as it learned
    texts = system_first([(m.role, m.content) for m in messages], "messages")
    if len(texts) % 2 == 0:
        raise UserError("messages: the last turn must be the user's")
    return texts


def prompts_of(body: CompletionBody, tokenizer: Tokenizer) -> list[tuple[list[int], str]]:
    """A completion request's prompts as (ids, text), in order: a string is BOS + its pieces
    (plain text, no dialogue format); token ids are taken as they are (BOS is the client's)."""
    prompt = body.prompt
    batch = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) \
        else prompt
    if not batch or any(len(p) == 0 for p in batch):
        raise UserError("prompt: empty")
    out = []
    for p in batch:
        if isinstance(p, str):
            out.append((tokenizer.encode_prompt([p], raw=True), p))
            continue
        bad = [i for i in p if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise UserError(f"prompt: token id {bad[0]} is outside the vocabulary "
                            f"(0..{tokenizer.vocab_size - 1})")
        out.append((list(p), tokenizer.decode(p)))
    return out


def settings_from(body: Sampling, max_tokens: int | None, room: int, logprobs: bool
                  ) -> Settings:
    """A request's settings: what it names, else Settings' own defaults (LIMA §4.1). Without
    `max_tokens` an answer may fill the `room` left in the context; without a seed, a fresh
    one (OpenAI's behaviour: unseeded requests differ)."""
    scope = {} if body.repetition_penalty_scope is None else {
        "penalty_scope": body.repetition_penalty_scope}
    return Settings(temperature=body.temperature, top_p=body.top_p,
                    repetition_penalty=body.repetition_penalty,
                    max_new_tokens=min(max_tokens, room) if max_tokens else room,
                    seed=secrets.randbits(31) if body.seed is None else body.seed,
                    logprobs=logprobs, **scope)


# --- responses: pure functions of what the engine produced --------------------------------------

# One token's log-probability record: (id, log p or None for a prompt's first token, the top
# alternatives [(id, log p)] or None).
Scored = tuple[int, float | None, list[tuple[int, float]] | None]


def token_texts(tokenizer: Tokenizer, ids: Sequence[int], context: Sequence[int] = ()
                ) -> list[str]:
    """Each token's text where it stands (after `context` and the tokens before it), so the
    pieces concatenate to the text with its spaces (incremental detokenization)."""
    before = [*context, *ids]
    return [decode_after(tokenizer, before[max(0, n - CONTEXT_TOKENS):n], [i])
            for n, i in enumerate(ids, len(context))]


def completion_logprobs(tokenizer: Tokenizer, scored: Sequence[Scored], k: int,
                        context: Sequence[int] = (), offset: int = 0) -> dict:
    """OpenAI's legacy `logprobs` object: tokens, token_logprobs, top_logprobs (the k most
    probable, token text -> log p) and text_offset (each token's first character)."""
    ids = [s[0] for s in scored]
    texts = token_texts(tokenizer, ids, context)
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    before = [*context, *ids]
    tops = [None if top is None else {
        decode_after(tokenizer, before[max(0, n - CONTEXT_TOKENS):n], [a]): lp
        for a, lp in top[:k]}
        for n, (_, _, top) in enumerate(scored, len(context))]
    return {"tokens": texts, "token_logprobs": [s[1] for s in scored], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, scored: Sequence[Scored], k: int) -> dict:
    """The chat format: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def entry(text, lp):
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    ids, content = [s[0] for s in scored], []
    texts = token_texts(tokenizer, ids)
    for n, ((_, lp, top), text) in enumerate(zip(scored, texts, strict=True)):
        content.append({**entry(text, lp), "top_logprobs": [
            entry(decode_after(tokenizer, ids[max(0, n - CONTEXT_TOKENS):n], [a]), alp)
            for a, alp in (top or [])[:k]]})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(kind: str, rid: str, created: int, model: str, texts: list[str],
             finishes: list[str], logprobs: list[dict | None], prompt_tokens: int,
             completion_tokens: int) -> dict:
    """A whole chat completion (each choice's text as the assistant's message) or completion."""
    def choice(k, text, finish, lp):
        said = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {
            "text": text}
        return {"index": k, **said, "finish_reason": finish, "logprobs": lp}

    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": model,
            "choices": [choice(k, *c) for k, c in enumerate(zip(texts, finishes, logprobs,
                                                                 strict=True))],
            "usage": usage(prompt_tokens, completion_tokens)}


def stream_chunk(kind: str, rid: str, created: int, model: str, k: int | None = None,
                 text: str | None = None, finish: str | None = None, role: bool = False,
                 logprobs: dict | None = None, usage: dict | None = None) -> str:
    """One server-sent event: choice `k`'s new text or finish (chat: a delta), the assistant
    role that opens a chat choice, or (k None) the closing usage."""
    if k is None:
        choices = []
    elif kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else (
            {} if text is None else {"content": text})
        choices = [{"index": k, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]
    else:
        choices = [{"index": k, "text": text or "", "finish_reason": finish,
                    "logprobs": logprobs}]
    obj = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else
           "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    return f"data: {json.dumps(obj)}\n\n"


def openai_error(message: str, status: int = 400, param: str | None = None,
                 code: str | None = None) -> JSONResponse:
    """OpenAI's error object, for every status: the request's fault (4xx) or the server's."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": kind, "param": param, "code": code}})


class ModelNotFound(Exception):
    pass


# --- the application -----------------------------------------------------------------------------


class Metrics:
    """What /metrics reports, in Prometheus's text format (prometheus_client)."""

    def __init__(self, engine: Engine):
        self.registry = r = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "limajax_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.prompt_tokens = prometheus_client.Counter(
            "limajax_prompt_tokens", "Prompt tokens of completion requests", registry=r)
        self.generated_tokens = prometheus_client.Counter(
            "limajax_generated_tokens", "Tokens generated", registry=r)
        self.ttft = prometheus_client.Histogram(
            "limajax_time_to_first_token_seconds", "From a request's arrival to its first "
            "token", registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        prometheus_client.Gauge("limajax_queue_length", "Requests waiting for a slot",
                                registry=r).set_function(engine.queued)
        prometheus_client.Gauge("limajax_busy_slots", "Decode slots generating an answer",
                                registry=r).set_function(engine.busy)


def make_app(engine: Engine, model_name: str, api_key: str | None = None):
    """The FastAPI application serving `engine` under `model_name`; with `api_key`, every
    route but /health needs `Authorization: Bearer KEY`."""
    app = FastAPI(title="limajax", version="1")
    tokenizer: Tokenizer = engine.tokenizer
    metrics = Metrics(engine)

    @app.middleware("http")
    async def authorize_and_count(request: Request, call_next):
        given = request.headers.get("authorization", "")
        if api_key is not None and request.url.path != "/health" and not secrets.compare_digest(
                given.encode(), f"Bearer {api_key}".encode()):
            response = openai_error("Incorrect or missing API key: send the header "
                                    "'Authorization: Bearer KEY'", 401, code="invalid_api_key")
        else:
            response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":  # not a field: the body itself
            error = first.get("ctx", {}).get("error", "")
            return openai_error(f"the request body is not valid JSON ({error})")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return openai_error(f"{where}: {first.get('msg')}" if where else first.get("msg"),
                            param=where or None)

    @app.exception_handler(UserError)
    async def user_error(_, exc: UserError):
        return openai_error(str(exc))

    @app.exception_handler(ModelNotFound)
    async def model_not_found(_, exc: ModelNotFound):
        return openai_error(str(exc), 404, param="model", code="model_not_found")

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):  # unknown routes (404), wrong method (405)
        return openai_error(str(exc.detail), exc.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(prometheus_client.generate_latest(metrics.registry),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "limajax"}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody):
        """vLLM's /tokenize: a prompt (BOS first unless add_special_tokens is false) or chat
        messages (LIMA's dialogue format) -> ids."""
        check_model(body.model, optional=True)
        if (body.prompt is None) == (body.messages is None):
            raise UserError("give either prompt or messages")
        if body.messages is not None:
            ids = tokenizer.encode_prompt(conversation(body.messages))
        else:
            ids = tokenizer.encode_prompt([body.prompt], raw=True)
            ids = ids if body.add_special_tokens else ids[1:]
        return {"count": len(ids), "max_model_len": engine.cache_length, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeBody):
        check_model(body.model, optional=True)
        bad = [i for i in body.tokens if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise UserError(f"tokens: id {bad[0]} is outside the vocabulary "
                            f"(0..{tokenizer.vocab_size - 1})")
        return {"prompt": tokenizer.decode(body.tokens)}

    def check_model(name: str | None, optional: bool = False) -> None:
        """The model a request names must be the one served (OpenAI's 404 otherwise);
        /tokenize and /detokenize may omit it, as in vLLM."""
        if name is None and optional:
            return
        if name is None:
            raise UserError(f"model: required (this server serves {model_name!r})")
        if name != model_name:
            raise ModelNotFound(f"The model {name!r} does not exist; this server serves "
                                f"{model_name!r}")

    async def answer(body: Sampling, prompts: list[tuple[list[int], str]], kind: str, *,
                     max_tokens: int | None, top: int | None, echo: bool = False):
        """Generate n answers to each prompt (choices numbered prompt by prompt) and build the
        response; `top`: log-probabilities with that many alternatives."""
        check_model(body.model)
        arrived = time.monotonic()
        if max_tokens == 0 and not echo:
            raise UserError("max_tokens: 0 generates nothing; it is only meaningful with echo")
        if echo and len(prompts) * body.n > engine.max_batch:
            raise UserError(f"prompt: {len(prompts)} prompts x n={body.n} with echo; this "
                            f"server scores at most {engine.max_batch} per request "
                            "(serve --max-batch)")
        for i, (ids, _) in enumerate(prompts):
            where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            room = 1 if max_tokens is None or body.cap_max_tokens else max(max_tokens, 1)
            check_prompt(ids, engine.cache_length, where, room=room)
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        todo = []
        if max_tokens != 0:
            for i, (ids, _) in enumerate(prompts):
                settings = settings_from(body, max_tokens, engine.cache_length - len(ids),
                                         top is not None)
                for k in range(body.n):
                    c = i * body.n + k
                    todo.append(Job(SamplingRequest(ids, settings, "request", k),
                                    lambda e, c=c: loop.call_soon_threadsafe(
                                        events.put_nowait, (c, e)),
                                    TextStream(tokenizer, stop,
                                               context=ids if kind == "completion" else ())))
        choices = len(prompts) * body.n
        prompt_of = [prompts[c // body.n] for c in range(choices)]
        echoed: list[list[Scored]] = [[] for _ in range(choices)]
        if echo and top is not None:
            scores = await asyncio.wrap_future(engine.call(
                lambda: engine.prompt_logprobs([ids for ids, _ in prompts])))
            for c in range(choices):
                ids = prompt_of[c][0]
                chosen, tid, tlp = scores[c // body.n]
                echoed[c] = [(ids[0], None, None)] + [
                    (ids[t], float(chosen[t - 1]), list(zip(tid[t - 1].tolist(),
                                                             tlp[t - 1].tolist(), strict=True)))
                    for t in range(1, len(ids))]
        for job in todo:
            engine.submit(job)
        metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in prompts))
        created = int(time.time())
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        done: dict[int, dict] = {} if todo else {
            c: {"finish": "length", "completion_tokens": 0} for c in range(choices)}
        first = set()

        async def events_until_done():
            try:
                while len(done) < choices:
                    c, event = await events.get()
                    if "error" in event:
                        raise RuntimeError(event["error"])  # a 500: the server's fault
                    if "finish" in event:
                        done[c] = event
                        metrics.generated_tokens.inc(event["completion_tokens"])
                    elif c not in first:
                        first.add(c)
                        metrics.ttft.observe(time.monotonic() - arrived)
                    yield c, event
            finally:  # the client went away: stop generating for it
                for job in todo:
                    job.cancelled = True

        def generated() -> int:
            return sum(e["completion_tokens"] for e in done.values())

        def scored(event) -> list[Scored]:
            if "logprobs" not in event:
                return []
            return [(i, lp, list(zip(*t, strict=True))) for i, lp, t in
                    zip(event["ids"], event["logprobs"], event["top"], strict=True)]

        def logprobs_of(new: list[Scored], context, offset: int) -> dict | None:
            if top is None:
                return None
            if kind == "chat":
                return chat_logprobs(tokenizer, new, top)
            return completion_logprobs(tokenizer, new, top, context, offset)

        prompt_texts = [prompt_of[c][1] if echo else "" for c in range(choices)]

        if body.stream:
            async def sse():
                offsets, contexts = [0] * choices, [[] for _ in range(choices)]
                for c in range(choices):
                    if kind == "chat":
                        yield stream_chunk(kind, rid, created, model_name, c, role=True)
                    elif echo:
                        yield stream_chunk(kind, rid, created, model_name, c,
                                           prompt_texts[c],
                                           logprobs=logprobs_of(echoed[c], [], 0))
                    offsets[c], contexts[c] = len(prompt_texts[c]), list(prompt_of[c][0])
                async for c, event in events_until_done():
                    new = scored(event)
                    lp = logprobs_of(new, contexts[c], offsets[c]) if new else None
                    offsets[c] += len(event.get("text", ""))
                    contexts[c] += event.get("ids", [])
                    yield stream_chunk(kind, rid, created, model_name, c, event.get("text"),
                                       event.get("finish"), logprobs=lp)
                if not todo:
                    for c in range(choices):
                        yield stream_chunk(kind, rid, created, model_name, c, "", "length")
                yield stream_chunk(kind, rid, created, model_name,
                                   usage=usage(sum(len(p[0]) for p in prompts), generated()))
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        texts, records = list(prompt_texts), [list(e) for e in echoed]
        async for c, event in events_until_done():
            texts[c] += event.get("text", "")
            records[c] += scored(event)
        logprobs = [logprobs_of(records[c], [] if echo else prompt_of[c][0], 0)
                    for c in range(choices)]
        return response(kind, rid, created, model_name, texts,
                        [done[c]["finish"] for c in range(choices)], logprobs,
                        sum(len(p[0]) for p in prompts), generated())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        ids = tokenizer.encode_prompt(conversation(body.messages))
        if body.top_logprobs is not None and not body.logprobs:
            raise UserError("top_logprobs: needs logprobs: true")
        return await answer(body, [(ids, "")], "chat",
                            max_tokens=body.max_completion_tokens or body.max_tokens,
                            top=(body.top_logprobs or 0) if body.logprobs else None)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await answer(body, prompts_of(body, tokenizer), "completion",
                            max_tokens=body.max_tokens, top=body.logprobs, echo=body.echo)

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_from(env: str | None, host: str, no_auth: bool) -> str | None:
    """The key `serve --api-key-env VAR` requires, read from the environment only (never from
    the command line, where `ps` shows it; never printed). Beyond loopback a key is required
    unless --no-auth says to serve anyone who can connect."""
    if env is not None:
        key = os.environ.get(env, "")
        if not key:
            raise UserError(f"--api-key-env {env}: the environment variable {env} is not set "
                            "or empty")
        return key
    if not is_loopback(host) and not no_auth:
        raise UserError(f"--host {host} is reachable beyond this machine: set a key with "
                        "--api-key-env VAR (clients send 'Authorization: Bearer KEY'), or pass "
                        "--no-auth to serve without one")
    return None


def announcing_server(config, announce: Callable[[], None]):
    """uvicorn's server, calling `announce` only once the port accepts connections."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                announce()

    return Server(config)


@contextlib.contextmanager
def running(engine: Engine, name: str, host: str = "127.0.0.1", api_key: str | None = None
            ) -> Iterator[str]:
    """Serve `engine` from a thread of this process, on a free port, while the block runs (the
    demo's judge, tests); yields the OpenAI base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(engine, name, api_key), host=host,
                                           port=port, log_level="warning"))
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
          name: str | None = None, api_key_env: str | None = None,
          no_auth: bool = False) -> None:
    """`limajax serve`: load the model, start the engine, and serve until interrupted; the
    "serving on" line comes once the port accepts connections."""
    import uvicorn

    api_key = api_key_from(api_key_env, host, no_auth)
    mesh = sharding.inference_mesh(mesh_spec)
    model, tokenizer = load_for_inference(source, mesh, epoch=epoch)
    engine = Engine(model, tokenizer, mesh, max_batch, context)
    name = name or (source if epoch is None else f"{source}@epoch{epoch}")
    config = uvicorn.Config(make_app(engine, name, api_key), host=host, port=port,
                            log_level="warning")
    line = (f"serving {name} on http://{host}:{port}/v1 "
            f"({'a key required' if api_key else 'no key'}; Ctrl-C stops)")
    try:
        announcing_server(config, lambda: print(line, file=sys.stderr, flush=True)).run()
    finally:
        engine.close()
