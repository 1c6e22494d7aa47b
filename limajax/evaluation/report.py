"""`limajax report`: judgment files -> a Markdown table, a chart in the manner of LIMA's
Figure 1 and SUMMARY.json (DESIGN §3: one object per comparison under "comparisons")."""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

from limajax.errors import UserError
from limajax.evaluation import stats
from limajax.evaluation.judgments import ORDERS, PAIRWISE_FIELDS, VERDICTS, judgment_rows
from limajax.files import staged_file, staged_path, write_json


def read_judgments(paths: list[str]) -> dict:
    """{(a, b): {(judge, template): [rows]}}, every line checked; `where` added to each row."""
    groups: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for where, row in judgment_rows(paths, PAIRWISE_FIELDS, lambda r: (
            r["a"], r["b"], r["judge"], r["template"], str(r["id"]), r["order"])):
        if row["verdict"] not in VERDICTS or row["order"] not in ORDERS:
            raise UserError(f"{where}: verdict {row['verdict']!r} / order {row['order']!r}; "
                            f"expected one of {', '.join(VERDICTS)} / {', '.join(ORDERS)}")
        groups[(row["a"], row["b"])][(row["judge"], row["template"])].append(
            {**row, "where": where})
    if not groups:
        raise UserError(f"{', '.join(paths)}: no judgments")
    return groups


def _check_one_judge(comparison, judges: dict) -> None:
    if len(judges) > 1:
        (j1, r1), (j2, r2) = list(judges.items())[:2]
        raise UserError(
            f"{r2[0]['where']}: {comparison[0]} vs {comparison[1]} is judged by "
            f"{j2[0]} (template {j2[1][:12]}) here but by {j1[0]} (template {j1[1][:12]}) at "
            f"{r1[0]['where']}; pass --agreement to compare the judges, or report them apart")


def _check_same_answers(rows: list[dict]) -> None:
    """Both orders of a prompt must have judged the same prompt and answers."""
    first: dict = {}
    for row in rows:
        sig = (row["prompt_sha"], row["a_sha"], row["b_sha"])
        f = first.setdefault(str(row["id"]), (sig, row["where"]))
        if f[0] != sig:
            raise UserError(f"{row['where']}: id {row['id']!r} judged other answers than at "
                            f"{f[1]}")


def build(paths: list[str], *, agreement: bool = False, resamples: int = 2000,
          seed: int = 0, names: dict[str, str] | None = None) -> dict:
    """The summary: one entry per (comparison, judge), the judges' agreement, and the name shown
    for each sample file (`names`: file name less .jsonl -> label, see parse_names)."""
    if resamples < 2000:
        raise UserError(f"--resamples {resamples}: use at least 2000 for a stable 95% interval")
    comparisons, agreements = [], []
    for (a, b), judges in read_judgments(paths).items():
        if not agreement:
            _check_one_judge((a, b), judges)
        prompts_by_judge = {}
        for (judge, template), rows in judges.items():
            _check_same_answers(rows)
            ps = stats.prompts(rows)
            prompts_by_judge[(judge, template)] = ps
            comparisons.append({"a": a, "b": b, "judge": judge, "template": template,
                                **stats.summarize(ps, resamples=resamples, seed=seed)})
        for j1, j2 in itertools.combinations(prompts_by_judge, 2):
            agreements.append({"a": a, "b": b, "judges": [j1[0], j2[0]],
                               "templates": [j1[1], j2[1]],
                               **stats.agreement(prompts_by_judge[j1], prompts_by_judge[j2])})
    return {"comparisons": comparisons, "agreement": agreements,
            "names": _names(comparisons, names or {})}


def name(path: str) -> str:
    return Path(path).name.removesuffix(".jsonl")


def parse_names(items: list[str]) -> dict[str, str]:
    """report --name FILE=LABEL (repeatable, so a label may hold commas): {FILE: LABEL}."""
    names = {}
    for item in items:
        key, _, label = item.partition("=")
        if not key.strip() or not label.strip():
            raise UserError(f"--name {item!r}: expected FILE=LABEL, e.g. "
                            "answers-lima=LIMA-65B (FILE: a sample file's name less .jsonl)")
        if key in names:
            raise UserError(f"--name {key}: given twice ({names[key]!r} and {label!r})")
        names[key] = label.strip()
    return names


def _names(comparisons: list[dict], names: dict[str, str]) -> dict[str, str]:
    """{sample file path: the name the report and the chart show}: its label if `names` has
    one, else the file's name; a label for no file of these judgments is refused."""
    paths = sorted({c[k] for c in comparisons for k in ("a", "b")})
    known = {name(p) for p in paths}
    for key in names:
        if key not in known:
            raise UserError(f"--name {key}={names[key]}: no sample file {key!r} in these "
                            f"judgments; their files are {', '.join(sorted(known))}")
    return {p: names.get(name(p), name(p)) for p in paths}


def _pct(x, ci=None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}%" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def markdown(summary: dict) -> str:
    shown = summary["names"]
    lines = ["# Pairwise evaluation", "",
             "Outcome per prompt over both orders (A if A wins both, B if B wins both, a tie "
             "otherwise; LIMA §4.1, FastChat's rule). Shares are of the prompts with a "
             "readable verdict; [95% bootstrap interval over prompts, "
             f"{summary['comparisons'][0]['resamples']:,} resamples, seed "
             f"{summary['comparisons'][0]['seed']}].", "",
             "| A | B | judge | prompts | A wins | tie | B wins | A as good or better | "
             "unparsed | orders disagree |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        p, ci, d = c["percent"], c["ci95"], c["position_disagreement"]
        rate = ("-" if d["rate"] is None else
                f"{100 * d['rate']:.1f}% of {d['prompts_with_both_orders']}")
        lines.append(f"| {shown[c['a']]} | {shown[c['b']]} | {c['judge']} | {c['n']} | "
                     f"{_pct(p['a_wins'], ci['a_wins'])} | {_pct(p['ties'], ci['ties'])} | "
                     f"{_pct(p['b_wins'], ci['b_wins'])} | "
                     f"{_pct(c['as_good_or_better']['percent'], c['as_good_or_better']['ci95'])} | "
                     f"{c['counts']['unparsed']} | {rate} |")
    lines += ["", "## Length (characters)", "",
              "| A | B | judge | mean length A | mean length B | A longer: A wins / tie / B wins "
              "| B longer: A wins / tie / B wins |", "|---|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        L = c["length"]

        def split(s):
            return ("-" if not s["n"] else
                    f"{_pct(s['a_wins'])} / {_pct(s['ties'])} / {_pct(s['b_wins'])} (n={s['n']})")

        def mean(v):
            return "-" if v is None else f"{v:,.0f}"

        lines.append(f"| {shown[c['a']]} | {shown[c['b']]} | {c['judge']} | "
                     f"{mean(L['mean_len_a'])} | {mean(L['mean_len_b'])} | "
                     f"{split(L['a_longer'])} | {split(L['b_longer'])} |")
    if summary["agreement"]:
        lines += ["", "## Agreement between judges", "",
                  "Tie-discounted accuracy (LIMA §4.1): 1 if both agree, 0.5 if exactly one says "
                  "tie, 0 otherwise, over the prompts both judged.", "",
                  "| A | B | judges | prompts | agreement |", "|---|---|---|---|---|"]
        for g in summary["agreement"]:
            acc = "-" if g["tie_discounted_accuracy"] is None else \
                f"{100 * g['tie_discounted_accuracy']:.1f}%"
            lines.append(f"| {shown[g['a']]} | {shown[g['b']]} | {' vs '.join(g['judges'])} | "
                         f"{g['n']} | {acc} |")
    return "\n".join(lines) + "\n"


FIGURE_WIDTH_IN, BAR_HEIGHT_IN, DPI = 8.0, 0.6, 100


def figure_size(bars: int) -> tuple[int, int]:
    """The chart's size in pixels for this many bars (tests check it)."""
    return int(FIGURE_WIDTH_IN * DPI), int((1.4 + BAR_HEIGHT_IN * bars) * DPI)


def chart_words(summary: dict) -> dict:
    """What the chart says besides its bars (tests check it): a title naming the judge(s) and
    how many prompts, the legend's names for the two sides (the sample files' names, or their
    --name labels, when every bar compares the same two, else A and B), and, when no verdict
    was read at all, why the bars are empty."""
    cs = summary["comparisons"]
    judges = sorted({c["judge"] for c in cs})
    counts = sorted({c["n"] for c in cs})
    prompts = f"{counts[0]} prompts" if len(counts) == 1 else \
        f"{counts[0]}-{counts[-1]} prompts per comparison"
    sides = [sorted({summary["names"][c[k]] for c in cs}) for k in ("a", "b")]
    a, b = (s[0] if len(s) == 1 else k for s, k in zip(sides, "AB", strict=True))
    if a == b:  # two files of the same name in other directories
        a, b = f"A ({a})", f"B ({b})"
    unread = [c["judge"] for c in cs if c["counts"]["unparsed"] == c["n"]]
    note = None
    if len(unread) == len(cs):
        note = f"no verdict could be read from {', '.join(sorted(set(unread)))}'s answers"
    return {"title": f"judged by {', '.join(judges)}, {prompts}", "a": a, "b": b,
            "note": note}


def plot(summary: dict, path: str) -> None:
    """A horizontal stacked bar per comparison, A wins / tie / B wins, as LIMA's Figure 1: shares
    of the prompts with a verdict, or, if some have none, of all prompts with a fourth segment
    for those (so a judge that could not be read shows as such, not as an empty bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = summary["comparisons"]
    width, height = figure_size(len(cs))
    fig, ax = plt.subplots(figsize=(width / DPI, height / DPI), dpi=DPI)
    shown = summary["names"]
    labels = [f"{shown[c['a']]} vs {shown[c['b']]}" + (f" ({c['judge']})" if len(
        {x["judge"] for x in cs}) > 1 else "") for c in cs]
    words = chart_words(summary)
    segments = [("a_wins", f"{words['a']} wins", "#4c72b0"), ("ties", "Tie", "#c7c7c7"),
                ("b_wins", f"{words['b']} wins", "#dd8452")]
    if any(c["counts"]["unparsed"] for c in cs):
        segments.append(("unparsed", "No verdict read", "#ffffff"))
    left = [0.0] * len(cs)
    for key, label, color in segments:
        values = [100 * c["counts"][key] / (c["n"] if len(segments) == 4 else
                                            c["n"] - c["counts"]["unparsed"] or 1) for c in cs]
        bars = ax.barh(labels, values, left=left, color=color, label=label, height=0.6,
                       edgecolor="#888888" if key == "unparsed" else None,
                       hatch="//" if key == "unparsed" else None)
        for bar, v in zip(bars, values, strict=True):
            if v >= 6:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2,
                        f"{v:.0f}%", ha="center", va="center", fontsize=9)
        left = [x + v for x, v in zip(left, values, strict=True)]
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_xlabel("% of prompts" + (" with a verdict" if len(segments) == 3 else "") +
                  (" (A = the first sample file)" if words["a"] == "A" else ""))
    # Right-aligned over the bars (centred, a long legend ran off the right edge: the bar
    # labels push the axes right); one row where it fits the figure, else two.
    for ncol in (len(segments), 2):
        legend = ax.legend(ncol=ncol, loc="lower right", bbox_to_anchor=(1.0, 1.0),
                           frameon=False, fontsize=9)
        if legend.get_window_extent(fig.canvas.get_renderer()).width <= 0.98 * width:
            break
        legend.remove()
    fig.suptitle(words["title"], fontsize=10)
    if words["note"]:
        ax.text(50, (len(cs) - 1) / 2, words["note"], ha="center", va="center", fontsize=9,
                bbox={"facecolor": "white", "edgecolor": "#888888"})
    fig.tight_layout()
    with staged_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)


def format_summary(summary: dict) -> str:
    """report's lines on the terminal: one per comparison."""
    lines = []
    for c in summary["comparisons"]:
        k, good = c["counts"], c["as_good_or_better"]["percent"]
        lines.append(f"{c['a']} vs {c['b']} ({c['judge']}): {c['n']} prompts, A {k['a_wins']}, "
                     f"tie {k['ties']}, B {k['b_wins']}, unparsed {k['unparsed']}; A as good or "
                     "better " + ("-" if good is None else f"{good:.1f}%"))
    return "\n".join(lines)


def report(paths: list[str], output: str, *, plot_path: str | None = None,
           json_path: str | None = None, agreement: bool = False, resamples: int = 2000,
           seed: int = 0, names: dict[str, str] | None = None) -> dict:
    summary = build(paths, agreement=agreement, resamples=resamples, seed=seed, names=names)
    with staged_file(output) as f:
        f.write(markdown(summary))
    if plot_path:
        plot(summary, plot_path)
    if json_path:
        write_json(json_path, summary)
    return summary
