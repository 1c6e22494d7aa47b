"""`limajax compare` against a deterministic judge on loopback (tests/judge_server.py): exact
counts over both orders, every fault the issue names, SIGKILL and restart, the API key, and
bad input."""

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from judge_server import JudgeServer, pairwise_case, write_samples

from limajax.evaluation import judgments
from limajax.evaluation.judgments import combine
from limajax.evaluation.verdicts import parse_grade, parse_pairwise, parse_scale


@pytest.mark.parametrize("text, expected", [
    ("Answer A is significantly better.", "A"),
    ("A", "A"), ("B.", "B"), ("**Answer B**", "B"), ("Neither", "tie"), ("tie", "tie"),
    ("[[B]]", "B"), ("[[C]]", "tie"), ("My verdict: [[A]]", "A"),
    ("Neither is significantly better", "tie"),
    ("Neither answer is significantly better.", "tie"),
    ("Answer A is longer, but after weighing both, Answer B is significantly better.", "B"),
    ("Let me think. A has errors; B is clearer.\n\nVerdict: B", "B"),
    ("Final answer: Answer A", "A"),
    ("Response B was clearly better than response A.", "B"),
    ("Both answers have merits.", None), ("", None), ("I like turtles", None),
    ("A good answer needs more detail.", None),
])
def test_parse_pairwise(text, expected):
    assert parse_pairwise(text) == expected


def test_parse_ratings():
    assert parse_grade("It does what was asked, and well.\nExcellent") == "Excellent"
    assert parse_grade("Not a fail. Pass") == "Pass"
    assert parse_grade("Good.") is None
    assert parse_scale("Clear and complete, one small slip.\n5") == 5
    assert parse_scale("Reasons...\nRating: 4/6") == 4
    assert parse_scale("[[3]] because it misses half") == 3
    assert parse_scale("It is 7 out of 10.") is None


# Every verdict form judges use, a position bias, and each fault on some prompt's first try.
SPECS = [
    ("p1", 3, 1, ""), ("p2", 1, 3, "form:brackets"), ("p3", 2, 2, "form:bare"),
    ("p4", 3, 1, "biased form:reasoned"), ("p5", 1, 2, "fault:e500 form:verdict"),
    ("p6", 2, 1, "fault:e429"), ("p7", 2, 1, "fault:hang"), ("p8", 1, 2, "fault:drop"),
    ("p9", 1, 2, "fault:garbage"), ("p10", 1, 1, "form:never"), ("p11", 3, 2, "form:late"),
    ("p12", 1, 3, "biased"),
]
TIMEOUT = 1.0


def lines(path):
    return [json.loads(x) for x in open(path)]


def outcomes(rows):
    by_id = collections.defaultdict(dict)
    for r in rows:
        by_id[r["id"]][r["order"]] = r["verdict"]
    return {k: combine(v) for k, v in by_id.items()}


def compare_args(a, b, out, url, *extra):
    return ["compare", "--a", str(a), "--b", str(b), "--output", str(out), "--judge-url", url,
            "--judge-model", "judge-1", "--timeout", str(TIMEOUT), "--no-progress", *extra]


def test_compare_counts_and_faults(tmp_path, cli):
    a, b, expected = pairwise_case(tmp_path, SPECS)
    out = tmp_path / "j.jsonl"
    with JudgeServer(hang_s=TIMEOUT + 0.5, retry_after="1") as srv:
        r = cli(*compare_args(a, b, out, srv.url))
        assert r.exit_code == 0, r.output
        rows = lines(out)
        # exactly one judgment per (id, order), none twice, none lost
        assert sorted((x["id"], x["order"]) for x in rows) == sorted(
            (i, o) for i, *_ in SPECS for o in ("AB", "BA"))
        assert outcomes(rows) == expected
        by = {(x["id"], x["order"]): x for x in rows}
        # the biased judge says "first" in both orders: A once, B once -> a tie
        assert (by["p4", "AB"]["verdict"], by["p4", "BA"]["verdict"]) == ("A", "B")
        assert by["p10", "AB"]["verdict"] == "unparsed" and len(by["p10", "AB"]["reasks"]) == 2
        assert by["p11", "BA"]["verdict"] == "A" and len(by["p11", "BA"]["reasks"]) == 1
        for key in ("p5", "p6", "p7", "p8", "p9"):
            assert by[key, "AB"]["retries"] + len(by[key, "AB"]["reasks"]) >= 1, key
        log = collections.defaultdict(list)
        for entry in srv.log:
            log[entry.key].append(entry)
        assert len(log["p10:AB"]) == 3  # asked, then asked again twice, then `unparsed`
        assert [e.status for e in log["p5:AB"]] == [500, 500, 200]
        e429 = log["p6:AB"]
        assert e429[0].status == 429 and e429[1].time - e429[0].time >= 0.95  # Retry-After: 1
        assert r.output.strip().endswith(f"-> {out}")
        c = collections.Counter(expected.values())
        assert (c["A"], c["tie"], c["B"], c["unparsed"]) == (4, 3, 4, 1)
        assert "A 4, tie 3, B 4, unparsed 1" in r.output

        # a rerun asks nothing: every judgment is in the cache
        asked = len(srv.log)
        r = cli(*compare_args(a, b, out, srv.url))
        assert r.exit_code == 0 and len(srv.log) == asked, r.output
        assert "0 judged now, 24 already" in r.output
        assert len(lines(out)) == 24


def test_sigkill_and_restart_keeps_exactly_one_judgment_each(tmp_path):
    specs = [(f"p{i}", i % 3, (i * 2) % 3, "biased" if i % 5 == 0 else "") for i in range(1, 17)]
    a, b, expected = pairwise_case(tmp_path, specs)
    out = tmp_path / "j.jsonl"
    env = {**os.environ, "JUDGE_KEY": "sk-test-5ecret-k3y"}
    cmd = [sys.executable, "-c", "from limajax.cli import main; main()"]
    with JudgeServer(delay_s=0.05) as srv:
        args = compare_args(a, b, out, srv.url, "--concurrency", "2", "--api-key-env",
                            "JUDGE_KEY")
        proc = subprocess.Popen(cmd + args, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while (not out.exists() or len(out.read_text().splitlines()) < 6) and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = {(x["id"], x["order"]) for x in lines(out)}
        assert 6 <= len(before) < 32
        asked_before = len(srv.log)
        with open(out, "a") as f:  # as if the kill had cut a line short while it was written
            f.write('{"id": "p1", "order": "AB", "verd')
        done = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        rows = lines(out)
        keys = [(x["id"], x["order"]) for x in rows]
        assert len(keys) == len(set(keys)) == 32
        assert outcomes(rows) == expected
        # the restart asked only what was not finished before the kill
        again = {tuple(e.key.split(":")) for e in srv.log[asked_before:]}
        assert not again & before
        # the key went to the server, and nowhere else
        assert {e.authorization for e in srv.log} == {"Bearer sk-test-5ecret-k3y"}
    for f in tmp_path.iterdir():
        assert b"5ecret" not in f.read_bytes(), f
    assert "5ecret" not in done.stdout + done.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_input(tmp_path, cli, monkeypatch):
    a, b, _ = pairwise_case(tmp_path, [("p1", 1, 2, ""), ("p2", 2, 1, "")])
    out = tmp_path / "j.jsonl"
    monkeypatch.delenv("NO_SUCH_VAR_10", raising=False)

    def fails(args, message):
        r = cli(*args)
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: ") and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert not out.exists()

    refused = f"http://127.0.0.1:{free_port()}/v1"
    fails(compare_args(a, b, out, refused, "--max-retries", "1"), "cannot connect")
    fails(compare_args(a, b, out, refused, "--api-key-env", "NO_SUCH_VAR_10"),
          "NO_SUCH_VAR_10: that environment variable is not set")
    other = tmp_path / "other.jsonl"
    write_samples(other, [{"id": "q9", "conversations": ["hi"], "response": "hello"}])
    fails(compare_args(a, str(other), out, refused), "no prompt id in common")
    dup = tmp_path / "dup.jsonl"
    dup.write_text(open(a).read() + open(a).read().splitlines()[0] + "\n")
    fails(compare_args(str(dup), b, out, refused), "dup.jsonl:3: id 'p1' repeats")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "p1", "conversations": ["x"]}\n')
    fails(compare_args(str(bad), b, out, refused), "bad.jsonl:1: expected 'response'")

    # a judgments file written with another template is not silently extended
    with JudgeServer() as srv:
        assert cli(*compare_args(a, b, out, srv.url)).exit_code == 0
        template = tmp_path / "t.txt"
        template.write_text("Q {question}\nA {answer_a}\nB {answer_b}\nWhich?")
        r = cli(*compare_args(a, b, out, srv.url, "--template", template))
        assert r.exit_code == 2 and "with another template" in r.output, r.output


def test_rate_grades_and_scale(tmp_path, cli):
    # 4 prompts x 3 samples; quality q -> grade (Fail, Pass, Excellent)[q-1], scale q + 2
    qualities = {"p1": (1, 2, 3), "p2": (3, 3, 3), "p3": (2, 2, 1), "p4": (1, 1, 1)}
    rows = [{"id": i, "sample": k, "conversations": [f"Question {i}"],
             "response": f"answer, quality {q}"}
            for i, qs in qualities.items() for k, q in enumerate(qs)]
    samples = tmp_path / "s.jsonl"
    write_samples(samples, rows)
    with JudgeServer() as srv:
        for rubric in ("grade", "scale"):
            args = ["rate", "--samples", samples, "--rubric", rubric, "--output",
                    tmp_path / f"{rubric}.jsonl", "--json", tmp_path / f"{rubric}.json",
                    "--judge-url", srv.url, "--judge-model", "judge-1", "--no-progress"]
            r = cli(*args)
            assert r.exit_code == 0, r.output
        asked = len(srv.log)
        assert cli(*args).exit_code == 0
        assert len(srv.log) == asked == 24  # the rerun asked nothing
    grade = json.loads((tmp_path / "grade.json").read_text())
    assert grade["counts"] == {"Fail": 5, "Pass": 3, "Excellent": 4}
    scale = json.loads((tmp_path / "scale.json").read_text())
    all_q = [q for qs in qualities.values() for q in qs]
    assert scale["mean"] == pytest.approx(sum(all_q) / 12 + 2)
    lo, hi = scale["ci95"]
    # prompts' means are 4, 5, 3.67, 3: resampling the 4 prompts stays within their range
    assert 3 <= lo < scale["mean"] < hi <= 5


def test_prompt_as_the_judge_sees_it():
    from limajax.evaluation.judgments import Sample

    def prompt(*turns):
        return Sample("x", 0, turns, "answer", "f:1").prompt

    assert prompt("Q?") == "Q?"
    assert prompt("Q?", "the reference answer") == "Q?"  # a dev row's answer is not shown
    assert prompt("Q?", "A.", "Q2?") == "User: Q?\n\nAssistant: A.\n\nUser: Q2?"


def test_judging_with_limajax_serve(tmp_path, cli, stories_server):
    """limajax's own `serve` as the judge: stories260K writes stories, not verdicts. Whatever
    it says, every (id, order) gets exactly one line, a verdict is read or `unparsed` after two
    re-asks, and a rerun asks nothing."""
    a, b, _ = pairwise_case(tmp_path, [("p1", 1, 2, ""), ("p2", 2, 1, ""), ("p3", 1, 1, "")])
    template = tmp_path / "short.txt"  # the packaged one is longer than stories260K's context
    template.write_text("Question: {question}\nAnswer A: {answer_a}\nAnswer B: {answer_b}\n"
                        "Which answer is better, A or B?\n")
    out = tmp_path / "j.jsonl"
    args = ["compare", "--a", a, "--b", b, "--output", out, "--judge-url", stories_server,
            "--judge-model", "stories", "--template", template, "--judge-max-tokens", 24,
            "--no-progress"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    rows = lines(out)
    assert sorted((x["id"], x["order"]) for x in rows) == [
        (i, o) for i in ("p1", "p2", "p3") for o in ("AB", "BA")]
    for row in rows:
        assert row["verdict"] in ("A", "B", "tie", "unparsed") and row["raw"], row
        if row["verdict"] == "unparsed":
            assert len(row["reasks"]) == 2
        assert row["judge"] == "stories"
    assert "0 judged now, 6 already" in cli(*args).output


def test_ids_in_one_file_only_are_named_not_dropped(tmp_path, cli):
    """A and B partly overlap: refused in one line naming what only one file has, unless
    --common makes it deliberate (then a notice names them); compare, --human and annotate."""
    a, b, _ = pairwise_case(tmp_path, [(f"p{i}", 1, 2, "") for i in range(1, 4)])
    extra_a = [json.loads(x) for x in open(a)] + [
        {"id": f"a{i}", "conversations": [f"only A {i}"], "response": "x"} for i in range(7)]
    write_samples(a, extra_a)
    extra_b = [json.loads(x) for x in open(b)] + [
        {"id": "b1", "conversations": ["only B"], "response": "y"}]
    write_samples(b, extra_b)
    out = tmp_path / "j.jsonl"
    with JudgeServer() as srv:
        r = cli(*compare_args(a, b, out, srv.url))
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert (f"3 prompt ids are in both files; 7 only in {a} (a0, a1, a2, a3, a4, ...); "
                f"1 only in {b} (b1): pass --common") in r.output
        assert not out.exists() and not srv.log
        r = cli(*compare_args(a, b, out, srv.url, "--common"))
        assert r.exit_code == 0, r.output
        assert f"notice: 3 prompt ids are in both files; 7 only in {a}" in r.stderr
        assert "only the shared ones are used (--common)" in r.stderr
        assert len(lines(out)) == 6
    sheet = tmp_path / "sheet.html"
    r = cli("annotate", "--a", a, "--b", b, "--output", sheet)
    assert r.exit_code == 2 and "1 only in" in r.output and not sheet.exists(), r.output
    r = cli("annotate", "--a", a, "--b", b, "--output", sheet, "--common")
    assert r.exit_code == 0 and "wrote" in r.output and "(b1)" in r.stderr, r.output
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"sheet": "s", "seed": 0, "labels": []}))
    r = cli("compare", "--human", labels, "--a", a, "--b", b, "--output", tmp_path / "h.jsonl")
    assert r.exit_code == 2 and "pass --common" in r.output, r.output


def test_rate_with_nothing_read_has_no_interval():
    """No rating read: `percent` is null and so is its interval (it was [0.0, 0.0])."""
    from limajax.evaluation.rate import summarize

    s = summarize([{"id": "p1", "rating": "unparsed"}, {"id": "p2", "rating": "unparsed"}],
                  "grade")
    assert s["unparsed"] == 2
    assert all(s["percent"][g] is None and s["ci95"][g] is None for g in s["percent"])
    read = summarize([{"id": "p1", "rating": "Pass"}], "grade")
    assert read["ci95"]["Pass"] == [100.0, 100.0]


def test_orders_one_draws_each_prompts_order_from_the_seed(tmp_path, cli):
    """--orders one: each pair judged once, in the order annotate would show it (drawn from
    (seed, id)), so A is not always first; the verdict still names the files."""
    specs = [(f"p{i}", 3, 1, "") for i in range(12)]  # A better everywhere, an honest judge
    a, b, _ = pairwise_case(tmp_path, specs)
    for seed in (0, 1):
        out = tmp_path / f"one-{seed}.jsonl"
        with JudgeServer() as srv:
            r = cli(*compare_args(a, b, out, srv.url, "--orders", "one", "--seed", seed))
        assert r.exit_code == 0, r.output
        rows = lines(out)
        assert {x["id"]: x["order"] for x in rows} == {
            i: judgments.one_order(seed, i) for i, *_ in specs}
        assert {x["order"] for x in rows} == {"AB", "BA"}
        assert all(x["verdict"] == "A" for x in rows)


def test_a_pairwise_line_names_the_files_whoever_judged(tmp_path):
    """judgments.pairwise_line, the one line compare (an LLM judge) and compare --human write:
    in either order the verdict and len_a / len_b name the files, not the positions, and both
    kinds of line are what report reads."""
    from limajax.evaluation import human, report
    from limajax.evaluation.verdicts import FIRST, SECOND

    specs = [(f"p{i}", 3, 1, "") for i in range(12)]
    a, b, _ = pairwise_case(tmp_path, specs)
    items = human._items(str(a), str(b), 0, False)
    assert {it["left"] for it in items} == {"A", "B"}  # both orders occur
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"sheet": "s1", "seed": 0, "labels": [
        {"id": it["id"], "left": it["left"], "choice": "left", "a_sha": it["a_sha"],
         "b_sha": it["b_sha"]} for it in items]}))
    people = tmp_path / "human.jsonl"
    assert human.labels_to_judgments(str(labels), str(a), str(b), str(people)) == 12
    len_a, len_b = (len(lines(x)[0]["response"]) for x in (a, b))
    assert len_a != len_b
    for row, it in zip(lines(people), items, strict=True):
        assert row["verdict"] == it["left"] and row["order"] == judgments.one_order(0, it["id"])
        assert (row["len_a"], row["len_b"], row["sheet"]) == (len_a, len_b, "s1")
    fp = {"judge": "j", "template": "t", "prompt_sha": "p", "a_sha": "a", "b_sha": "b"}
    llm = [judgments.pairwise_line("q", order, fp, "x.jsonl", "y.jsonl", 5, 7, position, "raw")
           for order, position in (("AB", SECOND), ("BA", FIRST))]
    assert [r["verdict"] for r in llm] == ["B", "B"]  # B's answer won in both orders
    write_samples(tmp_path / "llm.jsonl", llm)
    groups = report.read_judgments([str(people), str(tmp_path / "llm.jsonl")])
    assert {k: sum(map(len, v.values())) for k, v in groups.items()} == {
        (str(a), str(b)): 12, ("x.jsonl", "y.jsonl"): 2}
