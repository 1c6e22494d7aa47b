"""`limajax sample`: GAIR prompt files in, answer files out (DESIGN §3), over the sampler.

Answers are appended as batches finish, so an interrupted run keeps what it finished and the
same command continues from there; when all are there the file is rewritten in the input's
order.
"""

from __future__ import annotations

import time
from pathlib import Path

from limajax import sharding
from limajax.checkpoint import load_for_inference
from limajax.errors import UserError
from limajax.files import append_jsonl, drop_torn_last_line, read_jsonl, write_jsonl
from limajax.formats import FIELDS, read_dialogues, templated
from limajax.progress import bar as progress_bar
from limajax.sampling.sampler import (
    Completion,
    Request,
    Settings,
    answer_tokens,
    check_prompt,
    context_length,
    decode_after,
    generate,
    stop_ids,
)
from limajax.tokenizer import Tokenizer


def read_prompts(path: str | Path, template: str = "lima") -> list[dict]:
    """Prompt rows in any format `data prepare` reads (formats.py: GAIR, Alpaca, ShareGPT,
    OpenAI messages), as GAIR rows {"id", "conversations": [...], the row's other fields}; a
    row without an id gets its line number. `template` as the model was trained with."""
    rows, lines = [], {}
    for d in read_dialogues(path, template=template):
        where, n = d.where, d.lineno
        row = {"id": n, **{k: v for k, v in d.row.items() if k not in FIELDS[d.format]},
               "conversations": list(d.turns)}
        if str(row["id"]) in lines:
            raise UserError(f"{where}: id {row['id']!r} was already used on line "
                            f"{lines[str(row['id'])]}")
        lines[str(row["id"])] = n
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no prompts")
    return rows


def answer_text(tokenizer: Tokenizer, ids: list[int], completion: Completion, raw: bool) -> str:
    """An answer's text: a raw continuation decoded after its prompt, so it keeps its leading
    space; a dialogue answer is its own utterance."""
    return decode_after(tokenizer, ids if raw else [],
                        answer_tokens(completion.tokens, completion.finish))


def answered(path: Path) -> dict[tuple[str, int], dict]:
    """{(id, sample): row} of the rows an earlier run wrote; a last line cut short is
    dropped."""
    drop_torn_last_line(path)  # interrupted mid-line: keep the complete rows
    if not path.exists():
        return {}
    done = {}
    for where, _, row in read_jsonl(path):
        try:
            done[str(row["id"]), int(row["sample"])] = row
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: not a row of an earlier `limajax sample` run (expected "
                            'JSON with "id" and "sample"); move the file away') from None
    return done


def sample_file(source: str, prompts_path: str, output_path: str, settings: Settings, *,
                epoch: int | None = None, num_samples: int = 1, batch_size: int = 16,
                mesh_spec: str = "1x1", raw: bool = False, template: str = "lima",
                progress: bool = True) -> dict:
    """`limajax sample --prompts`: answer every prompt `num_samples` times into a JSONL file.

    Rows are appended as batches finish, so an interrupted run keeps what it finished; rerun,
    rows already in the output are skipped. When all are there the file is rewritten in the
    input's order. Returns a summary.
    """
    rows = read_prompts(prompts_path, template)
    output = Path(output_path)
    done = answered(output)
    mesh = sharding.inference_mesh(mesh_spec)
    model, tokenizer = load_for_inference(source, mesh, epoch=epoch)
    limit = context_length(model)
    todo = []
    for row in rows:
        ids = tokenizer.encode_prompt(row["conversations"], raw)
        check_prompt(ids, limit, f"{prompts_path}: prompt {row['id']!r}")
        todo += [(row, Request(ids, settings, row["id"], k)) for k in range(num_samples)
                 if (str(row["id"]), k) not in done]
    meta = {"settings": {**settings.to_dict(), "raw": raw, "template": template},
            "checkpoint": {"path": str(source), "epoch": epoch}}
    generated, start = 0, time.perf_counter()
    bar = progress_bar(total=len(todo), desc="sample", unit="answer", enabled=progress)
    output.parent.mkdir(parents=True, exist_ok=True)
    with bar:
        for finished in generate(model, mesh, [r for _, r in todo], batch_size,
                                 stop_ids(tokenizer)):
            for i, c in finished:
                row, request = todo[i]
                append_jsonl(output, {
                    **row, "response": answer_text(tokenizer, request.ids, c, raw),
                    "sample": request.sample, **meta, "prompt_tokens": len(request.ids),
                    "completion_tokens": len(c.tokens), "finish_reason": c.finish})
                generated += len(c.tokens)
            bar.set_postfix_str(f"{generated / (time.perf_counter() - start):.1f} tokens/s")
            bar.update(len(finished))
    in_input_order(output, rows)
    return {"answers": len(todo), "skipped": len(rows) * num_samples - len(todo),
            "tokens": generated, "seconds": time.perf_counter() - start}


def format_summary(s: dict, output: str) -> str:
    return (f"wrote {s['answers']} answers ({s['tokens']} tokens, "
            f"{s['tokens'] / max(s['seconds'], 1e-9):.1f} tokens/s) to {output}; {s['skipped']} "
            "were already there")


def in_input_order(output: Path, rows: list[dict]) -> None:
    """Rewrite the finished output atomically with its rows in the prompts' order."""
    place = {str(row["id"]): n for n, row in enumerate(rows)}
    answers = [row for _, _, row in read_jsonl(output)]
    answers.sort(key=lambda r: (place.get(str(r["id"]), len(place)), r["sample"]))
    write_jsonl(output, answers)


def sample_text(source: str, text: str, settings: Settings, *, epoch: int | None = None,
                num_samples: int = 1, mesh_spec: str = "1x1", raw: bool = False,
                template: str = "lima") -> list[str]:
    """`limajax sample --prompt TEXT`: the answers to one prompt, put as `template` puts a
    user turn (as sample_file's prompts are)."""
    mesh = sharding.inference_mesh(mesh_spec)
    model, tokenizer = load_for_inference(source, mesh, epoch=epoch)
    ids = tokenizer.encode_prompt(templated([text], template), raw)
    check_prompt(ids, context_length(model), "--prompt")
    requests = [Request(ids, settings, "prompt", k) for k in range(num_samples)]
    answers = [""] * num_samples
    for finished in generate(model, mesh, requests, num_samples, stop_ids(tokenizer)):
        for i, c in finished:
            answers[i] = answer_text(tokenizer, ids, c, raw)
    return answers
