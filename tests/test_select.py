"""`limajax select` on a real two-epoch training run of the tiny recipe: each epoch samples the
dev prompts, the epochs are compared pairwise by the deterministic loopback judge (the longer
answer wins), and selection.json ranks them as those answers say; with --perplexity beside."""

import json

import pytest
import train_support as ts
from judge_server import JudgeServer

TINY = str(ts.HERE.parents[1] / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, cli):
    workdir = tmp_path_factory.mktemp("select") / "run"
    r = cli("train", "--config", TINY, "--workdir", workdir, "--tokenizer", ts.TOKENIZER,
            "--set", "epochs=2", "--set", "data.max_len=128", "--peak-flops", "1e12",
            "--no-progress")
    assert r.exit_code == 0, r.output
    return workdir


def test_select_ranks_epochs_by_their_answers(two_epochs, tmp_path, cli):
    dev = tmp_path / "dev.jsonl"  # short dialogues: few tokens to compile for
    dev.write_text("".join(json.dumps({"id": f"d{i}", "conversations": d}) + "\n"
                           for i, d in enumerate(ts.DIALOGUES[:4])))
    out = tmp_path / "sel"
    with JudgeServer() as srv:
        args = ["select", "--workdir", two_epochs, "--epochs", "1-2", "--prompts", dev,
                "--judge-url", srv.url, "--judge-model", "judge-1", "--output-dir", out,
                "--max-new-tokens", 24, "--perplexity", "--no-progress"]
        r = cli(*args)
        assert r.exit_code == 0, r.output
        asked = len(srv.log)
        assert asked == 8  # 4 prompts x 2 orders, one pair of epochs
        assert cli(*args).exit_code == 0 and len(srv.log) == asked  # a rerun asks nothing
    answers = {e: {x["id"]: x["response"] for x in map(json.loads, (
        out / f"samples-e{e}.jsonl").read_text().splitlines())} for e in (1, 2)}
    # every dev row's reference answer was left out of the prompt: the model answered it
    assert set(answers[1]) == {"d0", "d1", "d2", "d3"}
    points = {1: 0.0, 2: 0.0}
    for i in answers[1]:
        l1, l2 = len(answers[1][i]), len(answers[2][i])
        if l1 == l2:
            points[1] += 0.5
            points[2] += 0.5
        else:
            points[1 if l1 > l2 else 2] += 1
    s = json.loads((out / "selection.json").read_text())
    scores = {r["epoch"]: r["score"] for r in s["ranking"]}
    assert scores == {e: points[e] / 4 for e in (1, 2)}
    assert s["best"] == max(points, key=lambda e: (points[e], -e))
    assert all(r["perplexity"] > 1 for r in s["ranking"])
    assert s["evidence"][0]["counts"]["unparsed"] == 0


def test_select_by_ratings(two_epochs, tmp_path, cli):
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"id": f"d{i}", "conversations": d}) + "\n"
                           for i, d in enumerate(ts.DIALOGUES[:2])))
    out = tmp_path / "sel"
    with JudgeServer() as srv:
        r = cli("select", "--workdir", two_epochs, "--epochs", "1,2", "--prompts", dev,
                "--method", "scale", "--judge-url", srv.url, "--judge-model", "judge-1",
                "--output-dir", out, "--max-new-tokens", 24, "--no-progress")
        assert r.exit_code == 0, r.output
        assert len(srv.log) == 2 * 2 * 5  # epochs x prompts x LIMA §5's five samples
    s = json.loads((out / "selection.json").read_text())
    for row in s["ranking"]:  # the judge rates a reply 3 + its length // 40 (at most 5)
        answers = [json.loads(x)["response"] for x in
                   (out / f"samples-e{row['epoch']}.jsonl").read_text().splitlines()]
        assert len(answers) == 10
        assert row["score"] == sum(3 + min(2, len(a) // 40) for a in answers) / 10
    assert s["best"] == s["ranking"][0]["epoch"]


def test_select_chooses_nothing_from_no_evidence(two_epochs, tmp_path, cli):
    """Every verdict unreadable: no epoch is "best" (an unjudged epoch once ranked level with a
    perfect one); --fallback perplexity chooses by dev perplexity and says so."""
    dev = tmp_path / "dev.jsonl"  # "form:never": the judge's answers never name a verdict
    dev.write_text("".join(json.dumps({"id": f"d{i}", "conversations": [f"{d[0]} form:never",
                                                                         d[1]]}) + "\n"
                           for i, d in enumerate(ts.DIALOGUES[:2])))
    out = tmp_path / "sel"
    with JudgeServer() as srv:
        args = ["select", "--workdir", two_epochs, "--epochs", "1-2", "--prompts", dev,
                "--judge-url", srv.url, "--judge-model", "judge-1", "--output-dir", out,
                "--max-new-tokens", 8, "--no-progress"]
        r = cli(*args)
        assert r.exit_code == 2, r.output
        assert "error: no epoch was judged: not one verdict of judge-1 could be read" in r.output
        assert "pass --fallback perplexity" in r.output and "best: epoch" not in r.output
        s = json.loads((out / "selection.json").read_text())
        assert s["best"] is None and not any(row["judged"] for row in s["ranking"])
        r = cli(*args, "--fallback", "perplexity")
    assert r.exit_code == 0, r.output
    s = json.loads((out / "selection.json").read_text())
    lowest = min(s["ranking"], key=lambda row: row["perplexity"])["epoch"]
    assert s["best"] == lowest and s["chosen_by"] == "perplexity (no epoch was judged)"
    assert f"best: epoch {lowest} (perplexity (no epoch was judged))" in r.output
    assert "epoch 1: not judged, perplexity " in r.output
