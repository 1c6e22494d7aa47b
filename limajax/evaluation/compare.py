"""`limajax compare`: LIMA §4.1's pairwise question for every prompt two sample files share, asked
of an LLM judge in both orders, each judgment appended to a judgment file as it arrives."""

from __future__ import annotations

import collections
import functools

from limajax.evaluation import judge as judge_lib
from limajax.evaluation.judgments import (
    ORDERS,
    PAIR_FINGERPRINT,
    PAIR_KEY,
    JudgmentFile,
    combine,
    one_order,
    pair_samples,
    pairwise_line,
    sha256,
)
from limajax.evaluation.verdicts import parse_pairwise


class Running:
    """Outcomes of the prompts whose orders are all judged ({"A": n, "tie": n, "B": n,
    "unparsed": n}), kept up to date as judgments arrive."""

    def __init__(self, orders: int, rows):
        self.orders = orders
        self.by_id: dict[str, dict] = collections.defaultdict(dict)
        self.counts: collections.Counter = collections.Counter()
        for row in rows:
            self.add(row)

    def add(self, row: dict) -> str:
        verdicts = self.by_id[row["id"]]
        verdicts[row["order"]] = row["verdict"]
        if len(verdicts) == self.orders:
            self.counts[combine(verdicts)] += 1
        c = self.counts
        return f"A {c['A']} / tie {c['tie']} / B {c['B']}"


def compare(a_path: str, b_path: str, judge: judge_lib.Judge, output: str, *,
            orders: str = "both", template_path: str | None = None,
            progress: bool = True, common: bool = False, seed: int = 0) -> dict:
    """Judge every shared prompt of A and B (ids in one file only: see pair_samples); returns
    the outcome counts and the run's figures (format_summary's)."""
    template = judge_lib.load_template("pairwise", template_path)
    judge.api_key()  # a missing key variable is a mistake to report before anything else
    pairs = pair_samples(a_path, b_path, common=common)
    out = JudgmentFile(output, PAIR_KEY, PAIR_FINGERPRINT)
    jobs, cached = [], []
    for sa, sb in pairs:
        fingerprint = {"judge": judge.model, "template": template.sha,
                       "prompt_sha": sha256(sa.prompt), "a_sha": sha256(sa.response),
                       "b_sha": sha256(sb.response)}
        for order in ORDERS if orders == "both" else (one_order(seed, sa.id),):
            if out.check((sa.id, order), fingerprint):
                cached.append(out.done[(sa.id, order)])
                continue
            first, second = (sa, sb) if order == "AB" else (sb, sa)
            jobs.append(judge_lib.Job(
                key=(sa.id, order),
                prompt=template.fill(question=sa.prompt, answer_a=first.response,
                                     answer_b=second.response),
                parse=parse_pairwise,
                record=functools.partial(pairwise_line, sa.id, order, fingerprint, a_path,
                                         b_path, len(sa.response), len(sb.response))))

    running = Running(len(ORDERS) if orders == "both" else 1, cached)
    result = judge_lib.run(jobs, judge, template, out, progress=progress, on_row=running.add)
    return {"prompts": len(pairs), "judged": result.done, "cached": len(cached),
            "retries": result.retries, "outcomes": running.counts}


def format_summary(r: dict, output: str) -> str:
    o = r["outcomes"]
    return (f"{r['prompts']} prompts: A {o['A']}, tie {o['tie']}, B {o['B']}, unparsed "
            f"{o['unparsed']} ({r['judged']} judged now, {r['cached']} already in {output}, "
            f"{r['retries']} retries) -> {output}")

