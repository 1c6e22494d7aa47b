"""Tokenizer: the EOT convention, tokens.json, and dialogue ids + loss masks on LIMA's real data."""


from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import limajax
from limajax.config import preset
from limajax.errors import UserError
from limajax.tokenizer import (
    SentencePieceFile,
    Tokenizer,
    TokenSpec,
    load_from,
    save_to,
)


@pytest.fixture(scope="module")
def model_file(llama_tokenizer_file):
    return llama_tokenizer_file


@pytest.fixture(scope="module")
def tok(llama_tokenizer):
    return llama_tokenizer


@pytest.fixture(scope="module")
def sp(model_file):
    return spm.SentencePieceProcessor(model_file=str(model_file))


@pytest.fixture(scope="module")
def dialogues(lima_rows):
    return [r["conversations"] for r in lima_rows]


def test_bare_tokenizer_puts_eot_past_the_vocabulary(tok):
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (1, 2, 32000)
    assert tok.vocab_size == 32001 and tok.padded_vocab_size == 32128
    assert tok.encode("Hello world") == [15043, 3186]  # fixture README, no BOS


def test_model_directory_reads_tokens_json(tmp_path, model_file):
    (tmp_path / "tokenizer.model").write_bytes(model_file.read_bytes())
    spec = TokenSpec(bos_id=1, eos_id=2, eot_id=32000, vocab_size=32001, padded_vocab_size=32256)
    save_to(tmp_path, None, spec)
    assert load_from(tmp_path) == (spec, tmp_path / "tokenizer.model")
    tok = Tokenizer.from_path(tmp_path)
    assert tok.spec == spec and tok.padded_vocab_size == 32256


def test_base_model_without_eot_gains_it(tmp_path, model_file):
    (tmp_path / "tokenizer.model").write_bytes(model_file.read_bytes())
    save_to(tmp_path, None, TokenSpec(1, 2, None, 32000, 32000))
    base = Tokenizer.from_path(tmp_path)
    assert base.eot_id is None and base.vocab_size == 32000 and base.padded_vocab_size == 32000
    with pytest.raises(UserError, match="no EOT"):
        base.encode_dialogue(["hi", "hello"])
    tuned = base.with_eot()
    # Padded as the model config pads it, so a run's epochs export like any model (R2).
    assert (tuned.eot_id, tuned.vocab_size, tuned.padded_vocab_size) == (32000, 32001, 32128)
    assert tuned.padded_vocab_size == preset("llama1-7b").replace(vocab_size=32001
                                                                  ).padded_vocab_size


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not valid JSON"),
        ('{"bos_id": 1}', "expected exactly the keys"),
        ('{"bos_id": 1, "eos_id": 2, "eot_id": "x", "vocab_size": 3, "padded_vocab_size": 4}',
         "eot_id must be an integer"),
        ('{"bos_id": 1, "eos_id": 2, "eot_id": 9, "vocab_size": 3, "padded_vocab_size": 4}',
         "outside the vocabulary"),
    ],
)
def test_bad_tokens_json_is_a_user_error(tmp_path, text, message):
    path = tmp_path / "tokens.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        load_from(tmp_path)
    assert str(path) in str(e.value)


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "tokenizer.model").write_text("not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        Tokenizer.from_path(tmp_path / "tokenizer.model")


def test_dialogues_have_eot_after_every_utterance_and_assistant_only_masks(tok, sp, dialogues):
    """Every real LIMA dialogue: ids, mask and decoding checked against SentencePiece directly."""
    assert len(dialogues) == 1029
    for conv in dialogues:
        ids, mask, trimmed = tok.encode_dialogue(conv, max_len=10**6)
        assert not trimmed and ids[0] == tok.bos_id and mask[0] == 0
        expected_len = 1 + sum(len(sp.encode(u)) + 1 for u in conv)
        assert len(ids) == len(mask) == expected_len
        # Split at EOT: one segment per utterance, in order, decoding to the exact text.
        ends = np.flatnonzero(ids == tok.eot_id)
        assert len(ends) == len(conv) and ends[-1] == len(ids) - 1
        start = 1
        for turn, (utterance, end) in enumerate(zip(conv, ends, strict=True)):
            assert list(ids[start:end]) == sp.encode(utterance)
            assert tok.decode(ids[start:end + 1]) == utterance
            want = 1 if turn % 2 == 1 else 0  # user turns (even) 0, assistant turns (odd) 1
            assert (mask[start:end + 1] == want).all(), (turn, utterance[:40])
            start = end + 1
        all_but_bos = tok.encode_dialogue(conv, max_len=10**6, train_on_prompts=True).loss_mask
        assert all_but_bos[0] == 0 and all_but_bos[1:].all()


def test_long_dialogue_is_trimmed_to_exactly_max_len_keeping_the_beginning(tok, dialogues):
    full = [tok.encode_dialogue(c, max_len=10**6) for c in dialogues]
    longest = int(np.argmax([len(e.ids) for e in full]))
    assert len(full[longest].ids) > 2048
    ids, mask, trimmed = tok.encode_dialogue(dialogues[longest])
    assert trimmed and len(ids) == len(mask) == 2048
    assert (ids == full[longest].ids[:2048]).all()
    assert (mask == full[longest].loss_mask[:2048]).all()
    short = tok.encode_dialogue(["Hi", "Hello"])
    assert not short.trimmed
    assert len(short.ids) == 1 + len(tok.encode("Hi")) + len(tok.encode("Hello")) + 2


def test_decode_drops_bos_eot_and_padding_ids(tok):
    ids = [tok.bos_id, *tok.encode("Once upon a time"), tok.eot_id, tok.padded_vocab_size - 1]
    assert tok.decode(ids) == "Once upon a time"


def test_non_string_turn_is_rejected(tok):
    with pytest.raises(ValueError, match="list of strings"):
        tok.encode_dialogue(["hi", 3])
    with pytest.raises(ValueError, match="list of strings"):
        tok.encode_dialogue("hi")


EDGES = ["", " ", "a  b", "\n x \n", "  lead", "trail  ", "a \nb", "\t tab", "héllo ﬁ ①",
         "emoji 🤖 and 中文", "```code```\n\n* item"]


@pytest.mark.parametrize("model", ["llama_tokenizer/tokenizer.model", "stories260K/tok512.model",
                                   "sample_data"])
def test_the_exported_tokenizer_json_is_sentencepiece_exactly(model, fixtures, lima_rows):
    """tokenizer.json as export builds it: SentencePiece's ids and text on every LIMA utterance
    and on the edges of its normalizer (identity or NFKC, spaces kept or stripped and collapsed;
    stories260K's and the demo's tokenizers strip them, LLaMA's keeps them)."""
    path = (Path(limajax.__file__).parent / "sample_data" / "tokenizer.model"
            if model == "sample_data" else fixtures / model)
    sp = SentencePieceFile(path)
    fast = sp.fast()
    texts = [t for row in lima_rows for t in row["conversations"]] + EDGES
    ours = sp.encode_batch(texts)
    assert [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)] == ours
    assert [fast.decode(ids) for ids in ours] == [sp.decode(ids) for ids in ours]
    assert fast.encode("Hi").ids[0] == sp.bos_id  # BOS added, as LlamaTokenizer's add_bos_token
