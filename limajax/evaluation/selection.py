"""`limajax select`: choose a training epoch by the quality of its dev-set answers, automating
what LIMA did by hand (App. B: the checkpoint among epochs 5-10 was picked by reading answers,
because perplexity does not track quality; `--perplexity` puts it beside the ranking)."""

from __future__ import annotations

import collections
import itertools
import math
from pathlib import Path

from limajax import perplexity, sampling
from limajax.errors import UserError
from limajax.evaluation import judge as judge_lib
from limajax.evaluation.compare import compare
from limajax.evaluation.judgments import OUTCOME_NAMES
from limajax.evaluation.rate import rate
from limajax.files import json_line, read_jsonl, staged_file, write_json


def parse_epochs(spec: str) -> list[int]:
    """"5-10" or "5,7,9" -> [5, 6, ...]."""
    try:
        epochs = []
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            epochs += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise UserError(f"--epochs {spec!r}: expected a range like 5-10 or a list like 5,7,9") \
            from None
    if len(set(epochs)) < 2 or min(epochs) < 1:
        raise UserError(f"--epochs {spec!r}: name at least two epochs, counted from 1")
    return sorted(set(epochs))


def dev_texts(path: str, out: Path) -> Path:
    """The dev dialogues as texts for `score` (the whole dialogue), for LIMA App. B's
    perplexity."""
    texts_path = out / "texts.jsonl"
    with staged_file(texts_path) as f:
        for row in sampling.read_prompts(path):
            f.write(json_line({"id": row["id"], "text": "\n".join(row["conversations"])}))
    return texts_path


def _perplexity(workdir: str, epoch: int, texts: Path, path: Path, mesh: str) -> float:
    """The epoch's perplexity on the dev dialogues, from an earlier run's scores if complete
    (`score_file` writes its output whole or not at all)."""
    if not path.exists():
        perplexity.score_file(workdir, str(texts), str(path), mesh, epoch=epoch)
    logprobs = [lp for _, _, row in read_jsonl(path) for lp in row["logprobs"]]
    return math.exp(-sum(logprobs) / max(len(logprobs), 1))


def select(workdir: str, epochs: list[int], prompts: str, judge: judge_lib.Judge, *,
           method: str = "pairwise", perplexity: bool = False, output_dir: str | None = None,
           settings: sampling.Settings | None = None, mesh: str = "1x1",
           template_path: str | None = None, progress: bool = True,
           fallback: str | None = None) -> dict:
    """Sample the dev prompts from every epoch, judge the epochs, write selection.json.

    An epoch without a single readable verdict is "not judged" and ranks after every judged
    one; if none is judged, nothing is chosen from no evidence: NothingJudged, unless
    `fallback` is "perplexity" (the lowest dev perplexity is chosen, and selection.json says
    so)."""
    if fallback not in (None, "perplexity"):
        raise UserError(f"--fallback {fallback!r}: expected perplexity")
    perplexity = perplexity or fallback == "perplexity"
    out = Path(output_dir) if output_dir else Path(workdir) / "selection"
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or sampling.Settings()
    samples = {}
    for e in epochs:  # resumable: `sample_file` skips the answers already written; it leaves
        # a dev row's trailing reference answer out of the prompt
        samples[e] = out / f"samples-e{e}.jsonl"
        sampling.sample_file(workdir, prompts, str(samples[e]), settings, epoch=e,
                             num_samples=5 if method == "scale" else 1, mesh_spec=mesh,
                             progress=progress)
    evidence: list[dict] = []
    if method == "pairwise":
        points, judged = collections.Counter(), collections.Counter()
        for ea, eb in itertools.combinations(epochs, 2):  # each epoch against every other
            path = out / f"judgments-e{ea}-vs-e{eb}.jsonl"
            r = compare(str(samples[ea]), str(samples[eb]), judge, str(path),
                        template_path=template_path, progress=progress)
            o = r["outcomes"]
            points[ea] += o["A"] + 0.5 * o["tie"]
            points[eb] += o["B"] + 0.5 * o["tie"]
            judged[ea] += o["A"] + o["tie"] + o["B"]
            judged[eb] += o["A"] + o["tie"] + o["B"]
            evidence.append({"a": ea, "b": eb, "judgments": str(path),
                             "counts": {name: o[k] for k, name in OUTCOME_NAMES.items()}})
        scores = {e: {"score": points[e] / judged[e] if judged[e] else None,
                      "points": points[e], "prompts_judged": judged[e]} for e in epochs}
        what = "share of its pairwise comparisons won (a tie counts half)"
    elif method == "scale":
        scores = {}
        for e in epochs:
            path = out / f"ratings-e{e}.jsonl"
            s = rate(str(samples[e]), "scale", judge, str(path), template_path=template_path,
                     progress=progress)
            scores[e] = {"score": s["mean"], "ci95": s["ci95"], "ratings": s["ratings"],
                         "unparsed": s["unparsed"]}
            evidence.append({"epoch": e, "ratings": str(path)})
        what = "mean 1-6 helpfulness rating (LIMA §5), 5 samples per prompt"
    else:
        raise UserError(f"--method {method!r}: expected pairwise or scale")
    if perplexity:
        texts_path = dev_texts(prompts, out)
        for e in epochs:
            scores[e]["perplexity"] = _perplexity(workdir, e, texts_path,
                                                  out / f"ppl-e{e}.jsonl", mesh)
    rows = [{"epoch": e, **v, "judged": v["score"] is not None} for e, v in scores.items()]
    # Judged epochs by score, best first; the epochs without evidence after them, never level
    # with a perfect score (sorted() is stable: they keep the order of --epochs).
    ranking = sorted(rows, key=lambda r: (not r["judged"], -(r["score"] or 0.0)))
    best, chosen_by = ranking[0]["epoch"], "score"
    if not ranking[0]["judged"]:
        if fallback == "perplexity":
            best = min(rows, key=lambda r: r["perplexity"])["epoch"]
            chosen_by = "perplexity (no epoch was judged)"
        else:
            best, chosen_by = None, "nothing: no epoch was judged"
    selection = {"workdir": str(workdir), "epochs": epochs, "method": method, "score": what,
                 "judge": judge.model, "best": best, "chosen_by": chosen_by, "ranking": ranking,
                 "samples": {str(e): str(p) for e, p in samples.items()},
                 "evidence": evidence, "settings": settings.to_dict()}
    write_json(out / "selection.json", selection)
    if best is None:
        raise NothingJudged(
            f"no epoch was judged: not one verdict of {judge.model} could be read (see the "
            f"raw answers in {out}/{'judgments' if method == 'pairwise' else 'ratings'}-*.jsonl)"
            f"; nothing is chosen ({out / 'selection.json'} has \"best\": null); use another "
            "judge, or pass --fallback perplexity to choose by dev perplexity")
    return {**selection, "selection_json": str(out / "selection.json")}


def format_summary(s: dict) -> str:
    """select's report: each epoch's score (or "not judged") and perplexity, then the choice."""
    lines = [f"epoch {r['epoch']}: " + (f"{r['score']:.3f}" if r["judged"] else "not judged")
             + (f", perplexity {r['perplexity']:.2f}" if "perplexity" in r else "")
             for r in s["ranking"]]
    by = s["score"] if s["chosen_by"] == "score" else s["chosen_by"]
    return "\n".join([*lines, f"best: epoch {s['best']} ({by}) -> {s['selection_json']}"])


class NothingJudged(UserError):
    """`select` found no evidence to choose an epoch by."""
