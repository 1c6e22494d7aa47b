"""Tokenizers (SentencePiece `tokenizer.model`, or Hugging Face `tokenizer.json` as Llama 3 ships
it) plus LIMA's end-of-turn token, and dialogue -> ids + loss mask.

LIMA §3 appends a special token, EOT, to every utterance, user's and assistant's: it ends a turn
(and generation) without the meanings the pretrained EOS carries. LLaMA-1/2's SentencePiece has
no piece for it, so it takes the first id past the base vocabulary (32000) and the embedding and
output grow by one row. Llama 3's tokenizer has its own end-of-turn token, `<|eot_id|>`: that is
LIMA's EOT there, and the vocabulary does not grow.

A model directory describes its ids in `tokens.json` (this module owns the format):
    {"bos_id": 1, "eos_id": 2, "eot_id": 32000, "vocab_size": 32001, "padded_vocab_size": 32128}
`vocab_size` counts the ids the model knows (EOT included); `padded_vocab_size` is the row count
of the embedding, rounded up so the vocabulary dimension shards evenly. `eot_id` is null for a
model that has no EOT yet (a converted base model); `Tokenizer.with_eot()` adds it.
"""

from __future__ import annotations

import dataclasses
import filecmp
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_model_pb2

from limajax.config import MAX_LEN, pad_vocab
from limajax.errors import UserError
from limajax.files import read_json, write_json

TOKENIZER_FILE = "tokenizer.model"  # SentencePiece (LLaMA-1/2)
HF_TOKENIZER_FILE = "tokenizer.json"  # Hugging Face tokenizers (Llama 3)
TOKENIZER_FILES = (TOKENIZER_FILE, HF_TOKENIZER_FILE)  # in the order a directory is searched
TOKENS_FILE = "tokens.json"
EOT_PIECE = "<|eot_id|>"  # Llama 3's end of turn: LIMA's EOT where a tokenizer has it


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """The special ids and vocabulary sizes of a model directory (`tokens.json`)."""

    bos_id: int
    eos_id: int
    eot_id: int | None
    vocab_size: int
    padded_vocab_size: int

    def __post_init__(self):
        if not 0 < self.vocab_size <= self.padded_vocab_size:
            raise ValueError(
                f"need 0 < vocab_size <= padded_vocab_size, got {self.vocab_size} and "
                f"{self.padded_vocab_size}"
            )
        for name in ("bos_id", "eos_id", "eot_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} {value} is outside the vocabulary [0, {self.vocab_size})")

    @classmethod
    def from_json(cls, obj: dict, where: str = TOKENS_FILE) -> TokenSpec:
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(obj, dict) or sorted(obj) != sorted(names):
            raise UserError(f"{where}: expected exactly the keys {', '.join(names)}")
        for name in names:
            value = obj[name]
            if not (isinstance(value, int) and not isinstance(value, bool)) and not (
                name == "eot_id" and value is None
            ):
                raise UserError(f"{where}: {name} must be an integer, got {value!r}")
        try:
            return cls(**obj)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None


def save_to(directory: str | Path, file: str | Path | None, spec: TokenSpec | None) -> None:
    """The one writer of a directory's tokenizer (model directory, training workdir, Meta
    export): the tokenizer file under its stored name and, with `spec`, tokens.json. A file
    already there with the same bytes is left alone (a resumed run)."""
    directory = Path(directory)
    if file is not None:
        dest = directory / stored_name(file)
        if not dest.is_file() or not filecmp.cmp(file, dest, shallow=False):
            shutil.copyfile(file, dest)
    if spec is not None:
        write_json(directory / TOKENS_FILE, dataclasses.asdict(spec))


def load_from(directory: str | Path, required: bool = True
              ) -> tuple[TokenSpec, Path | None] | None:
    """The one reader: (ids, tokenizer file or None) of a directory `save_to` wrote; a missing
    or malformed tokens.json is a UserError, or None when missing and not `required` (a
    workdir from before R6)."""
    path = Path(directory) / TOKENS_FILE
    if not required and not path.is_file():
        return None
    return TokenSpec.from_json(read_json(path), where=str(path)), tokenizer_file(directory)


class SentencePieceFile:
    """A SentencePiece `tokenizer.model`."""

    def __init__(self, path: Path):
        self.path, self.sp = path, spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            if _looks_like_tiktoken(path):
                raise UserError(
                    f"{path}: Meta's Llama 3 tokenizer (a tiktoken file), which limajax does not "
                    f"read; use the model's Hugging Face {HF_TOKENIZER_FILE} instead (e.g. "
                    "--tokenizer PATH/tokenizer.json, from the model's Hugging Face repository)"
                ) from None
            raise UserError(f"{path}: not a SentencePiece model ({e})") from None
        self.size, self.unk_id = self.sp.vocab_size(), self.sp.unk_id()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def piece_id(self, text: str) -> int | None:
        i = self.sp.piece_to_id(text)
        return None if i == self.unk_id and text != self.piece(self.unk_id) else i

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def fast(self) -> tokenizers.Tokenizer:
        """The same tokenizer as a Hugging Face `tokenizer.json` (what transformers, vLLM and TGI
        load without sentencepiece or protobuf), built from the model's own pieces, scores and
        normalizer spec, as transformers' LlamaConverter does. The dummy-prefix space goes before
        every text between special tokens, as SentencePiece puts it before each utterance
        limajax encodes on its own (LIMA §3's format), so a chat template adds no spaces."""
        proto = sp_model_pb2.ModelProto()
        proto.ParseFromString(self.path.read_bytes())
        trainer, norm = proto.trainer_spec, proto.normalizer_spec
        unk = proto.pieces[trainer.unk_id].piece
        if trainer.model_type == trainer.BPE:
            vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
            model = tokenizers.models.BPE(vocab, _merges(proto, vocab), unk_token=unk,
                                          fuse_unk=True, byte_fallback=trainer.byte_fallback)
        elif trainer.model_type == trainer.UNIGRAM:
            model = tokenizers.models.Unigram([(p.piece, p.score) for p in proto.pieces],
                                              trainer.unk_id, byte_fallback=trainer.byte_fallback)
        else:
            raise UserError(f"{self.path}: a SentencePiece model of type "
                            f"{trainer.ModelType.Name(trainer.model_type)}; only BPE and unigram "
                            "models can be written as tokenizer.json")
        tok = tokenizers.Tokenizer(model)
        n = tokenizers.normalizers
        steps = [n.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
        if norm.remove_extra_whitespaces:  # SentencePiece strips spaces only, not newlines;
            # \A and \z: in tokenizers' regexes (Oniguruma) ^ and $ match at every line end
            steps += [n.Replace(tokenizers.Regex(r"\A +| +\z"), ""),
                      n.Replace(tokenizers.Regex(" {2,}"), " ")]
        # The dummy prefix as a normalizer, not Metaspace: Metaspace skips a text that already
        # starts with a space, SentencePiece does not.
        steps += [n.Prepend("\u2581")] if norm.add_dummy_prefix else []
        tok.normalizer = n.Sequence(steps + [n.Replace(" ", "\u2581")])
        tok.decoder = tokenizers.decoders.Sequence([
            tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(),
            tokenizers.decoders.Fuse()] + ([tokenizers.decoders.Strip(" ", 1, 0)]
                                           if norm.add_dummy_prefix else []))
        specials = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)]
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in specials])
        bos = self.piece(self.bos_id) if self.bos_id >= 0 else None
        if bos:  # BOS first, as LlamaTokenizer's add_bos_token
            tok.post_processor = tokenizers.processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)])
        return tok


def _merges(proto, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """A SentencePiece BPE model's merges in the order it applies them: every split of a piece
    into two pieces, ranked by the merged piece's score (transformers' SentencePieceExtractor)."""
    scored = []
    for p in proto.pieces:
        splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))
                  if p.piece[:k] in vocab and p.piece[k:] in vocab]
        scored += [(p.score, vocab[a], vocab[b], a, b) for a, b in splits]
    scored.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(a, b) for *_, a, b in scored]


class HFTokenizerFile:
    """A Hugging Face `tokenizer.json` (Llama 3's format), read with the `tokenizers` library.
    BOS and EOS come from a `tokenizer_config.json` beside it, else Llama 3's names."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise UserError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        self.size = self.tok.get_vocab_size(with_added_tokens=True)
        self.unk_id = None
        config = path.with_name("tokenizer_config.json")
        names = read_json(config) if config.is_file() else {}
        self.bos_id = self._special(names.get("bos_token"), "<|begin_of_text|>", "<s>")
        self.eos_id = self._special(names.get("eos_token"), "<|end_of_text|>", "</s>")

    def _special(self, named, *defaults: str) -> int:
        named = named.get("content") if isinstance(named, dict) else named
        for text in ([named] if named else []) + list(defaults):
            i = self.piece_id(text)
            if i is not None:
                return i
        raise UserError(f"{self.path}: cannot tell its BOS/EOS token (none of "
                        f"{', '.join(defaults)}; add a tokenizer_config.json naming them)")

    def piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def piece_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _looks_like_tiktoken(path: Path) -> bool:
    """tiktoken's format: one `base64-bytes rank` pair per line."""
    with path.open("rb") as f:
        first = f.readline(200)
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\s*", first) is not None


def tokenizer_file(directory: str | Path) -> Path | None:
    """A directory's tokenizer file (tokenizer.model, else tokenizer.json), or None."""
    for name in TOKENIZER_FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def stored_name(path: str | Path) -> str:
    """The name a tokenizer file takes in a model directory or an export."""
    return HF_TOKENIZER_FILE if Path(path).suffix == ".json" else TOKENIZER_FILE


def load_pieces(path: str | Path) -> SentencePieceFile | HFTokenizerFile:
    """The tokenizer file at `path`: tokenizer.json is Hugging Face's, anything else
    SentencePiece."""
    path = Path(path)
    return HFTokenizerFile(path) if stored_name(path) == HF_TOKENIZER_FILE else \
        SentencePieceFile(path)


def vocab_with_eot(base_vocab: int, eot_id: int | None) -> int:
    """Ids a model knows: its base vocabulary, plus LIMA's EOT where that is a new id past it
    (LIMA §3); Llama 3's own <|eot_id|> adds none."""
    return base_vocab if eot_id is None else max(base_vocab, eot_id + 1)


def eot_id_for(pieces: SentencePieceFile | HFTokenizerFile, base_vocab: int) -> int:
    """LIMA's EOT for a model whose tokenizer is `pieces` and whose weights have `base_vocab`
    rows: the tokenizer's own end-of-turn token (Llama 3's <|eot_id|>), else a new id past the
    base vocabulary (LIMA §3)."""
    own = pieces.piece_id(EOT_PIECE)
    return own if own is not None and own < base_vocab else base_vocab


def check_fits(pieces: SentencePieceFile | HFTokenizerFile, base_vocab: int, tensor: str) -> None:
    """A tokenizer with more pieces than the weights have rows belongs to another model."""
    if pieces.size > base_vocab:
        raise UserError(f"{pieces.path}: the tokenizer has {pieces.size} pieces but {tensor} has "
                        f"only {base_vocab} rows (wrong tokenizer for these weights?)")


def prompt_turns(conversations: Sequence[str]) -> Sequence[str]:
    """The turns a prompt is made of: a GAIR row alternates user, assistant, ...; an even count
    ends in an assistant turn (a training or dev row's reference answer), which is left out so
    that the assistant answers next (the model's prompt and the judge's question alike)."""
    return conversations[:len(conversations) - 1 + len(conversations) % 2]


class Encoded(NamedTuple):
    """A dialogue as the model sees it: ids (BOS first), a 0/1 loss mask, and whether it was cut."""

    ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # int32 [n]
    trimmed: bool


class Tokenizer:
    """A tokenizer file and the special ids of the model that uses it."""

    def __init__(self, pieces: SentencePieceFile | HFTokenizerFile, spec: TokenSpec):
        if spec.vocab_size < pieces.size:
            raise UserError(f"{pieces.path}: tokens.json says vocab_size {spec.vocab_size}, but "
                            f"the tokenizer has {pieces.size} pieces")
        self.pieces, self.spec, self.path = pieces, spec, pieces.path

    @classmethod
    def from_path(cls, path: str | Path, spec: TokenSpec | None = None) -> Tokenizer:
        """Load a model directory (tokenizer file + tokens.json) or a bare tokenizer.model or
        tokenizer.json; `spec` overrides the ids found there."""
        path = Path(path)
        file = (tokenizer_file(path) or path / TOKENIZER_FILE) if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"{file}: not found (expected a model directory, a "
                            f"{TOKENIZER_FILE} or a {HF_TOKENIZER_FILE})")
        pieces = load_pieces(file)
        if spec is None and path.is_dir():
            spec, _ = load_from(path)
        elif spec is None:  # a bare tokenizer: its pieces, with LIMA's EOT (LIMA §3)
            n = pieces.size
            return cls(pieces, TokenSpec(pieces.bos_id, pieces.eos_id, None, n, n)).with_eot()
        return cls(pieces, spec)

    def with_eot(self) -> Tokenizer:
        """This tokenizer with EOT added if the model has none (to fine-tune a base model)."""
        if self.eot_id is not None:
            return self
        eot = eot_id_for(self.pieces, self.vocab_size)
        size = vocab_with_eot(self.vocab_size, eot)
        spec = dataclasses.replace(self.spec, eot_id=eot, vocab_size=size,
                                   padded_vocab_size=pad_vocab(size))
        return Tokenizer(self.pieces, spec)

    # One property per TokenSpec field on purpose: a __getattr__ would hide them from checkers.
    @property
    def bos_id(self) -> int:
        return self.spec.bos_id

    @property
    def eos_id(self) -> int:
        return self.spec.eos_id

    @property
    def eot_id(self) -> int | None:
        return self.spec.eot_id

    @property
    def vocab_size(self) -> int:
        """Ids the model knows, EOT included."""
        return self.spec.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.spec.padded_vocab_size

    def encode(self, text: str) -> list[int]:
        """Text -> piece ids, without BOS."""
        return self.pieces.encode_batch([text])[0]

    def decode(self, ids) -> str:
        """Ids -> text; BOS, EOT and ids past the tokenizer's vocabulary are dropped."""
        drop = (self.bos_id, self.eot_id)
        return self.pieces.decode([int(i) for i in ids if 0 <= i < self.pieces.size
                                   and i not in drop])

    def encode_prompt(self, conversations: Sequence[str], raw: bool = False) -> list[int]:
        """The ids an answer continues. Dialogue format (LIMA §3): BOS, every utterance + EOT,
        and the assistant answers next; a trailing assistant turn is left out (prompt_turns).
        `raw`: BOS + the first entry as plain text, for a base model."""
        if raw:
            return [self.bos_id] + self.encode(conversations[0])
        return self.encode_dialogue(prompt_turns(conversations), max_len=sys.maxsize
                                    ).ids.tolist()

    def encode_dialogue(
        self, conversations, max_len: int = MAX_LEN, train_on_prompts: bool = False
    ) -> Encoded:
        """BOS, then each utterance followed by EOT, user first (LIMA §3); cut to `max_len`.

        The loss mask is 1 on assistant tokens and their EOT (so the model learns to stop), 0 on
        user turns and BOS; with `train_on_prompts` it is 1 on everything but BOS.
        """
        if self.eot_id is None:
            raise UserError(f"{self.path}: the model has no EOT token (tokens.json eot_id is null)")
        if isinstance(conversations, str) or not all(isinstance(t, str) for t in conversations):
            raise ValueError("conversations must be a list of strings")
        ids, mask = [self.bos_id], [0]
        for turn, pieces in enumerate(self.pieces.encode_batch(list(conversations))):
            ids += pieces
            ids.append(self.eot_id)
            mask += [1 if train_on_prompts or turn % 2 == 1 else 0] * (len(pieces) + 1)
        trimmed = len(ids) > max_len  # LIMA §3 keeps the beginning of a long text
        return Encoded(
            np.asarray(ids[:max_len], np.int32), np.asarray(mask[:max_len], np.int32), trimmed
        )
