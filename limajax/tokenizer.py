"""SentencePiece plus LIMA's end-of-turn token, and dialogue -> ids + loss mask.

LIMA §3 appends a new special token, EOT, to every utterance, user's and assistant's: it ends a
turn (and generation) without the meanings the pretrained EOS carries. The tokenizer has no piece
for it, so it takes the first id past the base vocabulary (32000 for LLaMA); the model's
embedding and output grow by one row for it.

A model directory describes its ids in `tokens.json` (this module owns the format):
    {"bos_id": 1, "eos_id": 2, "eot_id": 32000, "vocab_size": 32001, "padded_vocab_size": 32128}
`vocab_size` counts the ids the model knows (EOT included); `padded_vocab_size` is the row count
of the embedding, rounded up so the vocabulary dimension shards evenly. `eot_id` is null for a
model that has no EOT yet (a converted base model); `Tokenizer.with_eot()` adds it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece as spm

from limajax.config import VOCAB_MULTIPLE
from limajax.errors import UserError
from limajax.files import read_json, write_json

TOKENIZER_FILE = "tokenizer.model"
TOKENS_FILE = "tokens.json"
MAX_LEN = 2048  # LIMA §3: "texts longer than 2048 tokens are trimmed"


def pad_vocab(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The smallest multiple of `multiple` that holds `size` ids."""
    return -(-size // multiple) * multiple


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
    def for_vocab(
        cls, base_vocab_size: int, bos_id: int, eos_id: int, *, eot: bool = True,
        multiple: int = VOCAB_MULTIPLE,
    ) -> TokenSpec:
        """The spec for a SentencePiece vocabulary, with EOT as the next id if `eot` (LIMA §3)."""
        size = base_vocab_size + int(eot)
        eot_id = base_vocab_size if eot else None
        return cls(bos_id, eos_id, eot_id, size, pad_vocab(size, multiple))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

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


def read_tokens_json(path: str | Path) -> TokenSpec:
    """Read a model directory's `tokens.json`; a missing or malformed file is a UserError."""
    return TokenSpec.from_json(read_json(path), where=str(path))


def write_tokens_json(path: str | Path, spec: TokenSpec) -> None:
    write_json(path, spec.to_json())


def load_sentencepiece(path: str | Path) -> spm.SentencePieceProcessor:
    """A SentencePiece model; a file that is not one is a UserError naming it."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path}: not a SentencePiece model ({e})") from None
    return sp


def check_fits(sp: spm.SentencePieceProcessor, path: Path, base_vocab: int, tensor: str) -> None:
    """A tokenizer with more pieces than the weights have rows belongs to another model."""
    if sp.vocab_size() > base_vocab:
        raise UserError(f"{path}: the tokenizer has {sp.vocab_size()} pieces but {tensor} has "
                        f"only {base_vocab} rows (wrong tokenizer for these weights?)")


class Encoded(NamedTuple):
    """A dialogue as the model sees it: ids (BOS first), a 0/1 loss mask, and whether it was cut."""

    ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # int32 [n]
    trimmed: bool


class Tokenizer:
    """A SentencePiece model and the special ids of the model that uses it."""

    def __init__(self, sp: spm.SentencePieceProcessor, spec: TokenSpec, path: Path | None = None):
        if spec.vocab_size < sp.vocab_size():
            raise UserError(
                f"{path or 'tokenizer'}: tokens.json says vocab_size {spec.vocab_size}, but the "
                f"SentencePiece model has {sp.vocab_size()} pieces"
            )
        self.sp, self.spec, self.path = sp, spec, path

    @classmethod
    def from_path(cls, path: str | Path, spec: TokenSpec | None = None) -> Tokenizer:
        """Load a model directory (tokenizer.model + tokens.json) or a bare tokenizer.model;
        `spec` overrides the ids found there."""
        path = Path(path)
        model_file = path / TOKENIZER_FILE if path.is_dir() else path
        if not model_file.is_file():
            raise UserError(
                f"{model_file}: not found (expected a model directory or a {TOKENIZER_FILE})"
            )
        sp = load_sentencepiece(model_file)
        if spec is None and path.is_dir():
            spec = read_tokens_json(path / TOKENS_FILE)
        elif spec is None:  # a bare tokenizer: EOT is the first id past its pieces (LIMA §3)
            spec = TokenSpec.for_vocab(sp.vocab_size(), sp.bos_id(), sp.eos_id())
        return cls(sp, spec, model_file)

    def with_eot(self) -> Tokenizer:
        """This tokenizer with EOT added if the model has none (to fine-tune a base model)."""
        if self.eot_id is not None:
            return self
        size = self.vocab_size + 1
        padded = max(self.spec.padded_vocab_size, size)
        spec = dataclasses.replace(self.spec, eot_id=self.vocab_size, vocab_size=size,
                                   padded_vocab_size=padded)
        return Tokenizer(self.sp, spec, self.path)

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
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Ids -> text; BOS, EOT and ids past the SentencePiece vocabulary are dropped."""
        n = self.sp.vocab_size()
        return self.sp.decode([int(i) for i in ids if 0 <= i < n and i != self.bos_id])

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
        for turn, pieces in enumerate(self.sp.encode(list(conversations))):
            ids += pieces
            ids.append(self.eot_id)
            mask += [1 if train_on_prompts or turn % 2 == 1 else 0] * (len(pieces) + 1)
        trimmed = len(ids) > max_len  # LIMA §3 keeps the beginning of a long text
        return Encoded(
            np.asarray(ids[:max_len], np.int32), np.asarray(mask[:max_len], np.int32), trimmed
        )
