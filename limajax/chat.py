"""`limajax chat`: a conversation in the terminal, in LIMA's dialogue format (LIMA §6 studies
multi-turn dialogue). The history is the list of utterances; every turn is prompted as BOS,
every utterance + EOT, and the answer streams in as the engine produces it."""

from __future__ import annotations

import dataclasses
import queue
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from jax.sharding import Mesh

from limajax import sharding
from limajax.checkpoint import load_for_inference
from limajax.errors import UserError
from limajax.files import append_jsonl, drop_torn_last_line, read_jsonl
from limajax.model import Llama
from limajax.sampling import Engine, Job, Request, Settings, TextStream
from limajax.sampling.sampler import check_prompt
from limajax.tokenizer import Tokenizer

HELP = ("/reset forgets the conversation, /settings shows the sampling settings and "
        "`/settings temperature=0.5 top_p=0.95 ...` changes them, /exit (or Ctrl-D) quits; "
        "Ctrl-C stops an answer.")


def fit(tokenizer: Tokenizer, turns: Sequence[str], limit: int, room: int
        ) -> tuple[list[int], int]:
    """The prompt for `turns` (the user's last), leaving `room` tokens for the answer within
    `limit`: the oldest exchanges (a user turn and its answer) are dropped until it fits.
    Returns (prompt ids, turns dropped); a last message too long on its own is a UserError."""
    for dropped in range(0, len(turns), 2):
        ids = tokenizer.encode_prompt(turns[dropped:])
        if len(ids) + room <= limit or dropped + 2 >= len(turns):
            check_prompt(ids, limit, "that message", room)  # the last message alone
            return ids, dropped


def change(settings: Settings, words: Sequence[str]) -> Settings:
    """`temperature=0.5 top_p=0.95` -> settings with those values (checked by Settings)."""
    types = {f.name: f.type for f in dataclasses.fields(Settings)}
    changes = {}
    for word in words:
        name, _, value = word.partition("=")
        name = name.replace("-", "_")
        if name not in types or not value:
            raise UserError(f"{word!r}: expected NAME=VALUE with NAME one of {', '.join(types)}")
        try:
            if name == "greedy":
                changes[name] = value.lower() in ("1", "true", "yes", "on")
            elif name in ("max_new_tokens", "seed"):
                changes[name] = int(value)
            else:
                changes[name] = float(value)
        except ValueError:
            raise UserError(f"{word!r}: {value!r} is not a number") from None
    new = dataclasses.replace(settings, **changes)
    if new.greedy != settings.greedy and "repetition_penalty" not in changes:
        new = dataclasses.replace(new, repetition_penalty=None)  # greedy's default differs
    return new


def implied(old: Settings, new: Settings, words: Sequence[str]) -> str | None:
    """What a /settings change set besides the names it gave, and why, e.g. for
    `temperature=0`: "(this also sets repetition_penalty=1.0, greedy=True: temperature 0 means
    greedy, whose default repetition penalty is 1.0)"; None if nothing else changed."""
    named = {w.partition("=")[0].replace("-", "_") for w in words}
    before, after = old.to_dict(), new.to_dict()
    also = [k for k in after if after[k] != before[k] and k not in named]
    if not also:
        return None
    why = []
    if "greedy" in also:
        why.append("temperature 0 means greedy" if new.greedy else "temperature > 0 samples")
    if "repetition_penalty" in also:
        why.append(f"{'greedy' if new.greedy else 'sampling'}'s default repetition penalty is "
                   f"{after['repetition_penalty']}")
    return (f"(this also sets {', '.join(f'{k}={after[k]}' for k in also)}"
            + (f": {', and '.join(why)}" if why else "") + ")")


def record_conversation(path: str | Path, turns: Sequence[str], settings: Sequence[Settings],
                        checkpoint: dict, dropped: int = 0) -> dict:
    """Append one finished conversation to `path` as a GAIR-style row (LIMA §6: graded turn by
    turn with `rate --per-turn`): id "chat-N" (N = its place in the file), every turn, the
    sampling settings (one dict, or one per answer if /settings changed them), the checkpoint
    and how many turns the context had to drop. Returns the row."""
    path = Path(path)
    drop_torn_last_line(path)  # a chat killed mid-write: keep the complete rows
    n = sum(1 for _ in read_jsonl(path)) if path.exists() else 0
    used = [s.to_dict() for s in settings]
    row = {"id": f"chat-{n + 1}", "conversations": list(turns), "source": "chat",
           "settings": used[0] if all(u == used[0] for u in used) else used,
           "checkpoint": checkpoint, "context_dropped_turns": dropped, "time": time.time()}
    append_jsonl(path, row)
    return row


def converse(model: Llama, tokenizer: Tokenizer, mesh: Mesh, settings: Settings,
             read: Callable[[str], str], write: Callable[[str], None],
             record: Callable[[list[str], list[Settings], int], None] | None = None) -> None:
    """The conversation loop: `read(prompt)` gives the user's line (EOFError ends it), `write`
    shows text as it comes; `record(turns, settings per answer, turns dropped)` gets each
    finished conversation (at /reset and at the end)."""
    engine = Engine(model, tokenizer, mesh, max_batch=1, steps_per_call=4)
    limit, turns, answered = engine.cache_length, [], 0
    whole, used, dropped_all = [], [], 0  # the conversation as said, for `record`

    def finished():
        nonlocal whole, used, dropped_all
        if record is not None and whole:
            record(whole, used, dropped_all)
        whole, used, dropped_all = [], [], 0
    write(f"limajax chat: {HELP}\n")
    try:
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                write("\n")
                return
            except KeyboardInterrupt:  # the conversation is kept: only /exit or Ctrl-D quit
                write("\n(Ctrl-C stops an answer; /exit or Ctrl-D quits)\n")
                continue
            if not line:
                continue
            if line == "/exit":
                return
            if line == "/reset":
                turns = []
                finished()
                write("(the conversation is forgotten)\n")
                continue
            if line.split()[0] == "/settings":
                try:
                    new = change(settings, line.split()[1:])
                    note = implied(settings, new, line.split()[1:])
                    settings = new
                    if note:
                        write(f"{note}\n")
                except UserError as e:
                    write(f"error: {e}\n")
                shown = ", ".join(f"{k}={v}" for k, v in settings.to_dict().items())
                write(f"settings: {shown}\n")
                continue
            if line.startswith("/"):
                write(f"unknown command {line.split()[0]}; {HELP}\n")
                continue
            try:
                ids, dropped = fit(tokenizer, turns + [line], limit,
                                   min(settings.max_new_tokens, limit // 4))
            except UserError as e:
                write(f"error: {e}\n")
                continue
            if dropped:
                write(f"(the conversation outgrew the {limit}-token context: the oldest "
                      f"{dropped} turns are dropped)\n")
                turns, dropped_all = turns[dropped:], dropped_all + dropped
            answer = stream_answer(engine, tokenizer, Request(ids, settings, "chat", answered),
                                   write)
            turns += [line, answer]
            whole, used = whole + [line, answer], used + [settings]
            answered += 1
    finally:
        engine.close()
        finished()


def stream_answer(engine: Engine, tokenizer: Tokenizer, request: Request,
                  write: Callable[[str], None]) -> str:
    """Generate one answer, writing it as it comes; Ctrl-C stops it where it is."""
    events: queue.Queue[dict] = queue.Queue()
    job = Job(request, events.put, TextStream(tokenizer))
    engine.submit(job)
    write("lima> ")
    try:
        while "finish" not in (event := events.get()):
            if "error" in event:
                raise RuntimeError(event["error"])
            write(event["text"])
    except KeyboardInterrupt:
        job.cancelled = True
        write(" [stopped]")
    write("\n")
    return job.stream.text


def chat(source: str, settings: Settings, *, epoch: int | None = None, mesh_spec: str = "1x1",
         read: Callable[[str], str] = input, write: Callable[[str], None] | None = None,
         record_path: str | None = None) -> None:
    """`limajax chat`: load the model and talk; with `record_path`, each finished conversation
    is appended there (record_conversation)."""
    mesh = sharding.inference_mesh(mesh_spec)
    model, tokenizer = load_for_inference(source, mesh, epoch=epoch)
    if tokenizer.eot_id is None:
        raise UserError(f"{source}: the model has no EOT token, so it cannot hold LIMA's "
                        "dialogue format (use `limajax sample --raw` for a base model)")
    checkpoint = {"path": str(source), "epoch": epoch}
    record = None if record_path is None else (
        lambda turns, used, dropped: record_conversation(record_path, turns, used, checkpoint,
                                                         dropped))
    converse(model, tokenizer, mesh, settings, read, write or echo, record)


def echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
