"""The one client for OpenAI-compatible endpoints (GPT-4, Claude or Gemini through a gateway,
vLLM, llama.cpp's server, limajax's own `serve`): the judges (evaluation/judge.py) and
`sample --endpoint` (sampling/endpoint.py) both ask through it.

The `openai` client retries what is worth retrying (429 honouring Retry-After, 5xx, dropped
connections, time-outs) with exponential backoff. This module adds what it does not: a check
before any prompt is sent that the URL is an OpenAI-compatible API serving the model (one line
if not), a pool of `concurrency` requests in flight whose first lasting failure stops the run
with one line a user can act on, and the API key read from the environment only: it appears in
no file, log or message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar

from limajax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Endpoint:
    url: str  # the OpenAI-compatible base URL, e.g. https://api.openai.com/v1
    model: str
    api_key_env: str | None = None  # the environment variable holding the key, if one is needed
    timeout: float = 60.0  # seconds per request
    max_retries: int = 6  # per request, with backoff: ~0.5, 1, 2, 4, 8, 8 s (or Retry-After)
    concurrency: int = 8

    role: ClassVar[str] = "endpoint"  # how messages name it ("judge" for a judge)

    def api_key(self) -> str:
        if self.api_key_env is None:
            return "none"  # local servers take any key; the client needs one to send
        key = os.environ.get(self.api_key_env)
        if not key:
            raise UserError(f"--api-key-env {self.api_key_env}: that environment variable is "
                            f"not set (it must hold the {self.role}'s API key)")
        return key

    def redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return text.replace(key, "***") if key else text


def failure(e: Exception, endpoint: Endpoint, doing: str) -> str:
    """One line saying why a request could not be answered, without the key."""
    import openai

    tries = endpoint.max_retries + 1
    if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
        what = (f"refused the API key from ${endpoint.api_key_env} ({e.status_code})"
                if endpoint.api_key_env else
                f"wants an API key ({e.status_code}; pass --api-key-env VAR)")
    elif isinstance(e, openai.NotFoundError):
        what = (f"404 for model {endpoint.model!r} (is the model name right, and the URL an "
                "OpenAI-compatible base URL ending in /v1?)")
    elif isinstance(e, openai.APITimeoutError):
        what = f"no answer within --timeout {endpoint.timeout:g} s, {tries} tries"
    elif isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        what = f"cannot connect ({cause.__class__.__name__}), {tries} tries"
    elif isinstance(e, openai.APIStatusError):
        what = f"HTTP {e.status_code} after {tries} tries: {str(e)[:200]}"
    else:
        what = f"{e.__class__.__name__}: {str(e)[:200]}"
    return endpoint.redact(f"{endpoint.role} {endpoint.url}: {what} ({doing})")


REFUSALS = (400, 413, 422)  # statuses about the request itself: too long, a content policy


def refusal(e: Exception) -> str | None:
    """Why the endpoint refused this one prompt (REFUSALS; the client does not retry them), or
    None if the error is not about the prompt (it stops the run instead)."""
    import openai

    if isinstance(e, openai.APIStatusError) and e.status_code in REFUSALS:
        body = e.body if isinstance(e.body, dict) else {}
        message = body.get("message") or (body.get("error") or {}).get("message") or str(e)
        return f"HTTP {e.status_code}: {str(message)[:500]}"
    return None


async def _served_models(client, endpoint: Endpoint) -> list[str]:
    """The model ids of GET /models; one line if the URL is not an OpenAI-compatible API."""
    import openai

    where = f"{endpoint.role} {endpoint.url}"
    try:
        raw = await client.models.with_raw_response.list()
    except openai.NotFoundError:
        raise UserError(f"{where}: not an OpenAI-compatible API (404 for "
                        f"{endpoint.url.rstrip('/')}/models; the base URL usually ends in /v1)"
                        ) from None
    except openai.OpenAIError as e:
        raise UserError(failure(e, endpoint, "listing its models")) from None
    try:
        data = raw.http_response.json()["data"]
        return [str(m["id"]) for m in data]
    except (ValueError, KeyError, TypeError):
        kind = raw.http_response.headers.get("content-type", "no content type")
        raise UserError(f"{where}: not an OpenAI-compatible API ({endpoint.url.rstrip('/')}"
                        f"/models answered {kind.split(';')[0]}, not a JSON model list)"
                        ) from None


@dataclasses.dataclass
class Tally:
    done: int = 0
    retries: int = 0
    failure: str | None = None


def run(endpoint: Endpoint, jobs: Sequence, ask: Callable[[object, object], Awaitable[dict]],
        on_row: Callable[[dict], None], *, describe: Callable[[object], str],
        tally: Tally | None = None) -> Tally:
    """Ask every job, `endpoint.concurrency` at a time: `ask(client, job)` returns the job's row
    (its "retries" field counts the client's retries), which `on_row` writes the moment it
    arrives. First the endpoint is checked (it is OpenAI-compatible
    and serves the model), so a wrong URL or name is one line before any prompt is sent. A job
    that fails after all retries stops the run: `tally.failure` says why (`describe(job)` names
    the job); what was done stays done. Ctrl-C loses only the requests in flight."""
    import openai  # here, not at the top: its import takes seconds, and most commands need none

    tally = Tally() if tally is None else tally
    if not jobs:
        return tally
    key = endpoint.api_key()

    async def main():
        client = openai.AsyncOpenAI(base_url=endpoint.url, api_key=key,
                                    timeout=endpoint.timeout, max_retries=endpoint.max_retries)
        try:
            served = await _served_models(client, endpoint)
            if endpoint.model not in served:
                listed = ", ".join(served[:20]) + (", ..." if len(served) > 20 else "")
                raise UserError(f"{endpoint.role} {endpoint.url}: serves no model "
                                f"{endpoint.model!r} (it serves: {listed or 'none'})")
            queue: asyncio.Queue = asyncio.Queue()
            for job in jobs:
                queue.put_nowait(job)

            async def worker():
                while not queue.empty() and tally.failure is None:
                    job = queue.get_nowait()
                    try:
                        row = await ask(client, job)
                    except openai.OpenAIError as e:
                        tally.failure = tally.failure or failure(e, endpoint,
                                                                 f"while {describe(job)}")
                        return
                    tally.done += 1
                    tally.retries += row.get("retries", 0)
                    on_row(row)

            await asyncio.gather(*(worker() for _ in range(max(1, endpoint.concurrency))))
        finally:
            await client.close()

    asyncio.run(main())
    return tally
