"""LLM judges over HTTP: any OpenAI-compatible chat endpoint (GPT-4, vLLM, llama.cpp's server,
limajax's own `serve`), through limajax's one endpoint client (limajax/endpoint.py: retries,
the check before anything is sent, the API key kept out of files, logs and messages).

This module adds what judging needs: asking again when an answer holds no verdict (at most
twice, then `unparsed`), appending every judgment to the judgment file the moment it arrives,
a progress bar with the running figures.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from importlib import resources
from typing import ClassVar

from limajax import endpoint
from limajax.errors import UserError
from limajax.evaluation.judgments import JudgmentFile, sha256
from limajax.progress import bar as progress_bar

REASKS = 2  # an answer without a verdict is asked again at most this often, then `unparsed`
REASK = ("Please give your final choice now, with no explanation, as exactly one of these "
         "lines:\n{choices}")


@dataclasses.dataclass(frozen=True)
class Judge(endpoint.Endpoint):
    max_tokens: int = 1024

    role: ClassVar[str] = "judge"


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
class Tally(endpoint.Tally):
    unparsed: int = 0


async def _ask(client, judge: Judge, template: Template, job: Job, tally: Tally) -> dict:
    """Ask, and ask again (at most REASKS times) while the answer holds no verdict."""
    messages = [{"role": "user", "content": job.prompt}]
    reasks: list[str] = []
    retries = 0
    for attempt in range(REASKS + 1):
        raw = await client.chat.completions.with_raw_response.create(
            model=judge.model, messages=messages, temperature=0.0, max_tokens=judge.max_tokens)
        retries += raw.retries_taken
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
    """Judge every job through the endpoint client, appending each line to `out` as it arrives
    (`on_row` sees it and returns the progress bar's running figures). A job that fails after
    all retries stops the run with one line (what is done stays done)."""
    tally = Tally()
    bar = progress_bar(total=len(out.done) + len(jobs), initial=len(out.done), desc="judge",
                       unit="judgment", enabled=progress)

    async def ask(client, job: Job) -> dict:
        return await _ask(client, judge, template, job, tally)

    def write(row: dict) -> None:
        out.append(row)
        bar.set_postfix_str((on_row(row) + ", " if on_row else "") +
                            f"retries {tally.retries}, unparsed {tally.unparsed}", refresh=False)
        bar.update(1)

    try:
        endpoint.run(judge, jobs, ask, write, describe=lambda job: f"judging {job.key}",
                     tally=tally)
    finally:
        bar.close()
    if tally.failure:
        raise UserError(f"{tally.failure}; {len(out.done)} judgments are saved in {out.path}, "
                        "rerun to continue")
    return tally
