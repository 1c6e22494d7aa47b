"""`limajax sample --endpoint` against a deterministic OpenAI-compatible stand-in on loopback
(tests/judge_server.py AnswerServer) and against limajax's own `serve`: every fault the issue
names, refusals as failed rows, SIGKILL and rerun, the key kept secret, bad input, and
`compare` over the result counting exactly what the stand-in was set to produce."""

import collections
import json
import os
import signal
import subprocess
import sys
import time

from judge_server import AnswerServer, JudgeServer, write_samples
from test_compare import free_port, lines, outcomes

TIMEOUT = 1.0
KEY = "sk-test-5ecret-answer-k3y"


def prompts_file(path, markers):
    """One prompt per marker string: ids p1..pN, each prompt naming its id."""
    write_samples(path, [{"id": f"p{i}", "conversations": [f"Question p{i}: say hi. {m}".strip()]}
                         for i, m in enumerate(markers, 1)])
    return path


def sample_args(url, model, prompts, out, *extra):
    return ["sample", "--endpoint", url, "--endpoint-model", model, "--prompts", prompts,
            "--output", out, "--timeout", TIMEOUT, "--no-progress", *extra]


def echo(model):
    """The model's answer names it and the prompt; U+2028 (a line break to str.splitlines,
    not to JSONL) must not split its row."""
    return lambda text: f"{model} answers:\u2028{text.split(':')[0]}"


def test_faults_refusals_and_retry_failed(tmp_path, cli):
    markers = ["", "fault:e500", "fault:e429", "fault:hang", "fault:refuse", "fault:filter",
               "", ""]
    prompts = prompts_file(tmp_path / "p.jsonl", markers)
    out = tmp_path / "a.jsonl"
    with AnswerServer({"base-1": echo("base-1"), "other": echo("other")},
                      hang_s=TIMEOUT + 0.5, retry_after="1") as srv:
        r = cli(*sample_args(srv.url, "base-1", prompts, out, "--repetition-penalty", 1.2,
                             "--max-new-tokens", 300))
        assert r.exit_code == 0, r.output
        assert "wrote 6 answers from base-1" in r.output and "2 refused now" in r.output
        rows = lines(out)
        # every prompt once, in the prompts' order
        assert [(x["id"], x["sample"]) for x in rows] == [(f"p{i}", 0) for i in range(1, 9)]
        by = {(x["id"], x["sample"]): x for x in rows}
        for (ident, _), row in by.items():
            if ident in ("p5", "p6"):
                assert "response" not in row and row["failed"], row
            else:
                assert row["response"] == f"base-1 answers:\u2028Question {ident}", row
                assert row["finish_reason"] == "stop" and row["usage"]["completion_tokens"] == 4
                assert row["conversations"] == [f"Question {ident}: say hi. "
                                                f"{markers[int(ident[1:]) - 1]}".strip()]
        assert "HTTP 400" in by["p5", 0]["failed"] and "usage policy" in by["p5", 0]["failed"]
        assert by["p6", 0]["failed"] == "finish_reason content_filter: base-1 answers:" \
                                        "\u2028Question p6"
        # the endpoint, the name it reported, the settings actually sent
        assert by["p1", 0]["endpoint"] == {"url": srv.url, "api": "/chat/completions",
                                           "model": "base-1", "reported_model": "base-1-0613"}
        assert by["p1", 0]["settings"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 300,
                                           "repetition_penalty": 1.2}
        body = srv.bodies[0]
        assert body["path"] == "/v1/chat/completions" and body["model"] == "base-1"
        assert {k: body[k] for k in ("temperature", "top_p", "max_tokens",
                                     "repetition_penalty")} == by["p1", 0]["settings"]
        assert body["messages"] == [{"role": "user", "content": "Question p1: say hi."}]
        # the retry policy: two 500s then an answer, a 429 honouring Retry-After, a hang
        log = collections.defaultdict(list)
        for e in srv.log:
            log[e.key].append(e)
        assert [e.status for e in log["p2"]][:3] == [500, 500, 200]
        assert log["p3"][0].status == 429 and log["p3"][1].time - log["p3"][0].time >= 0.95
        assert log["p4"][0].status == -1 and by["p4", 0]["retries"] == 1
        assert len(log["p5"]) == 1  # a 400 is an answer about the prompt: not retried

        # a rerun asks nothing: refused prompts wait for --retry-failed
        asked = len(srv.log)
        r = cli(*sample_args(srv.url, "base-1", prompts, out))
        assert r.exit_code == 0 and len(srv.log) == asked, r.output
        assert "8 were already there" in r.output and "2 failed rows in the file" in r.output
        # compare, rate and annotate leave the failed rows out, and say how many
        own = tmp_path / "own.jsonl"
        write_samples(own, [{"id": x["id"], "conversations": x["conversations"],
                             "response": "an answer of our own"} for x in rows])
        sheet = cli("annotate", "--a", own, "--b", out, "--output", tmp_path / "s.html")
        assert sheet.exit_code == 0, sheet.output
        assert ": 6 prompts" in sheet.output and f"left out 2 failed rows of {out}" in sheet.output
        with JudgeServer() as judge:
            rated = cli("rate", "--samples", out, "--output", tmp_path / "r.jsonl", "--judge-url",
                        judge.url, "--judge-model", "judge-1", "--no-progress")
        assert rated.exit_code == 0, rated.output
        assert f"left out 2 failed rows of {out}" in rated.output
        assert rated.stdout.strip().splitlines()[-1].startswith("6 ratings")

        # --retry-failed asks exactly the refused ones again, once each
        srv.refusing = False
        r = cli(*sample_args(srv.url, "base-1", prompts, out, "--retry-failed"))
        assert r.exit_code == 0, r.output
        assert sorted(e.key for e in srv.log[asked:]) == ["p5", "p6"]
        rows = lines(out)
        assert [(x["id"], x["sample"]) for x in rows] == [(f"p{i}", 0) for i in range(1, 9)]
        assert not any("failed" in x for x in rows)
        # one file holds one model's answers: another model's go to another --output
        r = cli(*sample_args(srv.url, "other", prompts, out))
        assert r.exit_code == 2 and "holds answers of 'base-1' at" in r.output, r.output


def test_sigkill_and_rerun_answer_every_prompt_exactly_once(tmp_path, cli, monkeypatch):
    prompts = prompts_file(tmp_path / "p.jsonl", [""] * 12)
    out = tmp_path / "a.jsonl"
    env = {**os.environ, "ANSWER_KEY": KEY}
    cmd = [sys.executable, "-c", "from limajax.cli import main; main()"]
    with AnswerServer({"base-1": echo("base-1")}, delay_s=0.05) as srv:
        args = sample_args(srv.url, "base-1", prompts, out, "--num-samples", 2, "--concurrency",
                           2, "--api-key-env", "ANSWER_KEY", "--raw")
        args = [str(a) for a in args]

        def start_and_wait_for(rows):
            proc = subprocess.Popen(cmd + args, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            deadline = time.monotonic() + 120
            while (not out.exists() or out.read_bytes().count(b"\n") < rows) and \
                    time.monotonic() < deadline:
                time.sleep(0.02)
            return proc

        # Ctrl-C: one line, exit 130, what arrived is kept
        proc = start_and_wait_for(3)
        os.kill(proc.pid, signal.SIGINT)
        interrupted = proc.communicate(timeout=60)
        assert proc.returncode == 130, interrupted
        said = interrupted[1].decode().strip().splitlines()
        assert said[-1].startswith("interrupted: the answers finished so far are in --output")
        assert b"Traceback" not in interrupted[1]
        # SIGKILL of the rerun
        proc = start_and_wait_for(out.read_bytes().count(b"\n") + 4)
        os.kill(proc.pid, signal.SIGKILL)
        killed = proc.communicate()
        time.sleep(0.2)  # what the killed process had sent reaches the server's log
        finished = [json.loads(x) for x in out.read_bytes().split(b"\n")[:-1]]  # not a torn one
        before = [(x["id"], x["sample"]) for x in finished]
        assert 7 <= len(before) < 24 and len(set(before)) == len(before)
        asked_before = collections.Counter(e.key for e in srv.log)
        with open(out, "a") as f:  # as if the kill had cut a line short while it was written
            f.write('{"id": "p12", "sample": 1, "respo')
        monkeypatch.setenv("ANSWER_KEY", KEY)
        done = cli(*args)  # the rerun, in this process (a process start is seconds of imports)
        assert done.exit_code == 0, done.output
        rows = lines(out)
        assert [(x["id"], x["sample"]) for x in rows] == [
            (f"p{i}", k) for i in range(1, 13) for k in (0, 1)]
        for row in rows:
            assert row["response"] == f"base-1 answers:\u2028Question {row['id']}"
            assert row["endpoint"]["api"] == "/completions"
        # the rerun asked only for what was missing: at most one request per row overall,
        # plus the requests Ctrl-C and the kill cut off in flight (at most --concurrency each)
        asked = collections.Counter(e.key for e in srv.log)
        assert sum(asked.values()) <= 24 + 2 * 2
        again = collections.Counter(e.key for e in srv.log[sum(asked_before.values()):])
        assert sum(again.values()) == 24 - len(before)
        assert {e.authorization for e in srv.log} == {f"Bearer {KEY}"}
        assert all(b["path"] == "/v1/completions" and b["prompt"].startswith("Question")
                   for b in srv.bodies)
    # the key went to the server, and nowhere else
    for f in tmp_path.iterdir():
        assert b"5ecret" not in f.read_bytes(), f
    assert "5ecret" not in done.output
    assert b"5ecret" not in killed[0] + killed[1] + interrupted[0] + interrupted[1]


def test_bad_input_is_one_line_before_any_prompt(tmp_path, cli, monkeypatch):
    prompts = prompts_file(tmp_path / "p.jsonl", ["", ""])
    out = tmp_path / "a.jsonl"
    monkeypatch.setenv("WRONG_KEY", KEY)
    monkeypatch.delenv("NO_SUCH_VAR_16", raising=False)

    def fails(args, message, srv=None):
        r = cli(*args)
        assert r.exit_code == 2, r.output
        assert r.output.startswith("error: ") and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert "5ecret" not in r.output
        assert not out.exists()
        if srv is not None:
            assert not srv.bodies  # no prompt was sent

    with AnswerServer({"base-1": echo("base-1")}) as srv:
        fails(sample_args(srv.url, "gpt-5", prompts, out), "serves no model 'gpt-5' (it "
              "serves: base-1)", srv)
        fails(sample_args(srv.url.removesuffix("/v1"), "base-1", prompts, out),
              "not an OpenAI-compatible API (404 for", srv)
        fails(sample_args(srv.url, "base-1", prompts, out, "--api-key-env", "NO_SUCH_VAR_16"),
              "--api-key-env NO_SUCH_VAR_16: that environment variable is not set", srv)
        dup = tmp_path / "dup.jsonl"
        dup.write_text(prompts.read_text() + prompts.read_text().splitlines()[0] + "\n")
        fails(sample_args(srv.url, "base-1", dup, out), "dup.jsonl:3: id 'p1' was already used "
              "on line 1", srv)
        fails(sample_args(srv.url, "base-1", prompts, out, "--model", tmp_path),
              "give no --model", srv)
        fails(["sample", "--endpoint", srv.url, "--prompts", prompts, "--output", out],
              "give --endpoint URL and --endpoint-model NAME together", srv)
    with AnswerServer({"base-1": echo("base-1")}, key="the-right-one") as srv:
        fails(sample_args(srv.url, "base-1", prompts, out, "--api-key-env", "WRONG_KEY"),
              "refused the API key from $WRONG_KEY (401)", srv)
        fails(sample_args(srv.url, "base-1", prompts, out), "wants an API key (401; pass "
              "--api-key-env VAR)", srv)
    with HTMLServer() as html:
        fails(sample_args(html.url, "base-1", prompts, out, "--api-key-env", "WRONG_KEY"),
              "not an OpenAI-compatible API")
    fails(sample_args(f"http://127.0.0.1:{free_port()}/v1", "base-1", prompts, out,
                      "--max-retries", 1), "cannot connect")


class HTMLServer(JudgeServer):
    """A web page where an API should be: GET /v1/models answers HTML."""

    def __init__(self):
        super().__init__()

        def html(h):
            self.send(h, 200, b"<html><body>Welcome</body></html>", "text/html")

        self.httpd.RequestHandlerClass.do_GET = html


def test_compare_counts_what_the_stand_in_produced(tmp_path, cli, stories_server):
    """limajax's own answers (its `serve` of stories260K, through `sample --endpoint`) against
    a stand-in whose answers are made shorter, as long or longer: the judge prefers the longer
    answer, so compare's counts are set by the stand-in; its refusal is left out, counted."""
    markers = ["", "", "", "", "", "fault:refuse"]
    prompts = prompts_file(tmp_path / "p.jsonl", markers)
    own, theirs, judged = tmp_path / "own.jsonl", tmp_path / "theirs.jsonl", tmp_path / "j.jsonl"
    r = cli(*sample_args(stories_server, "stories", prompts, own, "--max-new-tokens", 24,
                         "--timeout", 60))
    assert r.exit_code == 0, r.output
    answers = {x["id"]: x["response"] for x in lines(own)}
    assert len(answers) == 6 and all(answers.values())
    assert all(x["endpoint"]["reported_model"] == "stories" for x in lines(own))
    assert lines(own)[0]["usage"]["completion_tokens"] <= 24
    raw = tmp_path / "raw.jsonl"  # a base model's way: /completions, the prompt as plain text
    r = cli(*sample_args(stories_server, "stories", prompts, raw, "--max-new-tokens", 8,
                         "--timeout", 60, "--raw", "--greedy"))
    assert r.exit_code == 0, r.output
    assert [(x["endpoint"]["api"], x["settings"], x["completion_tokens"]) for x in lines(raw)] \
        == [("/completions", {"temperature": 0.0, "max_tokens": 8}, 8)] * 6
    # p1, p2 shorter (limajax wins), p3 as long (a tie), p4, p5 longer (the baseline wins)
    plan = {"p1": -1, "p2": -5, "p3": 0, "p4": 3, "p5": 40, "p6": 0}

    def baseline(text):
        ident = text.split(":")[0].split()[-1]
        return "y" * max(1, len(answers[ident]) + plan[ident])

    with AnswerServer({"baseline": baseline}) as srv:
        r = cli(*sample_args(srv.url, "baseline", prompts, theirs))
        assert r.exit_code == 0 and "1 refused now" in r.output, r.output
    with JudgeServer() as judge:
        r = cli("compare", "--a", own, "--b", theirs, "--output", judged, "--judge-url",
                judge.url, "--judge-model", "judge-1", "--no-progress")
    assert r.exit_code == 0, r.output
    assert f"left out 1 failed rows of {theirs}" in r.output
    assert "5 prompts: A 2, tie 1, B 2, unparsed 0" in r.output
    assert outcomes(lines(judged)) == {"p1": "A", "p2": "A", "p3": "tie", "p4": "B", "p5": "B"}
