"""LIMA's sampler proven against references: greedy decoding with the cache equals repeated full
forward passes and transformers' greedy generate; the repetition penalty and top-p equal
transformers' processors; draws follow the tempered, truncated distribution; a row's answer does
not depend on its batch or the mesh; `limajax sample` on the real stories260K model."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from limajax import sampling, sharding
from limajax.checkpoint import load_model, save_model_dir
from limajax.cli import main
from limajax.config import ModelConfig, load_recipe
from limajax.errors import UserError
from limajax.sampling import Request, Settings, sampler
from limajax.tokenizer import Tokenizer, TokenSpec

# GQA (2 query heads per K/V head), padded vocabulary (300 -> 384); K/V heads divide a model axis
# of 4, so the 2x4 mesh really splits the cache.
CFG = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=300, multiple_of=16)
TOKENS = TokenSpec(bos_id=1, eos_id=2, eot_id=299, vocab_size=300, padded_vocab_size=384)
STOPS = np.asarray([TOKENS.eot_id, TOKENS.eos_id], np.int32)
PROMPTS = [[1, 17, 42, 9], [1, 250, 3, 77, 8, 120, 61, 5, 33, 90, 11], [1, 5]]
NEW = 50
GREEDY = Settings(greedy=True, max_new_tokens=NEW)
LIMA = Settings(max_new_tokens=NEW, seed=3)  # LIMA §4.1: T 0.7, top-p 0.9, penalty 1.2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random model whose weights are large enough that greedy choices are not near-ties."""
    model = sharding.init_model(CFG, sharding.single_device_mesh(), seed=0)
    from flax import nnx

    params = jax.tree.map(lambda x: np.asarray(x) * (8.0 if x.ndim > 1 else 1.0),
                          nnx.to_pure_dict(nnx.state(model)))
    return save_model_dir(tmp_path_factory.mktemp("random") / "model", params, CFG, TOKENS,
                          command="convert")


@pytest.fixture(scope="module")
def model(model_dir):
    params, config, _, _ = load_model(model_dir)
    return sharding.model_from_params(config, params)


def generate(model, requests, mesh=None, batch_size=4):
    mesh = sharding.single_device_mesh() if mesh is None else mesh
    out = {}
    for finished in sampling.generate(model, mesh, requests, batch_size, STOPS):
        out.update(finished)
    return [out[i] for i in range(len(requests))]


@pytest.fixture(scope="module")
def greedy_batch(model):
    return generate(model, [Request(p, GREEDY, i) for i, p in enumerate(PROMPTS)])


def test_greedy_equals_argmax_of_full_forward_passes(model, greedy_batch):
    forward = jax.jit(lambda m, t: m(t))  # one shape: causal, so padding after does not matter
    for prompt, got in zip(PROMPTS, greedy_batch, strict=True):
        ids = list(prompt)
        while len(ids) < len(prompt) + NEW:
            padded = np.zeros((1, 64), np.int32)
            padded[0, :len(ids)] = ids
            ids.append(int(jnp.argmax(forward(model, padded)[0, len(ids) - 1])))
            if ids[-1] in STOPS:
                break
        assert got.tokens == ids[len(prompt):]
        assert got.finish == ("length" if len(got.tokens) == NEW else "eot")


def test_greedy_equals_transformers_generate(model_dir, greedy_batch, tmp_path):
    from transformers import AutoModelForCausalLM

    result = CliRunner().invoke(main, ["export", "--to", "hf", "--model", str(model_dir),
                                       "--output", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    for prompt, got in zip(PROMPTS, greedy_batch, strict=True):
        with torch.no_grad():  # stops at [EOT, EOS] from the export's generation_config
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0)
        assert out[0, len(prompt):].tolist() == got.tokens
    assert sum(len(c.tokens) for c in greedy_batch) > 2 * NEW  # not trivially short


def test_a_rows_answer_does_not_depend_on_its_batch_or_the_mesh(model, model_dir,
                                                                  greedy_batch):
    sampled = [Request(p, LIMA, f"p{i}") for i, p in enumerate(PROMPTS)]
    batch = generate(model, sampled)
    assert len({tuple(c.tokens) for c in batch}) == len(PROMPTS)
    for request, in_batch in zip(sampled, batch, strict=True):
        assert generate(model, [request], batch_size=1) == [in_batch]
    # Other prompts, another order, another sample index: the same rows give the same answers.
    shuffled = [sampled[2], Request(PROMPTS[0], LIMA, "p0", sample=1), sampled[0]]
    again = generate(model, shuffled)
    assert again[0] == batch[2] and again[2] == batch[0] and again[1] != batch[0]

    mesh = sharding.make_mesh("2x4", jax.devices()[:8])
    params, config, _, _ = load_model(model_dir, mesh)
    sharded = sharding.model_from_params(config, params, mesh)
    assert generate(sharded, sampled, mesh) == batch
    greedy = generate(sharded, [Request(p, GREEDY, i) for i, p in enumerate(PROMPTS)], mesh)
    assert greedy == greedy_batch


# --- the processors against transformers' -----------------------------------------------------


def random_case(seed, batch=6, vocab=50):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(batch, vocab)) * 3).astype(np.float32)
    context = rng.integers(0, vocab, (batch, 12))
    seen = np.zeros((batch, vocab), bool)
    np.put_along_axis(seen, context, True, axis=1)
    return logits, context, seen


def test_repetition_penalty_equals_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    for seed, penalty in [(0, 1.2), (1, 1.5), (2, 0.8)]:
        logits, context, seen = random_case(seed)
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(context),
                                                        torch.tensor(logits))
        ours = sampler.apply_repetition_penalty(logits, seen, np.full(len(logits), penalty))
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)


def test_top_p_keeps_the_set_transformers_keeps():
    from transformers import TopPLogitsWarper

    for seed, p in [(3, 0.9), (4, 0.5), (5, 0.95), (6, 0.1)]:
        logits, _, _ = random_case(seed)
        ref = TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy()
        ours = np.asarray(sampler.apply_top_p(logits, np.full(len(logits), p, np.float32)))
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
        np.testing.assert_array_equal(ours[np.isfinite(ours)], logits[np.isfinite(ours)])


def test_draws_follow_the_tempered_truncated_distribution():
    logits = np.asarray([2.0, 1.5, -0.5, 1.0, 0.2, -1.0, 0.7, 0.0], np.float32)
    seen = np.asarray([1, 0, 1, 0, 0, 0, 1, 0], bool)
    t, p, penalty = 0.7, 0.9, 1.2
    # The distribution by hand: penalty on seen ids, temperature, then the smallest set of most
    # probable ids reaching p.
    x = np.where(seen, np.where(logits < 0, logits * penalty, logits / penalty), logits) / t
    x = x.astype(np.float64)
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    order = np.argsort(-probs)
    keep = order[:np.searchsorted(np.cumsum(probs[order]), p) + 1]
    expected = np.zeros_like(probs)
    expected[keep] = probs[keep] / probs[keep].sum()
    assert 2 < len(keep) < len(logits)

    n = 20000
    knobs = sampler.Knobs.of([Settings(temperature=t, top_p=p, repetition_penalty=penalty)] * n)
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draws = np.asarray(jax.jit(sampler.choose)(np.tile(logits, (n, 1)), np.tile(seen, (n, 1)),
                                                 knobs, keys))
    counts = np.bincount(draws, minlength=len(logits))
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus, ever
    # Pearson's chi-squared over the kept ids at a fixed seed; a wrong temperature, penalty or
    # nucleus moves the counts by hundreds and gives p far below 1e-3.
    assert stats.chisquare(counts[keep], n * expected[keep]).pvalue > 1e-3


def test_settings_defaults_and_mistakes():
    assert (LIMA.temperature, LIMA.top_p, LIMA.repetition_penalty) == (0.7, 0.9, 1.2)
    assert GREEDY.repetition_penalty == 1.0 and Settings(temperature=0).greedy
    for bad in [dict(top_p=0), dict(temperature=-0.1), dict(repetition_penalty=0)]:
        with pytest.raises(UserError):
            Settings(**bad)


# --- `limajax sample` ---------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(main, ["sample", *map(str, args)])


def test_sample_raw_greedy_continues_stories_as_transformers_does(stories, tmp_path):
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    texts = ["Lily and Tom", "The cat"]
    prompts.write_text("".join(json.dumps({"id": t, "conversations": [t]}) + "\n" for t in texts))
    out = tmp_path / "out.jsonl"
    result = run("--model", stories / "model", "--prompts", prompts, "--output", out, "--raw",
                 "--greedy", "--max-new-tokens", 80, "--batch-size", 4, "--no-progress")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = Tokenizer.from_path(stories / "model")
    hf = AutoModelForCausalLM.from_pretrained(stories / "hf", dtype=torch.float32)
    for text, row in zip(texts, rows, strict=True):
        ids = [tok.bos_id] + tok.encode(text)
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=80, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
        assert row["completion_tokens"] == len(gen) and row["prompt_tokens"] == len(ids)
        if gen[-1] in (tok.eot_id, tok.eos_id):
            gen = gen[:-1]
        # The continuation keeps the space it has in context (decoded after its prompt).
        assert text + row["response"] == tok.decode(ids + gen) and len(row["response"]) > 100
        assert row["settings"]["greedy"] and row["settings"]["raw"]
        assert row["checkpoint"] == {"path": str(stories / "model"), "epoch": None}


def test_sample_file_resumes_without_duplicates_in_input_order(stories, lima_rows, tmp_path):
    lima = lima_rows
    # Short LIMA dialogues (their reference answers are dropped: the model answers the user).
    rows = [{"id": f"lima-{i}", **lima[i]} for i in (482, 480, 472)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = ["--model", stories / "model", "--prompts", prompts, "--output", out,
            "--num-samples", 2, "--max-new-tokens", 24, "--batch-size", 4, "--no-progress"]
    full = run(*args)
    assert full.exit_code == 0, full.output
    complete = out.read_text().splitlines()
    assert [(json.loads(r)["id"], json.loads(r)["sample"]) for r in complete] == [
        (r["id"], k) for r in rows for k in (0, 1)]
    row = json.loads(complete[0])
    assert row["conversations"] == rows[0]["conversations"] and row["source"]
    assert row["finish_reason"] in ("eot", "eos", "length") and row["completion_tokens"] <= 24
    assert row["settings"] == {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2,
                               "max_new_tokens": 24, "greedy": False, "seed": 0,
                               "penalty_scope": "context", "raw": False, "template": "lima"}
    # An interrupted run: three rows and half a line. The rerun adds exactly the missing rows,
    # and they are the same answers (draws depend on seed, prompt id and sample only).
    out.write_text("\n".join([complete[4], complete[0], complete[3]]) + "\n" + complete[1][:30])
    again = run(*args)
    assert again.exit_code == 0, again.output
    assert "3 were already there" in again.output
    assert out.read_text().splitlines() == complete


def test_sample_mistakes_are_one_line_and_exit_2(stories, model_dir, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": 1, "conversations": ["Hi"]}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "conversations": ["Hi"]}\n{"id": 2, "conversations": "Hi"}\n')
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "long", "conversations": ["once upon a time " * 700]}))
    workdir = tmp_path / "run"
    workdir.mkdir()
    recipe = load_recipe(str(Path(__file__).parents[1] / "configs" / "tiny.py"))
    (workdir / "config.json").write_text(json.dumps(recipe.to_dict()))
    model = ["--model", stories / "model"]
    cases = [
        (model + ["--prompts", bad, "--output", tmp_path / "o1"], f"{bad}:2"),
        (model + ["--prompts", long, "--output", tmp_path / "o2"], "context length is 2048"),
        (["--workdir", workdir, "--epoch", 3, "--prompt", "Hi"], "no checkpoint for epoch 3"),
        (["--model", model_dir, "--prompt", "Hi"], "no tokenizer"),
        (model + ["--prompt", "Hi", "--top-p", 0], "top-p must be in (0, 1]"),
        (model + ["--prompt", "Hi", "--temperature", -1], "temperature must be >= 0"),
    ]
    for args, words in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        message = result.output.strip()
        assert message.startswith("error: ") and "\n" not in message and words in message, message
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_inference_names_replicated_dimensions(stories, capfd):
    """sample, chat, serve and score load through one loader, which says what a mesh cannot
    split (4 K/V heads on a model axis of 8) and what the copy costs (review R3)."""
    from limajax.checkpoint import load_for_inference

    load_for_inference(stories / "model", sharding.inference_mesh("1x8"))
    err = capfd.readouterr().err
    assert "kv_heads (4) over model (8) does not divide, so it is replicated there" in err
    load_for_inference(stories / "model", sharding.inference_mesh("1x4"))
    assert "replicated" not in capfd.readouterr().err
