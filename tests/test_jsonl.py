"""One JSONL rule (issue 17 item 2): lines end at "\\n" only. Python's str.splitlines also cuts
at "\\r", U+2028, U+2029, U+0085 and \\x1c-\\x1e, which a JSON line written with
ensure_ascii=False holds unescaped inside its strings: `sample` once crashed after all its work
reordering such a file. Here they go through sample, compare, annotate and report."""

import json

from judge_server import JudgeServer, write_samples

# Each of these cuts a line for str.splitlines but not for the files' rule.
BREAKERS = "\u2028", "\u2029", "\u0085", "\r", "\x1c", "\x1e"


def odd(i):
    return f"line one{BREAKERS[i % len(BREAKERS)]}line two{BREAKERS[(i + 1) % len(BREAKERS)]}"


def test_sample_keeps_line_separators_inside_a_line(stories, tmp_path, cli):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"u{i}", "conversations": [f"Once upon a time {odd(i)}"]} for i in range(3)]
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    r = cli("sample", "--model", stories / "model", "--prompts", prompts, "--output", out,
            "--max-new-tokens", 4, "--batch-size", 2, "--no-progress")
    assert r.exit_code == 0, r.output
    written = [json.loads(x) for x in out.read_bytes().decode().split("\n") if x]
    assert [w["conversations"] for w in written] == [r["conversations"] for r in rows]
    assert "\u2028" in out.read_text()  # written unescaped, as ensure_ascii=False does


def test_compare_annotate_and_report_keep_them(tmp_path, cli):
    prompts = [f"Question p{i}: {odd(i)}" for i in range(4)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_samples(a, [{"id": f"p{i}", "conversations": [p], "response": f"from-a {odd(i + 1)}, "
                       f"quality {3 - i % 2}"} for i, p in enumerate(prompts)])
    write_samples(b, [{"id": f"p{i}", "conversations": [p], "response": f"from-b {odd(i + 2)}, "
                       f"quality 2"} for i, p in enumerate(prompts)])
    for path in (a, b):  # as `limajax sample` writes them: unescaped
        path.write_text("".join(json.dumps(json.loads(x), ensure_ascii=False) + "\n"
                                for x in path.read_text().split("\n") if x))
    out = tmp_path / "j.jsonl"
    with JudgeServer() as srv:
        r = cli("compare", "--a", a, "--b", b, "--output", out, "--judge-url", srv.url,
                "--judge-model", "judge-1", "--no-progress")
        assert r.exit_code == 0, r.output
        assert "4 prompts: A 2, tie 2, B 0, unparsed 0" in r.output
        r = cli("compare", "--a", a, "--b", b, "--output", out, "--judge-url", srv.url,
                "--judge-model", "judge-1", "--no-progress")  # the rerun reads them back
        assert r.exit_code == 0 and "0 judged now, 8 already" in r.output, r.output
    sheet = tmp_path / "sheet.html"
    r = cli("annotate", "--a", a, "--b", b, "--output", sheet)
    assert r.exit_code == 0 and "4 prompts" in r.output, r.output
    assert odd(0) in sheet.read_text(encoding="utf-8")  # U+2028, U+2029: kept as they are
    r = cli("report", "--judgments", out, "--output", tmp_path / "r.md", "--json",
            tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    c = json.loads((tmp_path / "s.json").read_text())["comparisons"][0]
    assert c["n"] == 4 and c["counts"] == {"a_wins": 2, "ties": 2, "b_wins": 0, "unparsed": 0}
