"""The chat template `export --to hf` writes: transformers' apply_chat_template renders LIMA's
real dialogues as limajax's dialogue format, so transformers or vLLM serving the export build the
prompts the model was fine-tuned on."""

import pytest

from limajax.config import ModelConfig
from limajax.convert.hf import write_tokenizer
from limajax.serving import Message, conversation
from limajax.tokenizer import Tokenizer, TokenSpec


@pytest.fixture(scope="module")
def llama(llama_tokenizer_file, tmp_path_factory):
    """limajax's tokenizer and transformers' from the files `export --to hf` writes, for the
    real LLaMA tokenizer with LIMA's EOT."""
    from transformers import AutoTokenizer

    spec = TokenSpec(bos_id=1, eos_id=2, eot_id=32000, vocab_size=32001, padded_vocab_size=32128)
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    write_tokenizer(directory, llama_tokenizer_file, spec,
                    ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=spec.vocab_size))
    ours = Tokenizer.from_path(llama_tokenizer_file, spec)
    return ours, AutoTokenizer.from_pretrained(directory), directory


def messages(turns, system=None):
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                  for i, t in enumerate(turns)]


def prompt_text(tok: Tokenizer, ids: list[int]) -> str:
    """limajax's prompt as text: BOS, then each utterance and EOT, read back from the ids limajax
    trains and samples on."""
    text, turn = "<s>", []
    for i in ids[1:]:
        if i == tok.eot_id:
            text += tok.decode(turn) + "<EOT>"
            turn = []
        else:
            turn.append(i)
    return text


def test_transformers_renders_lima_dialogues_as_limajax_does(llama, lima_rows):
    tok, hf, _ = llama
    for row in lima_rows:
        turns = row["conversations"]
        ours = tok.encode_dialogue(turns, max_len=10**9).ids.tolist()
        rendered = hf.apply_chat_template(messages(turns), tokenize=False)
        assert rendered == prompt_text(tok, ours)


def test_autotokenizer_without_sentencepiece_or_protobuf_gives_limajaxs_ids(
        llama, lima_rows, autotokenizer_ids, tmp_path):
    """The export's tokenizer.json is SentencePiece's tokenizer exactly: the same ids on all
    1,029 LIMA dialogues (runs of spaces, newlines, byte fallback), where transformers cannot
    read tokenizer.model at all."""
    tok = llama[0]
    dialogues = [row["conversations"] for row in lima_rows]
    theirs = autotokenizer_ids(llama[2], dialogues)
    ours = [tok.encode_dialogue(turns, max_len=10**9).ids.tolist() for turns in dialogues]
    assert sum(a == b for a, b in zip(theirs, ours, strict=True)) == len(lima_rows)


def test_a_system_message_goes_where_serve_puts_it(llama):
    tok, hf, _ = llama
    chat = messages(["Hi!", "Hello. How can I help?", "Name a colour."], system="Be brief.")
    turns = conversation([Message(**m) for m in chat])
    assert turns[0] == "Be brief.\n\nHi!"
    ids = tok.encode_dialogue(turns).ids.tolist()
    assert hf.apply_chat_template(chat, tokenize=False) == prompt_text(tok, ids)
    assert list(hf.apply_chat_template(chat, tokenize=True)["input_ids"]) == ids


def test_export_writes_the_template(stories):
    from transformers import AutoTokenizer

    tok = Tokenizer.from_path(stories / "model")
    hf = AutoTokenizer.from_pretrained(stories / "hf")
    turns = ["Tell me a story about a cat.", "Once upon a time, a cat sat.", "And then?"]
    assert list(hf.apply_chat_template(messages(turns), tokenize=True)["input_ids"]) == \
        tok.encode_dialogue(turns).ids.tolist()
