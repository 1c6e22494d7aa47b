"""`limajax rate`: absolute ratings of one sample file by an LLM judge, through the same client
and cache as `compare`: LIMA §4.3's Fail / Pass / Excellent, or §5's 1-6 helpfulness scale
(each prompt sampled several times, `sample --num-samples 5`; the mean with a 95% interval);
and LIMA §6's multi-turn study: every assistant turn of recorded conversations graded
(`--per-turn`, rows from `chat --record`)."""

from __future__ import annotations

import collections
import time

import numpy as np

from limajax.errors import UserError
from limajax.evaluation import judge as judge_lib
from limajax.evaluation import stats
from limajax.evaluation.judgments import JudgmentFile, Sample, Samples, read_samples, sha256
from limajax.evaluation.verdicts import GRADES, parse_grade, parse_scale
from limajax.files import read_jsonl
from limajax.formats import check_conversations

RUBRICS = {"grade": parse_grade, "scale": parse_scale}
RATE_KEY = ("id", "sample")
RATE_FINGERPRINT = ("judge", "template", "prompt_sha", "answer_sha")


def turn_samples(path: str) -> Samples:
    """LIMA §6: every assistant turn of each conversation (GAIR rows {"id", "conversations"},
    as `chat --record` writes them) as a Sample keyed (id, turn number from 1): the dialogue up
    to that turn's question, and the answer given to it."""
    out = Samples()
    for where, line, row in read_jsonl(path):
        if not isinstance(row, dict) or "conversations" not in row:
            raise UserError(f'{where}: expected a conversation {{"id", "conversations"}} as '
                            "`chat --record` writes it")
        turns = check_conversations(row["conversations"], where)
        if len(turns) % 2:
            raise UserError(f"{where}: the conversation ends with an unanswered user turn "
                            f"({len(turns)} turns); --per-turn grades answers")
        ident = str(row.get("id", line))
        if (ident, 1) in out:
            raise UserError(f"{where}: id {ident!r} repeats {out[ident, 1].where}")
        for k in range(1, len(turns) // 2 + 1):
            out[ident, k] = Sample(ident, k, tuple(turns[:2 * k - 1]), turns[2 * k - 1], where)
    return out


def rate(samples_path: str, rubric: str, judge: judge_lib.Judge, output: str, *,
         template_path: str | None = None, progress: bool = True, resamples: int = 2000,
         seed: int = 0, per_turn: bool = False) -> dict:
    """Rate every row of the sample file (with `per_turn`, every assistant turn of every
    conversation, "sample" then being the turn number); returns the summary of all ratings in
    `output`."""
    if per_turn and rubric != "grade":
        raise UserError("--per-turn grades Fail / Pass / Excellent (LIMA §6): use --rubric grade")
    template = judge_lib.load_template(rubric, template_path)
    judge.api_key()
    samples = turn_samples(samples_path) if per_turn else read_samples(samples_path,
                                                                      several_per_id=True)
    out = JudgmentFile(output, RATE_KEY, RATE_FINGERPRINT)
    jobs = []
    for (ident, index), s in samples.items():
        fingerprint = {"judge": judge.model, "template": template.sha,
                       "prompt_sha": sha256(s.prompt), "answer_sha": sha256(s.response)}
        if out.check((ident, str(index)), fingerprint):
            continue

        def record(rating, raw, reasks, retries, ident=ident, index=index, fp=fingerprint):
            return {"id": ident, "sample": index, "rubric": rubric, "rating": rating, "raw": raw,
                    "reasks": reasks, **fp, "file": samples_path, "retries": retries,
                    "time": time.time(), **({"turn": index} if per_turn else {})}

        jobs.append(judge_lib.Job((ident, index), template.fill(question=s.prompt,
                                                                  answer=s.response),
                                  RUBRICS[rubric], record))
    tally = judge_lib.run(jobs, judge, template, out, progress=progress)
    keys = {(i, str(k)) for i, k in samples}
    rows = [row for key, row in out.done.items() if key in keys]
    out = {"judged": tally.done, "retries": tally.retries,
           "failed": {samples_path: samples.failed},
           **summarize(rows, rubric, resamples=resamples, seed=seed)}
    if per_turn:
        out["per_turn"] = by_turn(rows, resamples=resamples, seed=seed)
    return out


def format_summary(s: dict, output: str) -> str:
    """rate's report: the figures (no share or mean where no rating was read), then LIMA §6's
    lines per turn with --per-turn."""
    if s["rubric"] == "grade":
        figures = ("no grade read" if s["unparsed"] == s["ratings"] else ", ".join(
            f"{g} {n} ({s['percent'][g]:.0f}%)" for g, n in s["counts"].items()))
    else:
        figures = ("no rating" if s["mean"] is None else
                   f"mean {s['mean']:.2f} [95% {s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] over "
                   f"{s['prompts']} prompts")
    lines = [f"{s['ratings']} ratings: {figures}, unparsed {s['unparsed']} ({s['judged']} rated "
             f"now) -> {output}"]
    for t in s.get("per_turn", []):
        through = t["through"]
        stay = ("-" if through["percent"] is None else
                f"{through['pass_or_better']}/{through['conversations']} "
                f"({through['percent']:.0f}%, 95% {through['ci95'][0]:.0f}-"
                f"{through['ci95'][1]:.0f}%)")
        shares = ", ".join(f"{g} {n}" for g, n in t["counts"].items())
        lines.append(f"turn {t['turn']}: {shares}; Pass or better through turn {t['turn']}: "
                     f"{stay}")
    return "\n".join(lines)


def by_turn(rows: list[dict], *, resamples: int = 2000, seed: int = 0) -> list[dict]:
    """LIMA §6's figures for turn k = 1, 2, ...: the share of each grade among the k-th answers
    (bootstrap intervals over those answers), and how many conversations of at least k turns
    stay at Pass or better through turn k (with an interval resampling conversations; one with
    a grade not read by turn k is left out there, counted as unparsed)."""
    grades: dict[str, dict[int, str]] = collections.defaultdict(dict)
    for r in rows:
        grades[str(r["id"])][int(r["sample"])] = r["rating"]
    out = []
    for k in range(1, max((max(g) for g in grades.values()), default=0) + 1):
        reached = [[g[t] for t in range(1, k + 1)] for g in grades.values()
                   if all(t in g for t in range(1, k + 1))]
        read = [g for g in reached if "unparsed" not in g]
        stay = sum(all(x in ("Pass", "Excellent") for x in g) for g in read)
        draws = stats.bootstrap_counts([stay, len(read) - stay], resamples, seed)
        shares = 100 * draws[:, 0] / max(len(read), 1)
        at_k = summarize([{"rating": g[k]} for g in grades.values() if k in g], "grade",
                         resamples=resamples, seed=seed)
        out.append({"turn": k, **{key: at_k[key] for key in ("ratings", "unparsed", "counts",
                                                            "percent", "ci95")},
                    "through": {"conversations": len(read), "pass_or_better": stay,
                                "percent": 100 * stay / len(read) if read else None,
                                "ci95": stats.interval(shares) if read else None,
                                "unparsed": len(reached) - len(read)}})
    return out


def summarize(rows: list[dict], rubric: str, *, resamples: int = 2000, seed: int = 0) -> dict:
    """Grades: the share of each with a bootstrap interval over ratings. Scale: the mean rating
    with a 95% bootstrap interval resampling prompts (a prompt's samples stay together)."""
    unparsed = sum(r["rating"] == "unparsed" for r in rows)
    rated = [r for r in rows if r["rating"] != "unparsed"]
    out = {"rubric": rubric, "ratings": len(rows), "unparsed": unparsed}
    if rubric == "grade":
        c = collections.Counter(r["rating"] for r in rated)
        draws = stats.bootstrap_counts([c[g] for g in GRADES], resamples, seed)
        shares = 100 * draws / max(len(rated), 1)
        out["counts"] = {g: c[g] for g in GRADES}
        out["percent"] = {g: 100 * c[g] / len(rated) if rated else None for g in GRADES}
        # No rating read: no share, and no interval around it (as for the scale's mean).
        out["ci95"] = {g: stats.interval(shares[:, k]) if rated else None
                       for k, g in enumerate(GRADES)}
        return out
    by_prompt = collections.defaultdict(list)
    for r in rated:
        by_prompt[str(r["id"])].append(r["rating"])
    sums = np.array([sum(v) for v in by_prompt.values()], dtype=np.float64)
    counts = np.array([len(v) for v in by_prompt.values()], dtype=np.float64)
    out["prompts"] = len(by_prompt)
    if not len(sums):
        out["mean"], out["ci95"] = None, None
        return out
    # Apart from stats.bootstrap_counts: a mean over prompts is no category count to draw.
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(resamples, len(sums)))
    out["mean"] = float(sums.sum() / counts.sum())
    out["ci95"] = stats.interval(sums[idx].sum(axis=1) / counts[idx].sum(axis=1))
    return out
