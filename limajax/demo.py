"""`limajax demo`: the whole pipeline, for real, on a laptop CPU.

A tiny LLaMA (stories260K's shape) with a tokenizer trained on the embedded sample dialogues is
written as a Hugging Face checkpoint, converted (adding LIMA's EOT), exported back to Hugging
Face format, fine-tuned with the LIMA recipe on a simulated 2x4 mesh, and scored before and
after on the held-out sample prompts; then the base and the fine-tuned model answer those
prompts, a judge compares the answers in both orders (LIMA §4), and a report, a chart and an
annotation sheet are written. Every step is the library function behind a CLI command.
Nothing here needs torch (Meta's .pth layout does: the `meta` extra), so the demo runs on a
plain `pip install limajax`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import sentencepiece as spm
from flax import nnx

from limajax import convert, data, perplexity, sampling, sharding, train
from limajax.checkpoint import load_for_inference, save_epoch_model_dir
from limajax.config import load_recipe
from limajax.evaluation.compare import compare
from limajax.evaluation.human import annotate
from limajax.evaluation.judge import Judge
from limajax.evaluation.report import report
from limajax.files import check_replaceable, mark_output, staged_dir
from limajax.model import Llama
from limajax.sampling import Engine
from limajax.serving import running
from limajax.tokenizer import TokenSpec

# The tiny recipe ships in the package, so the demo runs from an installed limajax; a checkout's
# configs/tiny.py is a link to it.
RECIPE = data.SAMPLE_DATA / "tiny.py"


def recipe():
    """The demo's training recipe (configs/tiny.py)."""
    return load_recipe(str(RECIPE))


def banner(message: str) -> None:
    print(f"\n== {message}", file=sys.stderr, flush=True)


def train_tokenizer(texts: list[str], path: Path, vocab_size: int = 512) -> None:
    """A small BPE SentencePiece model shaped like LLaMA's (byte fallback, bos 1, eos 2)."""
    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    corpus.unlink()


ANSWER_TOKENS = 64  # the tiny models' answers: enough to read, quick to judge
NOISE = ("judge: the fine-tuned tiny model itself, served by limajax serve on loopback. A model "
         "this small cannot judge: its verdicts are noise (most come back unparsed). The point is "
         "the pipeline; set LIMAJAX_JUDGE_URL and LIMAJAX_JUDGE_MODEL (the key, if one is "
         "needed, in OPENAI_API_KEY) for a real judge.")


@contextlib.contextmanager
def demo_judge(model_dir: Path):
    """The judge for step 10: an external OpenAI-compatible one if LIMAJAX_JUDGE_URL is set,
    else limajax's own `serve` of the fine-tuned model, in this process."""
    url = os.environ.get("LIMAJAX_JUDGE_URL")
    if url:
        judge = Judge(url, os.environ.get("LIMAJAX_JUDGE_MODEL", "gpt-4"),
                      api_key_env="OPENAI_API_KEY" if os.environ.get("OPENAI_API_KEY") else None)
        print(f"judge: {judge.model} at {url}", file=sys.stderr)
        yield judge
        return
    print(NOISE, file=sys.stderr)
    mesh = sharding.single_device_mesh()
    model, tokenizer = load_for_inference(model_dir, mesh)
    # 1024 tokens hold the packaged question (~530 of this tokenizer's) and two re-asks
    engine = Engine(model, tokenizer, mesh, max_batch=8, cache_length=1024)
    try:
        with running(engine, "lima-tiny") as url:
            yield Judge(url, "lima-tiny", max_tokens=16)
    finally:
        engine.close()


def base_models(workdir: Path, tiny) -> None:
    """Steps 1-4: the tokenizer, a random tiny LLaMA written as a Hugging Face checkpoint
    (random-hf/), converted into base/ and exported back for transformers (base-hf/)."""
    banner("1. a tokenizer trained on the embedded sample dialogues")
    samples = [r.conversations for r in data.read_gair_file(data.SAMPLE_DATA / "train.jsonl",
                                                             "train")[0]]
    train_tokenizer([t for c in samples for t in c], workdir / "tokenizer.model")

    banner("2. a random tiny LLaMA written as a Hugging Face checkpoint (safetensors)")
    base_config = tiny.model.replace(vocab_size=512)  # the tokenizer's pieces; EOT comes next
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(
        nnx.state(Llama(base_config, rngs=nnx.Rngs(0)), nnx.Param)))
    base_tokens = TokenSpec(1, 2, None, 512, base_config.padded_vocab_size)
    with staged_dir(workdir / "random-hf", command="demo") as tmp:
        convert.write_hf(tmp, params, base_config, base_tokens, workdir / "tokenizer.model")

    banner("3. limajax convert --from hf (adds LIMA's EOT token)")
    config, tokens = convert.convert("hf", workdir / "random-hf", workdir / "base")
    print(f"{workdir / 'base'}: {config.n_params:,} parameters, vocabulary {tokens.vocab_size} "
          f"(EOT {tokens.eot_id})", file=sys.stderr)

    banner("4. limajax export --to hf (safetensors, config.json and tokenizer for transformers; "
           "the demo does not load them, tests/test_demo.py does: transformers is a test "
           "dependency)")
    convert.export("hf", workdir / "base", workdir / "base-hf")


def run_demo(workdir: str | Path, *, epochs: int | None = None, overwrite: bool = False) -> None:
    """Run every step into `workdir`, printing what each found."""
    tiny = recipe()
    workdir = Path(workdir)
    check_replaceable(workdir, overwrite=overwrite, command="demo")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    mark_output(workdir, "demo")  # first, so --overwrite may replace even a run cut short

    base_models(workdir, tiny)

    banner("5. limajax data prepare (the embedded sample dialogues)")
    data.prepare(data.SAMPLE_DATA, workdir / "data", data.PrepareOptions())

    prompts = workdir / "prompts.jsonl"
    rows = data.read_gair_file(data.SAMPLE_DATA / "test.jsonl", "test")[0]
    prompts.write_text("".join(json.dumps({"id": i, "text": r.conversations[0]}) + "\n"
                               for i, r in enumerate(rows)))

    banner("6. limajax score: the random model on the held-out sample prompts")
    before = perplexity.score_file(workdir / "base", prompts, workdir / "scores-base.jsonl", "1x1")
    print(f"perplexity {before['ppl']:.1f} over {before['tokens']} tokens", file=sys.stderr)

    banner("7. limajax train --config configs/tiny.py --init base --mesh 2x4 (LIMA §3 recipe)")
    run = dataclasses.replace(
        tiny, init=str(workdir / "base"), epochs=epochs or tiny.epochs,
        data=dataclasses.replace(tiny.data, path=str(workdir / "data")))
    metrics = train.train_recipe(run, workdir / "run", progress=False)

    banner("8. the last epoch as a model directory, scored on the same prompts")
    save_epoch_model_dir(workdir / "run", run.epochs, workdir / "lima", command="demo")
    after = perplexity.score_file(workdir / "lima", prompts, workdir / "scores-lima.jsonl", "1x1")
    print(f"training loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}; "
          f"held-out perplexity {before['ppl']:.1f} -> {after['ppl']:.1f}", file=sys.stderr)

    banner("9. limajax sample: the base and the fine-tuned model answer the held-out prompts")
    test_prompts = workdir / "test-prompts.jsonl"
    test_prompts.write_text("".join(json.dumps({"id": i, "conversations": r.conversations}) + "\n"
                                    for i, r in enumerate(rows)))
    answers = {name: workdir / f"answers-{name}.jsonl" for name in ("lima", "base")}
    for name, path in answers.items():  # LIMA §4.1's sampler: p 0.9, temperature 0.7, 1.2
        sampling.sample_file(str(workdir / name), str(test_prompts), str(path),
                             sampling.Settings(max_new_tokens=ANSWER_TOKENS), progress=False)

    banner("10. limajax compare: is the fine-tuned answer or the base one better? (both orders)")
    judgments = workdir / "judgments.jsonl"
    with demo_judge(workdir / "lima") as judge:
        r = compare(str(answers["lima"]), str(answers["base"]), judge, str(judgments),
                    progress=False)
    o = r["outcomes"]
    print(f"{r['prompts']} prompts: fine-tuned better {o['A']}, tie {o['tie']}, base better "
          f"{o['B']}, unparsed {o['unparsed']}", file=sys.stderr)

    banner("11. limajax report (Markdown, Figure-1 chart, summary.json) and limajax annotate")
    report([str(judgments)], str(workdir / "report.md"), plot_path=str(workdir / "figure1.png"),
           json_path=str(workdir / "summary.json"))
    annotate(str(answers["lima"]), str(answers["base"]), str(workdir / "sheet.html"))
    print(f"wrote {workdir / 'report.md'}, {workdir / 'figure1.png'}, "
          f"{workdir / 'summary.json'} and {workdir / 'sheet.html'} (open it in a browser to "
          "judge the answers yourself; `limajax compare --human` reads its export)",
          file=sys.stderr)
