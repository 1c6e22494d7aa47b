"""EleutherAI's lm-evaluation-harness itself against a live `limajax serve` (its
`local-completions` model, the export as tokenizer), on two small tasks written here to local
files: a multiple-choice task's per-choice log-likelihoods equal `lm_eval --model hf` on the
export, and a generate_until task's prompt + text equals transformers' greedy text."""

import json

import pytest
import torch

CONTEXTS = ["Once upon a time, there was a little", "The cat and the dog", "Lily wanted to"]
CHOICES = [" girl", " boy", " dog named Max"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = [{"context": c, "choices": CHOICES, "label": i % 3} for i, c in enumerate(CONTEXTS)]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "gen.jsonl").write_text("".join(json.dumps({"context": c, "answer": ""}) + "\n"
                                            for c in CONTEXTS))
    common = "dataset_path: json\ntest_split: train\n"
    (root / "limajax_mc.yaml").write_text(
        f"task: limajax_mc\n{common}dataset_kwargs:\n  data_files:\n    train: {root}/mc.jsonl\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    (root / "limajax_gen.yaml").write_text(
        f"task: limajax_gen\n{common}dataset_kwargs:\n  data_files:\n    train: {root}/gen.jsonl\n"
        "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n\\n']\n  max_gen_toks: 24\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def evaluate(model, model_args, tasks, names):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=names, log_samples=True,
                          task_manager=TaskManager(include_path=str(tasks)), batch_size=1)
    return out["samples"]


def test_lm_eval_harness_against_serve(stories, stories_server, tasks, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export = str(stories / "hf")
    served = evaluate("local-completions", {
        "base_url": f"{stories_server}/completions", "model": "stories", "tokenizer": export,
        "tokenizer_backend": "huggingface", "add_bos_token": True, "max_retries": 1,
        "max_length": 512}, tasks, ["limajax_mc", "limajax_gen"])
    local = evaluate("hf", {"pretrained": export, "dtype": "float32", "add_bos_token": True,
                            "device": "cpu"},
                     tasks, ["limajax_mc"])

    # Multiple choice: one log-likelihood per (prompt, choice), as the hf model computes them.
    ours = [[r[0] for r in s["resps"]] for s in sorted(served["limajax_mc"],
                                                       key=lambda s: s["doc_id"])]
    theirs = [[r[0] for r in s["resps"]] for s in sorted(local["limajax_mc"],
                                                         key=lambda s: s["doc_id"])]
    assert len(ours) == len(CONTEXTS) and all(len(o) == len(CHOICES) for o in ours)
    for o, t in zip(ours, theirs, strict=True):
        for (ll, greedy), (ll_ref, greedy_ref) in zip(o, t, strict=True):
            assert ll == pytest.approx(ll_ref, abs=1e-4) and greedy == greedy_ref
            assert ll < 0

    # generate_until: the prompt and the text that came back are transformers' greedy text.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    for sample in sorted(served["limajax_gen"], key=lambda s: s["doc_id"]):
        context = CONTEXTS[sample["doc_id"]]
        ids = tok(context, add_special_tokens=True).input_ids
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              pad_token_id=0)[0].tolist()
        text = sample["resps"][0][0]
        assert text.startswith(" ") and context + text == tok.decode(gen, skip_special_tokens=True)
