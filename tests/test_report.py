"""`limajax report` on judgments with known answers: LIMA's Figure-1 counts for 300 prompts,
position disagreement, the length split, two judges' agreement, the chart and SUMMARY.json."""

import json
import math
import struct

import numpy as np

from limajax.evaluation import stats
from limajax.evaluation.report import figure_size


def judgment(ident, order, verdict, *, a="lima.jsonl", b="gpt4.jsonl", judge="gpt-4",
             template="t1", len_a=100, len_b=100):
    return {"id": ident, "order": order, "verdict": verdict, "raw": verdict, "judge": judge,
            "template": template, "prompt_sha": f"p{ident}", "a_sha": f"a{ident}",
            "b_sha": f"b{ident}", "a": a, "b": b, "len_a": len_a, "len_b": len_b}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def figure1(counts, disagreeing_ties=0, unparsed=0, **kw):
    """Judgments giving `counts` = (A wins, ties, B wins) prompts over both orders; the first
    `disagreeing_ties` ties come from orders that disagree (A then B), the rest from two ties."""
    rows, i = [], 0
    for outcome, n in zip(("A", "tie", "B"), counts, strict=True):
        for k in range(n):
            pair = ("A", "B") if outcome == "tie" and k < disagreeing_ties else (outcome, outcome)
            rows += [judgment(i, "AB", pair[0], **kw), judgment(i, "BA", pair[1], **kw)]
            i += 1
    for _ in range(unparsed):
        rows += [judgment(i, "AB", "A", **kw), judgment(i, "BA", "unparsed", **kw)]
        i += 1
    return rows


def png_size(path):
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_lima_figure1_counts(tmp_path, cli):
    # LIMA Figure 1 (human preference, 300 prompts): LIMA vs GPT-4 18 / 25 / 57 %, and vs
    # DaVinci003 44 / 21 / 35 %: "as good or better" 43% and 65%, as LIMA's abstract says.
    gpt4 = figure1((54, 75, 171), disagreeing_ties=30, unparsed=4)
    davinci = figure1((132, 63, 105), b="davinci003.jsonl")
    j = write(tmp_path / "j.jsonl", gpt4 + davinci)
    r = cli("report", "--judgments", j, "--output", tmp_path / "r.md", "--plot",
            tmp_path / "fig.png", "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    c1, c2 = s["comparisons"]
    assert (c1["a"], c1["b"], c1["n"]) == ("lima.jsonl", "gpt4.jsonl", 304)
    assert c1["counts"] == {"a_wins": 54, "ties": 75, "b_wins": 171, "unparsed": 4}
    assert c2["counts"] == {"a_wins": 132, "ties": 63, "b_wins": 105, "unparsed": 0}
    for c, pct, good in ((c1, (18, 25, 57), 43), (c2, (44, 21, 35), 65)):
        assert [round(c["percent"][k], 9) for k in ("a_wins", "ties", "b_wins")] == list(pct)
        assert round(c["as_good_or_better"]["percent"], 9) == good
        # the bootstrap interval of a share over 300 prompts is close to the normal one
        for key, p in zip(("a_wins", "ties", "b_wins"), pct, strict=True):
            half = 196 * math.sqrt(p / 100 * (1 - p / 100) / 300)
            lo, hi = c["ci95"][key]
            assert abs(lo - (p - half)) < 0.8 and abs(hi - (p + half)) < 0.8, (key, lo, hi)
    # 30 of the 300 prompts with both orders read had orders that disagree
    assert c1["position_disagreement"] == {"rate": 0.1, "prompts_with_both_orders": 300}
    assert c2["position_disagreement"]["rate"] == 0.0
    assert png_size(tmp_path / "fig.png") == figure_size(2)
    md = (tmp_path / "r.md").read_text()
    assert "| lima | gpt4 | gpt-4 | 304 | 18.0% [" in md and "| 4 | 10.0% of 300 |" in md
    # the same seed gives the same intervals; the report is reproducible
    cli("report", "--judgments", j, "--output", tmp_path / "r2.md")
    assert (tmp_path / "r2.md").read_text() == md


def test_bootstrap_is_resampling_prompts():
    """Multinomial draws of the category counts have the distribution of literal resampling."""
    codes = np.array([0] * 12 + [1] * 5 + [2] * 20 + [3] * 3)
    rng = np.random.default_rng(1)
    literal = np.stack([np.bincount(codes[rng.integers(0, 40, 40)], minlength=4)
                        for _ in range(4000)])
    drawn = stats.bootstrap_counts(np.bincount(codes, minlength=4).tolist(), 4000, seed=2)
    for k in range(4):
        assert abs(literal[:, k].mean() - drawn[:, k].mean()) < 0.15
        assert np.allclose(np.percentile(literal[:, k], [2.5, 97.5]),
                           np.percentile(drawn[:, k], [2.5, 97.5]), atol=1)


def test_length_split_and_agreement(tmp_path, cli):
    # A's answer is longer on ids 0-9 (A wins 6, tie 2, B wins 2), B's on ids 10-19 (B wins all)
    rows = []
    for i in range(20):
        v = "B" if i >= 10 else ("A" if i < 6 else "tie" if i < 8 else "B")
        la, lb = (300, 100) if i < 10 else (100, 500)
        rows += [judgment(i, o, v, len_a=la, len_b=lb) for o in ("AB", "BA")]
    # a second judge (human, one order each) agrees on 14, says tie where the first did not
    # on 4 (0.5 each) and the opposite on 2: (14 + 2) / 20 = 0.8
    human = []
    for i in range(20):
        v = next(r["verdict"] for r in rows if r["id"] == i)
        if i in (0, 1, 10, 11):
            v = "tie"
        elif i in (12, 13):
            v = "A"
        human.append(judgment(i, "AB", v, judge="human", template="sheet"))
    j1, j2 = write(tmp_path / "gpt.jsonl", rows), write(tmp_path / "human.jsonl", human)
    r = cli("report", "--judgments", j1, "--judgments", j2, "--output", tmp_path / "r.md")
    assert r.exit_code == 2 and "pass --agreement" in r.output, r.output
    assert "human.jsonl:1: " in r.output
    r = cli("report", "--judgments", j1, "--judgments", j2, "--output", tmp_path / "r.md",
            "--json", tmp_path / "s.json", "--agreement", "--plot", tmp_path / "f.png")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert len(s["comparisons"]) == 2
    L = s["comparisons"][0]["length"]
    assert (L["mean_len_a"], L["mean_len_b"]) == (200, 300)
    assert L["a_longer"] == {"n": 10, "a_wins": 60, "ties": 20, "b_wins": 20}
    assert L["b_longer"] == {"n": 10, "a_wins": 0, "ties": 0, "b_wins": 100}
    (g,) = s["agreement"]
    assert g["judges"] == ["gpt-4", "human"] and g["n"] == 20
    assert g["tie_discounted_accuracy"] == 0.8
    assert png_size(tmp_path / "f.png") == figure_size(2)


def test_report_bad_input(tmp_path, cli):
    good = figure1((3, 1, 2))
    other_template = figure1((3, 1, 2), template="t2")
    j1 = write(tmp_path / "j1.jsonl", good)
    j2 = write(tmp_path / "j2.jsonl", other_template)
    r = cli("report", "--judgments", j1, "--judgments", j2, "--output", tmp_path / "r.md")
    assert r.exit_code == 2 and "template t2" in r.output, r.output
    r = cli("report", "--judgments", j1, "--judgments", j1, "--output", tmp_path / "r.md")
    assert r.exit_code == 2 and "j1.jsonl:1: repeats the judgment of" in r.output, r.output
    bad = write(tmp_path / "bad.jsonl", [{**good[0], "verdict": "maybe"}])
    r = cli("report", "--judgments", bad, "--output", tmp_path / "r.md")
    assert r.exit_code == 2 and "bad.jsonl:1: verdict 'maybe'" in r.output, r.output
    r = cli("report", "--judgments", j1, "--output", tmp_path / "r.md", "--resamples", "100")
    assert r.exit_code == 2 and "x>=2000" in r.output, r.output
    assert not (tmp_path / "r.md").exists()


def test_a_judge_never_read(tmp_path, cli):
    """Every verdict unparsed (a tiny judge): no shares, strict JSON, a chart that says so."""
    rows = [judgment(i, o, "unparsed") for i in range(5) for o in ("AB", "BA")]
    j = write(tmp_path / "j.jsonl", rows)
    r = cli("report", "--judgments", j, "--output", tmp_path / "r.md", "--json",
            tmp_path / "s.json", "--plot", tmp_path / "f.png")
    assert r.exit_code == 0, r.output
    assert "unparsed 5; A as good or better -" in r.output
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text
    (c,) = json.loads(text)["comparisons"]
    assert c["counts"]["unparsed"] == 5 and c["percent"]["a_wins"] is None
    assert c["ci95"]["a_wins"] is None
    assert png_size(tmp_path / "f.png") == figure_size(1)


def test_the_chart_names_the_judge_the_prompts_and_the_models(tmp_path):
    """issue 17 item 9 / issue 16 item 5: a title with the judge and n, the legend naming the
    sample files ("lima wins", not "A wins"), and a chart with nothing read saying why."""
    from limajax.evaluation.report import build, chart_words

    read = write(tmp_path / "j.jsonl", [judgment(i, o, v) for i, v in
                                        enumerate(["A", "B", "tie"]) for o in ("AB", "BA")])
    words = chart_words(build([str(read)]))
    assert words == {"title": "judged by gpt-4, 3 prompts", "a": "lima", "b": "gpt4",
                     "note": None}
    unread = write(tmp_path / "u.jsonl", [judgment(i, o, "unparsed", judge="tiny")
                                          for i in range(4) for o in ("AB", "BA")])
    words = chart_words(build([str(unread)]))
    assert words["note"] == "no verdict could be read from tiny's answers"
    assert words["title"] == "judged by tiny, 4 prompts"


def test_names_label_the_models_in_the_chart_and_the_report(tmp_path, cli):
    """report --name FILE=LABEL: the legend, the bars and the tables show LABEL for the sample
    file FILE (a label may hold a comma); a FILE in no comparison is one line, exit 2."""
    from limajax.evaluation.report import build, chart_words

    j = write(tmp_path / "j.jsonl", figure1((3, 2, 1)))
    words = chart_words(build([j], names={"lima": "LIMA-65B", "gpt4": "GPT-4, March 2023"}))
    assert (words["a"], words["b"]) == ("LIMA-65B", "GPT-4, March 2023")
    words = chart_words(build([j], names={"gpt4": "GPT-4"}))  # the other keeps its file's
    assert (words["a"], words["b"]) == ("lima", "GPT-4")
    r = cli("report", "--judgments", j, "--output", tmp_path / "r.md", "--plot",
            tmp_path / "f.png", "--json", tmp_path / "s.json", "--name", "lima=LIMA-65B",
            "--name", "gpt4=GPT-4, March 2023")
    assert r.exit_code == 0, r.output
    assert "| LIMA-65B | GPT-4, March 2023 | gpt-4 | 6 |" in (tmp_path / "r.md").read_text()
    assert json.loads((tmp_path / "s.json").read_text())["names"] == {
        "gpt4.jsonl": "GPT-4, March 2023", "lima.jsonl": "LIMA-65B"}
    assert png_size(tmp_path / "f.png") == figure_size(1)
    for bad, said in (("llama=LLaMA", "--name llama=LLaMA: no sample file 'llama' in these "
                       "judgments; their files are gpt4, lima"),
                      ("lima", "--name 'lima': expected FILE=LABEL"),
                      ("lima=", "--name 'lima=': expected FILE=LABEL")):
        out = tmp_path / "bad.md"
        r = cli("report", "--judgments", j, "--output", out, "--name", bad)
        assert r.exit_code == 2 and said in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not out.exists()
