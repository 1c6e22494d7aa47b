"""LIMA §6's multi-turn study: `chat --record` keeps each finished conversation as a GAIR row,
and `rate --per-turn` grades every assistant turn of such rows (a deterministic stand-in judge:
an answer's "quality N" is graded (Fail, Pass, Excellent)[N - 1])."""

import json

from click.testing import CliRunner
from judge_server import JudgeServer

from limajax.chat import record_conversation
from limajax.cli import main
from limajax.sampling import Settings


def test_chat_record_keeps_each_finished_conversation(stories, tmp_path):
    record = tmp_path / "talks.jsonl"
    lines = ["Tell me a story.", "/settings temperature=0", "And another one?", "/reset",
             "/reset", "Hello.", "/exit"]
    result = CliRunner().invoke(main, ["chat", "--model", str(stories / "model"),
                                       "--max-new-tokens", 8, "--record", str(record)],
                                input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in record.read_text().splitlines()]
    # /reset ends the first conversation, an empty one (the second /reset) is not a row, /exit
    # ends the last
    assert [r["id"] for r in rows] == ["chat-1", "chat-2"]
    assert rows[0]["conversations"][::2] == ["Tell me a story.", "And another one?"]
    assert rows[1]["conversations"][::2] == ["Hello."]
    answers = rows[0]["conversations"][1::2] + rows[1]["conversations"][1::2]
    assert len(answers) == 3 and all(answers)
    at = 0
    for answer in answers:  # each answer as it was shown, in order
        at = result.output.index(f"lima> {answer}\n", at) + 1
    first, second = rows[0]["settings"]  # /settings changed them between the two answers
    assert (first["temperature"], second["temperature"]) == (0.7, 0.0)
    assert rows[1]["settings"]["temperature"] == 0.0 and rows[1]["settings"]["max_new_tokens"] == 8
    assert rows[0]["checkpoint"] == {"path": str(stories / "model"), "epoch": None}
    assert rows[0]["source"] == "chat" and rows[0]["context_dropped_turns"] == 0


def test_rate_per_turn_grades_every_answer_with_exact_counts(tmp_path, cli):
    # four conversations, the answers' qualities turn by turn (1 Fail, 2 Pass, 3 Excellent)
    talks = {"chat-1": (3, 2, 2), "chat-2": (2, 1, 3), "chat-3": (3, 3), "chat-4": (1,)}
    record = tmp_path / "talks.jsonl"
    for n, (ident, qualities) in enumerate(talks.items(), 1):
        turns = [t for k, q in enumerate(qualities)
                 for t in (f"Question {k + 1} of {ident}", f"answer {k + 1}, quality {q}")]
        assert record_conversation(record, turns, [Settings()], {"path": "m", "epoch": 7}
                                   )["id"] == ident == f"chat-{n}"
    with JudgeServer() as srv:
        args = ["rate", "--samples", record, "--per-turn", "--output", tmp_path / "r.jsonl",
                "--json", tmp_path / "r.json", "--judge-url", srv.url, "--judge-model",
                "judge-1", "--no-progress"]
        r = cli(*args)
        assert r.exit_code == 0, r.output
        assert len(srv.log) == 9  # every assistant turn, once
        assert cli(*args).exit_code == 0 and len(srv.log) == 9  # the rerun asked nothing
    s = json.loads((tmp_path / "r.json").read_text())
    assert s["counts"] == {"Fail": 2, "Pass": 3, "Excellent": 4}
    turns = s["per_turn"]
    assert [t["counts"] for t in turns] == [
        {"Fail": 1, "Pass": 1, "Excellent": 2},  # turn 1: chat-4 fails, chat-2 passes
        {"Fail": 1, "Pass": 1, "Excellent": 1},
        {"Fail": 0, "Pass": 1, "Excellent": 1}]
    # Pass or better through turn k, among the conversations that reached turn k
    assert [(t["through"]["pass_or_better"], t["through"]["conversations"]) for t in turns] == [
        (3, 4), (2, 3), (1, 2)]
    assert turns[0]["through"]["percent"] == 75.0
    lo, hi = turns[0]["through"]["ci95"]
    assert 0 <= lo <= 75.0 <= hi <= 100
    assert "turn 2: Fail 1, Pass 1, Excellent 1; Pass or better through turn 2: 2/3 (67%" \
        in r.output
    # the judge saw the dialogue so far: turn 2's question shows turn 1's exchange
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted((x["id"], x["turn"], x["rating"]) for x in rows)[:3] == [
        ("chat-1", 1, "Excellent"), ("chat-1", 2, "Pass"), ("chat-1", 3, "Pass")]


def test_rate_per_turn_refuses_unanswered_turns_and_the_scale(tmp_path, cli):
    record = tmp_path / "talks.jsonl"
    record.write_text(json.dumps({"id": "x", "conversations": ["q", "a", "q2"]}) + "\n")
    r = cli("rate", "--samples", record, "--per-turn", "--output", tmp_path / "r.jsonl",
            "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j", "--no-progress")
    assert r.exit_code == 2 and f"{record}:1: the conversation ends with an unanswered" in r.output
    r = cli("rate", "--samples", record, "--per-turn", "--rubric", "scale", "--output",
            tmp_path / "r.jsonl", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j")
    assert r.exit_code == 2 and "use --rubric grade" in r.output
