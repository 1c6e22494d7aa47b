"""Llama 3 end to end: a tiny Llama-3-style checkpoint (GQA, rope_theta 500000, Llama-3.1 rope
scaling, a byte-level BPE tokenizer.json with Llama 3's special tokens, untrained special rows)
is converted, trained for two steps, scored and exported, and transformers agrees with limajax
on the export: the same logits, and AutoTokenizer the same ids on LIMA's dialogues."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from limajax import sharding
from limajax.checkpoint import load_for_inference, load_model_dir
from limajax.errors import UserError
from limajax.tokenizer import Tokenizer

# Llama 3's special tokens (a few of its 256), placed after the BPE vocabulary as in Llama 3.
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|reserved_special_token_2|>", "<|eot_id|>"]
DIALOGUES = 16  # two steps of 8


def build_tokenizer(texts, directory):
    """A byte-level BPE tokenizer.json shaped like Llama 3's: BOS added by its post-processor."""
    from transformers import PreTrainedTokenizerFast

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens(SPECIALS)
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0],
                                   eos_token=SPECIALS[1])
    fast.save_pretrained(directory)  # tokenizer.json + tokenizer_config.json, as HF ships them
    return tok


@pytest.fixture(scope="module")
def llama3(tmp_path_factory, lima_rows, cli):
    """The HF checkpoint, then convert -> train 2 steps -> score -> export, through the CLI."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def ok(*args):
        result = cli(*args)
        assert result.exit_code == 0, result.output

    root = tmp_path_factory.mktemp("llama3")
    texts = [t for r in lima_rows[:200] for t in r["conversations"]]
    tok = build_tokenizer(texts, root / "hf")
    vocab = tok.get_vocab_size()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
        rms_norm_eps=1e-5, bos_token_id=tok.token_to_id(SPECIALS[0]),
        eos_token_id=tok.token_to_id(SPECIALS[1]), tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})
    model = LlamaForCausalLM(config).eval()
    special = [tok.token_to_id(s) for s in SPECIALS[2:]]  # <|eot_id|> among them
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        # As in Llama-3 base: the special tokens never seen in pretraining have ~zero rows.
        model.model.embed_tokens.weight[special] = 1e-9
        model.lm_head.weight[special] = 0.0
    model.save_pretrained(root / "hf")
    ok("convert", "--from", "hf", "--input", root / "hf", "--output", root / "model")

    gair = root / "gair"
    gair.mkdir()
    (gair / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lima_rows[:DIALOGUES]))
    ok("data", "prepare", "--input", gair, "--output", root / "data")
    (root / "recipe.py").write_text(
        "from limajax.checkpoint import read_model_config\n"
        "from limajax.config import DataConfig, OptimConfig, TrainConfig\n"
        f"config = TrainConfig(model=read_model_config({str(root / 'model')!r}), epochs=1,\n"
        "    data=DataConfig(batch_size=8, max_len=64), optim=OptimConfig(lr=1e-3),\n"
        "    dropout=0.1, mesh='2x4')\n")
    ok("train", "--config", root / "recipe.py", "--init", root / "model", "--data",
        root / "data", "--workdir", root / "run", "--no-progress", "--peak-flops", "1e12")
    (root / "texts.jsonl").write_text("".join(
        json.dumps({"id": i, "text": r["conversations"][0]}) + "\n"
        for i, r in enumerate(lima_rows[:4])))
    ok("score", "--workdir", root / "run", "--epoch", 1, "--input", root / "texts.jsonl",
        "--output", root / "scores.jsonl")
    ok("export", "--to", "hf", "--workdir", root / "run", "--epoch", 1, "--output",
        root / "export")
    return root, model, tok


def test_conversion_keeps_llama3s_eot_and_starts_its_untrained_rows_at_the_mean(llama3):
    root, model, tok = llama3
    tokens = json.loads((root / "model" / "tokens.json").read_text())
    eot = tok.token_to_id("<|eot_id|>")
    # LIMA's EOT is Llama 3's own <|eot_id|>: no new row.
    assert tokens["eot_id"] == eot and tokens["vocab_size"] == tok.get_vocab_size()
    assert (tokens["bos_id"], tokens["eos_id"]) == (tok.token_to_id(SPECIALS[0]),
                                                   tok.token_to_id(SPECIALS[1]))
    assert (root / "model" / "tokenizer.json").is_file()
    params, config, _ = load_model_dir(root / "model")
    assert (config.n_kv_heads, config.rope_theta, config.rope_scaling.factor) == (2, 5e5, 8.0)
    special = [tok.token_to_id(s) for s in SPECIALS[2:]]
    trained = np.setdiff1d(np.arange(tok.get_vocab_size()), special)
    emb = model.model.embed_tokens.weight.detach().numpy()
    out = model.lm_head.weight.detach().numpy()
    np.testing.assert_allclose(params["tok_embeddings"]["embedding"][eot],
                               emb[trained].mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(params["output"]["kernel"][:, eot], out[trained].mean(0),
                               rtol=1e-5, atol=1e-7)
    # The other untrained rows are left as they are (LIMA only uses EOT).
    assert np.abs(params["tok_embeddings"]["embedding"][special[0]]).max() < 1e-8


def test_training_steps_and_scores_are_real(llama3):
    root, _, tok = llama3
    metrics = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    scores = [json.loads(x) for x in (root / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 4 and all(np.isfinite(s["ppl"]) for s in scores)
    for s in scores:  # BOS, then tokenizer.json's ids
        assert s["token_ids"] == tok.encode(s["text"]).ids


def test_transformers_loads_the_export_with_the_same_logits(llama3, lima_rows):
    from transformers import AutoModelForCausalLM

    root, _, _ = llama3
    model, tokenizer = load_for_inference(root / "run", sharding.single_device_mesh(), epoch=1)
    encoded = [tokenizer.encode_dialogue(r["conversations"], max_len=48).ids
               for r in lima_rows[:3]]
    tokens = np.zeros((3, 48), np.int32)
    for i, ids in enumerate(encoded):
        tokens[i, :len(ids)] = ids
    ours = np.asarray(model(tokens))
    hf = AutoModelForCausalLM.from_pretrained(root / "export").eval()
    with torch.no_grad():
        mask = torch.tensor(tokens != 0, dtype=torch.long)
        mask[:, 0] = 1
        ref = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=mask).logits.numpy()
    vocab = hf.config.vocab_size
    for i, ids in enumerate(encoded):  # float32 both sides; padding positions not compared
        np.testing.assert_allclose(ours[i, :len(ids), :vocab], ref[i, :len(ids)], atol=1e-4,
                                   rtol=0)


def test_autotokenizer_gives_limajaxs_ids_on_lima_dialogues(llama3, lima_rows, autotokenizer_ids):
    from transformers import AutoTokenizer

    root, _, _ = llama3
    dialogues = [row["conversations"] for row in lima_rows]
    ours = Tokenizer.from_path(root / "model")
    theirs = autotokenizer_ids(root / "export", dialogues)  # no sentencepiece, no protobuf
    assert theirs == [ours.encode_dialogue(d, max_len=10**9).ids.tolist() for d in dialogues]
    ours = Tokenizer.from_path(root / "model")  # the tokenizer the run trained with
    auto = AutoTokenizer.from_pretrained(root / "export")
    assert auto.convert_tokens_to_ids("<|eot_id|>") == ours.eot_id
    assert (auto.bos_token_id, auto.eos_token_id) == (ours.bos_id, ours.eos_id)
    for row in lima_rows[:100]:
        for text in row["conversations"]:
            ids = ours.encode(text)
            assert auto(text)["input_ids"] == [ours.bos_id, *ids]
            assert auto.decode(ids) == ours.decode(ids) == text


def test_metas_tiktoken_tokenizer_is_refused_naming_the_alternative(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken's format: base64 bytes, rank
    with pytest.raises(UserError, match="tiktoken.*tokenizer.json") as e:
        Tokenizer.from_path(path)
    assert "\n" not in str(e.value)


def test_meta_layout_round_trip_carries_tokenizer_json(llama3, cli, tmp_path):
    root, _, tok = llama3
    assert cli("export", "--to", "meta", "--model", root / "model", "--output",
               tmp_path / "meta").exit_code == 0
    assert (tmp_path / "meta" / "tokenizer.json").is_file()
    assert cli("convert", "--from", "meta", "--input", tmp_path / "meta", "--output",
               tmp_path / "back").exit_code == 0
    assert json.loads((tmp_path / "back" / "tokens.json").read_text()) == json.loads(
        (root / "model" / "tokens.json").read_text())
    a, _, _ = load_model_dir(root / "model")
    b, _, _ = load_model_dir(tmp_path / "back")
    np.testing.assert_array_equal(a["tok_embeddings"]["embedding"],
                                  b["tok_embeddings"]["embedding"])
