"""`limajax rate`: absolute ratings of one sample file by an LLM judge, through the same client
and cache as `compare`: LIMA §4.3's Fail / Pass / Excellent, or §5's 1-6 helpfulness scale
(each prompt sampled several times, `sample --num-samples 5`; the mean with a 95% interval)."""

from __future__ import annotations

import collections
import time

import numpy as np

from limajax.evaluation import judge as judge_lib
from limajax.evaluation import stats
from limajax.evaluation.judgments import JudgmentFile, read_samples, sha256
from limajax.evaluation.verdicts import GRADES, parse_grade, parse_scale

RUBRICS = {"grade": parse_grade, "scale": parse_scale}
RATE_KEY = ("id", "sample")
RATE_FINGERPRINT = ("judge", "template", "prompt_sha", "answer_sha")


def rate(samples_path: str, rubric: str, judge: judge_lib.Judge, output: str, *,
         template_path: str | None = None, progress: bool = True, resamples: int = 2000,
         seed: int = 0) -> dict:
    """Rate every row of the sample file; returns the summary of all ratings in `output`."""
    template = judge_lib.load_template(rubric, template_path)
    judge.api_key()
    samples = read_samples(samples_path, several_per_id=True)
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
                    "time": time.time()}

        jobs.append(judge_lib.Job((ident, index), template.fill(question=s.prompt,
                                                                  answer=s.response),
                                  RUBRICS[rubric], record))
    tally = judge_lib.run(jobs, judge, template, out, progress=progress)
    keys = {(i, str(k)) for i, k in samples}
    rows = [row for key, row in out.done.items() if key in keys]
    return {"judged": tally.done, "retries": tally.retries,
            "failed": {samples_path: samples.failed},
            **summarize(rows, rubric, resamples=resamples, seed=seed)}


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
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sums), size=(resamples, len(sums)))
    out["mean"] = float(sums.sum() / counts.sum())
    out["ci95"] = stats.interval(sums[idx].sum(axis=1) / counts[idx].sum(axis=1))
    return out
