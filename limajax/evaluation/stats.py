"""Counting judgments: win / tie / loss over prompts with bootstrap confidence intervals,
position disagreement, the length split and agreement between judges. Pure functions of the
judgment lines, so they are checked on judgments with known answers (LIMA's Figure 1)."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from limajax.evaluation.judgments import OUTCOME_NAMES, VERDICTS, combine

READ = VERDICTS[:3]  # the outcomes a verdict was read for


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    outcome: str  # combined over orders: "A", "tie", "B" or "unparsed"
    by_order: dict  # {"AB": verdict, "BA": verdict}
    len_a: int | None
    len_b: int | None


def prompts(rows: list[dict]) -> list[Prompt]:
    """One Prompt per id from the judgment lines of one comparison and one judge."""
    by_id: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        by_id[str(row["id"])].append(row)
    out = []
    for ident, group in by_id.items():
        by_order = {r["order"]: r["verdict"] for r in group}
        out.append(Prompt(ident, combine(by_order), by_order, group[0].get("len_a"),
                          group[0].get("len_b")))
    return out


def interval(samples: np.ndarray) -> list[float]:
    """The central 95% of bootstrap samples."""
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    return [float(lo), float(hi)]


def bootstrap_counts(counts: list[int], resamples: int, seed: int) -> np.ndarray:
    """Category counts of `resamples` bootstrap resamples of the prompts, shape (resamples, k).

    Resampling n prompts with replacement and counting each category is the same as drawing
    the counts from Multinomial(n, observed shares): the same distribution as literal
    resampling (tests check it), in O(resamples) memory however many prompts there are."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, counts / max(n, 1), size=resamples)


def summarize(ps: list[Prompt], *, resamples: int = 2000, seed: int = 0) -> dict:
    """Win / tie / loss over the prompts a verdict was read for, each share with its 95%
    bootstrap interval; "as good or better" (A wins + ties, LIMA's headline figure); unparsed;
    the position-disagreement rate; mean lengths and the win rates split by the longer side."""
    c = collections.Counter(p.outcome for p in ps)
    counts = [c[o] for o in VERDICTS]
    draws = bootstrap_counts(counts, resamples, seed).astype(np.float64)
    parsed = draws[:, :3].sum(axis=1, keepdims=True)
    shares = 100 * draws[:, :3] / np.maximum(parsed, 1)
    n_parsed = sum(counts[:3])

    def pct(k):  # None, not NaN, when no verdict was read: SUMMARY.json stays strict JSON
        return 100 * k / n_parsed if n_parsed else None

    def ci(samples):
        return interval(samples) if n_parsed else None

    both = [p for p in ps if len(p.by_order) == 2 and "unparsed" not in p.by_order.values()]
    disagree = sum(len(set(p.by_order.values())) > 1 for p in both)
    return {
        "n": len(ps),
        "counts": {OUTCOME_NAMES[o]: c[o] for o in VERDICTS},
        "percent": {OUTCOME_NAMES[o]: pct(c[o]) for o in READ},
        "ci95": {OUTCOME_NAMES[o]: ci(shares[:, i]) for i, o in enumerate(READ)},
        "as_good_or_better": {"percent": pct(c["A"] + c["tie"]),
                              "ci95": ci(shares[:, 0] + shares[:, 1])},
        "position_disagreement": {"rate": disagree / len(both) if both else None,
                                  "prompts_with_both_orders": len(both)},
        "length": length_split(ps),
        "resamples": resamples, "seed": seed,
    }


def length_split(ps: list[Prompt]) -> dict:
    """Mean answer lengths (characters) and the outcome shares among prompts where A's answer
    was longer and where B's was (AlpacaEval 2 showed judges reward length)."""
    sized = [p for p in ps if p.len_a is not None and p.len_b is not None]
    out = {"mean_len_a": float(np.mean([p.len_a for p in sized])) if sized else None,
           "mean_len_b": float(np.mean([p.len_b for p in sized])) if sized else None}
    for side, longer in (("a_longer", lambda p: p.len_a > p.len_b),
                         ("b_longer", lambda p: p.len_b > p.len_a)):
        group = [p.outcome for p in sized if longer(p) and p.outcome != "unparsed"]
        c = collections.Counter(group)
        out[side] = {"n": len(group), **{OUTCOME_NAMES[o]: 100 * c[o] / len(group) if group
                                         else None for o in READ}}
    return out


def agreement(x: list[Prompt], y: list[Prompt]) -> dict:
    """LIMA §4.1's tie-discounted accuracy between two judges on the prompts both judged:
    1 if they agree, 0.5 if exactly one says tie, 0 otherwise."""
    ys = {p.id: p.outcome for p in y}
    scores = []
    for p in x:
        q = ys.get(p.id)
        if q is None or "unparsed" in (p.outcome, q):
            continue
        scores.append(1.0 if p.outcome == q else 0.5 if "tie" in (p.outcome, q) else 0.0)
    return {"n": len(scores), "tie_discounted_accuracy": float(np.mean(scores)) if scores else None}
