"""Benchmark `limajax compare` and `report` (issue 10): judgments per second against a loopback
judge that answers after a fixed delay, at several concurrencies, the client's overhead per
judgment, and `report`'s time on 100,000 judgments.

    python tools/bench_compare.py [--delay 0.2] [--judgments 100000] [--figure1 PNG]

The judge is tests/judge_server.py's deterministic server (stdlib, one thread per request).
At concurrency c and delay d the ideal rate is c/d; what is missing is the client's (and this
server's) cost. Overhead per judgment is measured alone with delay 0 and concurrency 1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from judge_server import JudgeServer, pairwise_case  # noqa: E402

from limajax.evaluation.compare import compare  # noqa: E402
from limajax.evaluation.judge import Judge  # noqa: E402
from limajax.evaluation.report import report  # noqa: E402


def judge_rate(tmp: pathlib.Path, delay: float, concurrency: int, prompts: int) -> dict:
    specs = [(f"p{i}", 1 + i % 3, 1 + (i * 7) % 3, "") for i in range(prompts)]
    run_dir = tmp / f"c{concurrency}-d{delay}"
    run_dir.mkdir()
    a, b, _ = pairwise_case(run_dir, specs)
    with JudgeServer(delay_s=delay) as srv:
        judge = Judge(srv.url, "bench", concurrency=concurrency)
        start = time.perf_counter()
        r = compare(a, b, judge, str(run_dir / "j.jsonl"), progress=False)
        seconds = time.perf_counter() - start
    n = r["judged"]
    ideal = concurrency / delay if delay else float("inf")
    return {"concurrency": concurrency, "delay_s": delay, "judgments": n, "seconds": seconds,
            "per_second": n / seconds, "ideal_per_second": ideal,
            "overhead_ms": 1000 * (seconds * concurrency / n - delay)}


def report_time(tmp: pathlib.Path, judgments: int) -> dict:
    rows = []
    verdicts = ("A", "B", "tie", "A", "B")
    for i in range(judgments // 2):
        for k, order in enumerate(("AB", "BA")):
            rows.append({"id": f"p{i}", "order": order, "verdict": verdicts[(i + k) % 5],
                         "raw": "Answer A is significantly better.", "judge": "gpt-4",
                         "template": "t" * 64, "prompt_sha": "p" * 64, "a_sha": "a" * 64,
                         "b_sha": "b" * 64, "a": "lima.jsonl", "b": "base.jsonl",
                         "len_a": 100 + i % 50, "len_b": 120 - i % 40})
    path = tmp / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = time.perf_counter()
    report([str(path)], str(tmp / "r.md"), plot_path=str(tmp / "f.png"),
           json_path=str(tmp / "s.json"))
    return {"judgments": judgments, "seconds": time.perf_counter() - start,
            "mb": path.stat().st_size / 1e6}


# LIMA Figure 1 (human preference, 300 prompts): LIMA's wins / ties / losses per baseline, in %
LIMA_FIGURE1 = {"alpaca65b": (53, 21, 26), "davinci003": (44, 21, 35), "bard": (33, 25, 42),
                "claude": (24, 22, 54), "gpt4": (18, 25, 57)}


def lima_figure1(tmp: pathlib.Path, path: str) -> None:
    """The README's chart: LIMA's own counts drawn by `report` (both orders agreeing)."""
    rows = []
    for baseline, shares in LIMA_FIGURE1.items():
        i = 0
        for verdict, share in zip(("A", "tie", "B"), shares, strict=True):
            for _ in range(share * 3):
                rows += [{"id": i, "order": o, "verdict": verdict, "raw": verdict,
                          "judge": "people", "template": "lima", "prompt_sha": str(i),
                          "a_sha": str(i), "b_sha": str(i), "a": "lima.jsonl",
                          "b": f"{baseline}.jsonl"} for o in ("AB", "BA")]
                i += 1
    judgments = tmp / "figure1.jsonl"
    judgments.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report([str(judgments)], str(tmp / "figure1.md"), plot_path=path)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay", type=float, default=0.2)
    p.add_argument("--judgments", type=int, default=100_000)
    p.add_argument("--figure1", default=None, help="Also draw LIMA's Figure 1 to this PNG.")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        if args.figure1:
            lima_figure1(tmp, args.figure1)
        alone = judge_rate(tmp, 0.0, 1, 100)
        print(f"overhead alone (delay 0, concurrency 1, {alone['judgments']} judgments): "
              f"{1000 * alone['seconds'] / alone['judgments']:.1f} ms per judgment")
        print(f"\ndelay {args.delay * 1000:.0f} ms:")
        print("| concurrency | judgments | seconds | judgments/s | ideal/s | overhead ms |")
        print("|---|---|---|---|---|---|")
        for c in (1, 8, 32):
            r = judge_rate(tmp, args.delay, c, prompts=max(10, 5 * c))
            print(f"| {c} | {r['judgments']} | {r['seconds']:.2f} | {r['per_second']:.1f} | "
                  f"{r['ideal_per_second']:.0f} | {r['overhead_ms']:.1f} |")
        r = report_time(tmp, args.judgments)
        print(f"\nreport on {r['judgments']:,} judgments ({r['mb']:.0f} MB): "
              f"{r['seconds']:.2f} s (Markdown, chart and SUMMARY.json)")


if __name__ == "__main__":
    main()
