"""`limajax sample --endpoint`: the other side of LIMA's comparisons (Figure 1: Alpaca-65B,
DaVinci003, Bard, Claude, GPT-4), answers from a model behind an OpenAI-compatible API, as
FastChat's gen_api_answer.py and Arena-Hard's gen_answer.py collect them.

The same prompts file and the same rows as local sampling (answers.py), plus where they came
from: the endpoint, the model name it reported, the settings actually sent and the usage. A
chat model gets the dialogue's turns as messages (/chat/completions); a base model (`raw`) the
first entry as a plain prompt (/completions). Requests go through limajax's one endpoint client
(limajax/endpoint.py: retries, the check before anything is sent, the key kept secret).

Rows are appended as they arrive, so a killed run keeps them and a rerun asks only for what is
missing. A prompt the endpoint refuses (a 400, 413 or 422, a content filter) is a failed row with
the reason and no "response": counted, never judged as an answer (evaluation/judgments.py skips
it), and asked again only with `retry_failed`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from limajax import endpoint as client_lib
from limajax.errors import UserError
from limajax.files import append_jsonl, read_jsonl, write_jsonl
from limajax.progress import bar as progress_bar
from limajax.sampling.answers import answered, in_input_order, read_prompts
from limajax.sampling.sampler import Settings
from limajax.tokenizer import prompt_turns

REFUSING_FINISHES = ("content_filter",)  # a finish reason that says the answer was withheld


def sent_settings(settings: Settings, repetition_penalty: float | None) -> dict:
    """The request fields LIMA §4.1's settings become where the OpenAI API takes them:
    temperature (0 when greedy), top_p and max_tokens; `repetition_penalty` (no OpenAI field;
    vLLM and limajax serve read it) only when the user asked for one. The seed is not sent: an
    endpoint's draws are its own."""
    sent = {"temperature": 0.0 if settings.greedy else settings.temperature,
            "max_tokens": settings.max_new_tokens}
    if not settings.greedy:
        sent["top_p"] = settings.top_p
    if repetition_penalty is not None:
        sent["repetition_penalty"] = settings.repetition_penalty
    return sent


def messages(conversations: list[str]) -> list[dict]:
    """A GAIR row's turns as chat messages: user, assistant, ..., user (a trailing reference
    answer left out, as local sampling leaves it out)."""
    return [{"role": ("user", "assistant")[i % 2], "content": turn}
            for i, turn in enumerate(prompt_turns(conversations))]


def without(output: Path, keys: set[tuple[str, int]]) -> None:
    """Rewrite `output` atomically without the rows of `keys` (failed rows to ask again)."""
    write_jsonl(output, [row for _, _, row in read_jsonl(output)
                         if (str(row["id"]), int(row["sample"])) not in keys])


def answer_file(ep: client_lib.Endpoint, prompts_path: str, output_path: str, sent: dict, *,
                num_samples: int = 1, raw: bool = False, retry_failed: bool = False,
                template: str = "lima", progress: bool = True) -> dict:
    """Answer every prompt `num_samples` times from the endpoint into a JSONL file; returns a
    summary (answers, failed, already there, tokens, retries: format_summary's)."""
    rows = read_prompts(prompts_path, template)
    output = Path(output_path)
    done = answered(output)
    where = {"url": ep.url, "api": "/completions" if raw else "/chat/completions",
             "model": ep.model}
    for row in done.values():  # one file holds one model's answers, asked one way
        theirs = row.get("endpoint") or {}
        if {k: theirs.get(k) for k in where} != where:
            by = (f"{theirs.get('model')!r} at {theirs.get('url')} ({theirs.get('api')})"
                  if theirs else "a local model")
            raise UserError(f"{output}: holds answers of {by}, not of {ep.model!r} at {ep.url} "
                            f"({where['api']}); write these to another --output")
    failed = {key for key, row in done.items() if "failed" in row}
    if retry_failed and failed:
        without(output, failed)
        done = {key: row for key, row in done.items() if key not in failed}
    todo = [(row, k) for row in rows for k in range(num_samples)
            if (str(row["id"]), k) not in done]
    ep.api_key()  # a missing key variable is reported before anything is sent
    extra = {"repetition_penalty": sent["repetition_penalty"]} if "repetition_penalty" in sent \
        else None
    fields = {k: v for k, v in sent.items() if k != "repetition_penalty"}

    async def ask(client, job) -> dict:
        row, k = job
        common = {**{f: v for f, v in row.items() if f != "response"}, "sample": k,
                  "endpoint": where, "settings": sent}
        try:
            if raw:
                reply = await client.completions.with_raw_response.create(
                    model=ep.model, prompt=row["conversations"][0], extra_body=extra, **fields)
            else:
                reply = await client.chat.completions.with_raw_response.create(
                    model=ep.model, messages=messages(row["conversations"]), extra_body=extra,
                    **fields)
        except Exception as e:
            reason = client_lib.refusal(e)
            if reason is None:
                raise
            return {**common, "failed": ep.redact(reason), "retries": 0}
        try:
            parsed = reply.parse()
            choice = parsed.choices[0]
            text = choice.text if raw else choice.message.content
            finish = choice.finish_reason
        except (AttributeError, IndexError, TypeError, ValueError):
            raise UserError(ep.redact(
                f"endpoint {ep.url}: the answer to prompt {row['id']!r} is not a completion: "
                f"{reply.http_response.text[:200]!r}")) from None
        reported = {**where, "reported_model": getattr(parsed, "model", None)}
        if finish in REFUSING_FINISHES or text is None:
            return {**common, "endpoint": reported, "retries": reply.retries_taken,
                    "failed": f"finish_reason {finish}" + (f": {text[:500]}" if text else "")}
        usage = parsed.usage.model_dump() if parsed.usage else None
        return {**common, "endpoint": reported, "response": text, "usage": usage,
                "prompt_tokens": (usage or {}).get("prompt_tokens"),
                "completion_tokens": (usage or {}).get("completion_tokens"),
                "finish_reason": finish, "retries": reply.retries_taken}

    counts = {"answers": 0, "failed": 0, "tokens": 0}
    bar = progress_bar(total=len(todo), desc="sample", unit="answer", enabled=progress)
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(row: dict) -> None:
        append_jsonl(output, row)
        counts["failed" if "failed" in row else "answers"] += 1
        counts["tokens"] += row.get("completion_tokens") or 0
        bar.set_postfix_str(f"failed {counts['failed']}", refresh=False)
        bar.update(1)

    with bar:
        tally = client_lib.run(ep, todo, ask, write,
                               describe=lambda job: f"answering prompt {job[0]['id']!r}")
    if tally.failure:
        raise UserError(f"{tally.failure}; the {len(done) + tally.done} rows so far are in "
                        f"{output}, rerun to continue")
    if output.exists():
        in_input_order(output, rows)
    failed_now = [key for key, row in answered(output).items() if "failed" in row]
    if failed_now:
        print(f"notice: {len(failed_now)} prompts were refused by the endpoint (failed rows with "
              "the reason; compare, annotate and rate leave them out); rerun with "
              "--retry-failed to ask again", file=sys.stderr)
    return {**counts, "skipped": len(rows) * num_samples - len(todo), "retries": tally.retries,
            "failed_total": len(failed_now)}


def format_summary(s: dict, model: str, output: str) -> str:
    return (f"wrote {s['answers']} answers from {model} ({s['tokens']} tokens, {s['retries']} "
            f"retries) to {output}; {s['skipped']} were already there; {s['failed']} refused "
            f"now, {s['failed_total']} failed rows in the file")
