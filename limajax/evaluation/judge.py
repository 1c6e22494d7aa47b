"""LLM judges over HTTP: any OpenAI-compatible chat endpoint (GPT-4, vLLM, llama.cpp's server,
limajax's own `serve`), through the `openai` client.

The client retries what is worth retrying (429 honouring Retry-After, 5xx, dropped connections,
time-outs) with exponential backoff; this module adds what it does not: asking again when an
answer holds no verdict (at most twice, then `unparsed`), appending every judgment to the
judgment file the moment it arrives, a progress bar, and errors a user can act on. The API key
is read from the environment and appears nowhere else: not in files, logs or messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import time
from collections.abc import Callable
from importlib import resources

from limajax.errors import UserError
from limajax.evaluation.judgments import JudgmentFile, sha256
from limajax.progress import bar as progress_bar

REASKS = 2  # an answer without a verdict is asked again at most this often, then `unparsed`
REASK = ("Please give your final choice now, with no explanation, as exactly one of these "
         "lines:\n{choices}")


@dataclasses.dataclass(frozen=True)
class Judge:
    url: str  # the OpenAI-compatible base URL, e.g. https://api.openai.com/v1
    model: str
    api_key_env: str | None = None  # the environment variable holding the key, if one is needed
    timeout: float = 60.0  # seconds per request
    max_retries: int = 6  # per request, with backoff: ~0.5, 1, 2, 4, 8, 8 s (or Retry-After)
    max_tokens: int = 1024
    concurrency: int = 8

    def api_key(self) -> str:
        if self.api_key_env is None:
            return "none"  # local servers take any key; the client needs one to send
        key = os.environ.get(self.api_key_env)
        if not key:
            raise UserError(f"--api-key-env {self.api_key_env}: that environment variable is "
                            "not set (it must hold the judge's API key)")
        return key


@dataclasses.dataclass(frozen=True)
class Template:
    name: str  # "pairwise", "grade" or "scale", or the path given with --template
    text: str
    choices: str  # what a re-ask lists

    @property
    def sha(self) -> str:
        return sha256(self.text)

    def fill(self, **fields: str) -> str:
        """The template with {question}, {answer_a}, ... replaced in one pass, so an answer that
        itself contains "{answer_b}" is left as it is."""
        missing = [f for f in fields if "{" + f + "}" not in self.text]
        if missing:
            raise UserError(f"template {self.name}: has no {{{missing[0]}}} placeholder")
        return re.sub(r"\{(" + "|".join(fields) + r")\}", lambda m: fields[m.group(1)], self.text)


CHOICES = {
    "pairwise": "Answer A is significantly better.\nAnswer B is significantly better.\n"
                "Neither is significantly better.",
    "grade": "Fail\nPass\nExcellent",
    "scale": "1\n2\n3\n4\n5\n6",
}


def load_template(kind: str, path: str | None = None) -> Template:
    """A packaged template (limajax/evaluation/templates/KIND.txt), or the user's file."""
    if path is None:
        text = resources.files("limajax.evaluation").joinpath(f"templates/{kind}.txt").read_text()
        return Template(kind, text, CHOICES[kind])
    try:
        with open(path, encoding="utf-8") as f:
            return Template(path, f.read(), CHOICES[kind])
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--template {path}: cannot read it ({e.__class__.__name__})") from None


@dataclasses.dataclass
class Job:
    key: tuple
    prompt: str  # the filled template
    parse: Callable[[str], object]  # judge's text -> verdict, or None
    record: Callable[[object, str, list, int], dict]  # (verdict, raw, reasks, retries) -> line


@dataclasses.dataclass
class Tally:
    done: int = 0
    retries: int = 0
    unparsed: int = 0
    seconds: float = 0.0
    failure: str | None = None


def _redact(text: str, judge: Judge) -> str:
    key = os.environ.get(judge.api_key_env) if judge.api_key_env else None
    return text.replace(key, "***") if key else text


def _failure(e: Exception, judge: Judge, job: Job) -> str:
    """One line saying why a judgment could not be had, without the key."""
    import openai

    where = f"judge {judge.url}"
    if isinstance(e, openai.AuthenticationError | openai.PermissionDeniedError):
        what = (f"refused the API key from ${judge.api_key_env} ({e.status_code})"
                if judge.api_key_env else
                f"wants an API key ({e.status_code}; pass --api-key-env VAR)")
    elif isinstance(e, openai.NotFoundError):
        what = (f"404 for model {judge.model!r} (is the model name right, and the URL an "
                "OpenAI-compatible base URL ending in /v1?)")
    elif isinstance(e, openai.APITimeoutError):
        what = f"no answer within --timeout {judge.timeout:g} s, {judge.max_retries + 1} tries"
    elif isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        what = f"cannot connect ({cause.__class__.__name__}), {judge.max_retries + 1} tries"
    elif isinstance(e, openai.APIStatusError):
        what = f"HTTP {e.status_code} after {judge.max_retries + 1} tries: {str(e)[:200]}"
    else:
        what = f"{e.__class__.__name__}: {str(e)[:200]}"
    return _redact(f"{where}: {what} (while judging {job.key})", judge)


async def _ask(client, judge: Judge, template: Template, job: Job, tally: Tally) -> dict:
    """Ask, and ask again (at most REASKS times) while the answer holds no verdict."""
    messages = [{"role": "user", "content": job.prompt}]
    reasks: list[str] = []
    retries = 0
    for attempt in range(REASKS + 1):
        raw = await client.chat.completions.with_raw_response.create(
            model=judge.model, messages=messages, temperature=0.0, max_tokens=judge.max_tokens)
        retries += raw.retries_taken
        tally.retries += raw.retries_taken
        try:
            text = raw.parse().choices[0].message.content or ""
        except (AttributeError, IndexError, TypeError, ValueError):
            text = raw.http_response.text[:2000]  # not a chat completion: keep what came
        verdict = job.parse(text)
        if verdict is not None:
            return job.record(verdict, text, reasks, retries)
        if attempt < REASKS:
            reasks.append(text)
            messages = messages[:1] + [
                {"role": "assistant", "content": text},
                {"role": "user", "content": REASK.format(choices=template.choices)}]
    tally.unparsed += 1
    return job.record("unparsed", text, reasks, retries)


def run(jobs: list[Job], judge: Judge, template: Template, out: JudgmentFile, *,
        progress: bool = True, on_row: Callable[[dict], str] | None = None) -> Tally:
    """Judge every job, `judge.concurrency` at a time, appending each line to `out` as it
    arrives (`on_row` sees it and returns the progress bar's running figures). A job that fails
    after all retries stops the run with one line (what is done stays done); Ctrl-C loses only
    the judgments in flight."""
    import openai  # here, not at the top: its import takes seconds, and `report` needs none

    key = judge.api_key()
    tally = Tally()
    bar = progress_bar(total=len(out.done) + len(jobs), initial=len(out.done), desc="judge",
                       unit="judgment", enabled=progress)

    async def main():
        client = openai.AsyncOpenAI(base_url=judge.url, api_key=key, timeout=judge.timeout,
                                    max_retries=judge.max_retries)
        queue: asyncio.Queue[Job] = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)

        async def worker():
            while not queue.empty() and tally.failure is None:
                job = queue.get_nowait()
                try:
                    row = await _ask(client, judge, template, job, tally)
                except openai.OpenAIError as e:
                    tally.failure = tally.failure or _failure(e, judge, job)
                    return
                out.append(row)
                tally.done += 1
                bar.set_postfix_str((on_row(row) + ", " if on_row else "") +
                                    f"retries {tally.retries}, unparsed {tally.unparsed}",
                                    refresh=False)
                bar.update(1)

        try:
            await asyncio.gather(*(worker() for _ in range(max(1, judge.concurrency))))
        finally:
            await client.close()

    start = time.perf_counter()
    try:
        asyncio.run(main())
    finally:
        bar.close()
    if tally.failure:
        raise UserError(f"{tally.failure}; {len(out.done)} judgments are saved in {out.path}, "
                        "rerun to continue")
    tally.seconds = time.perf_counter() - start
    return tally
