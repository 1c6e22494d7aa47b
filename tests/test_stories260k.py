"""A real trained model end to end: stories260K (llama2.c) in Meta's layout, converted, decoded
greedily with the KV cache, and compared token for token with transformers on the export."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from click.testing import CliRunner

from limajax import sharding
from limajax.checkpoint import load_model_dir
from limajax.cli import main
from limajax.model import KVCache
from limajax.tokenizer import Tokenizer

NEW_TOKENS = 60


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Prefill the prompt, then one token at a time from the cache, taking the argmax."""
    cache = KVCache.empty(model.config, batch=1, length=len(prompt) + steps)
    logits, cache = model(jnp.asarray([prompt]), cache=cache)
    out = [int(jnp.argmax(logits[0, -1]))]
    step = jax.jit(lambda m, t, p, c: m(t, p, cache=c))
    for pos in range(len(prompt), len(prompt) + steps - 1):
        logits, cache = step(model, jnp.asarray([[out[-1]]]), jnp.asarray([[pos]]), cache)
        out.append(int(jnp.argmax(logits[0, -1])))
    return out


def test_greedy_story_matches_the_known_text_and_transformers(stories):
    params, config, _ = load_model_dir(stories / "model")
    assert config.tie_embeddings and config.n_kv_heads == 4 and config.vocab_size == 513
    model = sharding.model_from_params(config, params)
    tok = Tokenizer.from_path(stories / "model")
    prompt = [tok.bos_id] + tok.encode("Once upon a time")
    ours = greedy(model, prompt, NEW_TOKENS)
    text = tok.decode(prompt[1:] + ours)
    # llama2.c's own test for this model prints this story (fixtures/stories260K/README.md).
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(stories / "hf", dtype=torch.float32)
    with torch.no_grad():
        generated = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generated[0, len(prompt):].tolist() == ours


def test_score_gives_the_models_low_perplexity_on_its_kind_of_text(stories, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"id": "story", "text": "Once upon a time, there was a little girl named '
                     'Lily. She loved to play outside."}\n{"id": "noise", "text": "zq xv kj '
                     'wp qq zz xx"}\n')
    out = tmp_path / "scores.jsonl"
    result = CliRunner().invoke(main, ["score", "--model", str(stories / "model"),
                                       "--input", str(texts), "--output", str(out)])
    assert result.exit_code == 0, result.output
    import json

    story, noise = [json.loads(line) for line in out.read_text().splitlines()]
    assert story["token_ids"][0] == 1 and len(story["logprobs"]) == len(story["token_ids"]) - 1
    assert np.isclose(story["nll"], -np.mean(story["logprobs"]))
    # A TinyStories model finds its own kind of sentence easy and random letters hard.
    assert story["ppl"] < 5 < noise["ppl"]
