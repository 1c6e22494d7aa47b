"""`limajax demo`'s steps 1-4 (the whole demo runs for minutes): its banner says the export is for
transformers and that the demo does not load it; transformers loads it here and gives limajax's
logits and dialogue ids."""

import numpy as np

from limajax import data, demo, sharding
from limajax.checkpoint import load_model_dir
from limajax.tokenizer import Tokenizer


def test_the_demos_export_loads_in_transformers_as_its_banner_says(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo.base_models(tmp_path, demo.recipe())
    said = capsys.readouterr().err
    assert ("limajax export --to hf (safetensors, config.json and tokenizer for transformers; "
            "the demo does not load them, tests/test_demo.py does") in said

    export = tmp_path / "base-hf"
    params, config, spec = load_model_dir(tmp_path / "base")
    ours = Tokenizer.from_path(tmp_path / "tokenizer.model", spec)
    hf_tokenizer = AutoTokenizer.from_pretrained(export)
    rows = data.read_gair_file(data.SAMPLE_DATA / "test.jsonl", "test")[0][:4]
    roles = ("user", "assistant")
    for row in rows:  # the dialogue ids limajax trains on, from the export's chat template
        turns = [*row.conversations, "An answer."]
        hf_ids = hf_tokenizer.apply_chat_template(
            [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)],
            tokenize=True)["input_ids"]
        assert hf_ids == ours.encode_dialogue(turns, max_len=10**9).ids.tolist()

    ids = ours.encode_dialogue([rows[0].conversations[0]], max_len=10**9).ids[None, :32]
    model = sharding.model_from_params(config, params)
    want = np.asarray(model(ids, np.arange(ids.shape[1])[None]))[..., :spec.vocab_size]
    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        got = hf(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got[..., :spec.vocab_size], want, atol=1e-4, rtol=0)
