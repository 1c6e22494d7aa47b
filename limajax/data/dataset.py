"""LIMA's dialogues as a versioned TFDS dataset (ArrayRecord, no TensorFlow needed), prepared
from GAIR's files once and read back as random-access sources."""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
from pathlib import Path

import tensorflow_datasets as tfds

from limajax import __version__
from limajax.data.gair import MULTI_TURN, SPLITS, PrepareOptions, read_gair_dir, select
from limajax.errors import UserError
from limajax.files import read_json, staged_dir, write_json


class Lima(tfds.core.GeneratorBasedBuilder):
    """LIMA's dialogues from GAIR's JSONL files (a manual download), stored as ArrayRecord."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "id, conversations, source; unanswered last training turns dropped."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "LIMA is gated on the Hugging Face hub: accept the terms at "
        "https://huggingface.co/datasets/GAIR/lima, download train.jsonl and test.jsonl into a "
        "directory and pass it as the manual directory (`limajax data prepare --input DIR`)."
    )

    def __init__(self, *, options: PrepareOptions | None = None, input_path=None, **kwargs):
        self.options, self.input_path = options or PrepareOptions(), input_path
        # ArrayRecord, because the default tfrecord format needs TensorFlow to write.
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo built by hand: dataset_info_from_configs wants a package directory.
        return tfds.core.DatasetInfo(
            builder=self,
            description="LIMA (Zhou et al. 2023): 1,000 curated prompts and responses, plus "
            "30 multi-turn dialogues, in GAIR's schema.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "conversations": tfds.features.Sequence(tfds.features.Text()),
                "source": tfds.features.Text(),
            }),
            disable_shuffling=True,  # keep the files' order: example i is the i-th row
            homepage="https://huggingface.co/datasets/GAIR/lima",
            license="CC BY-NC-SA, or the source data's stricter license (GAIR/lima card)",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        # The input may be one file (Alpaca's alpaca_data.json), which TFDS's manual_dir is not.
        splits, report = read_gair_dir(self.input_path or dl_manager.manual_dir,
                                       self.options.format,
                                       self.options.template)
        splits, selected = select(splits, self.options)
        self.info.metadata.update(report | selected | {"limajax_version": __version__})
        return {split: self._generate_examples(rows) for split, rows in splits.items()}

    def _generate_examples(self, rows):
        for r in rows:
            yield r.id, {"id": r.id, "conversations": list(r.conversations), "source": r.source}


def prepare(input_dir: str | Path, output_dir: str | Path,
            options: PrepareOptions | None = None) -> dict:
    """Build the dataset into `output_dir` atomically (all or nothing); returns its metadata."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    options = options or PrepareOptions()
    # every input error before any output (data prepare has no --overwrite)
    select(read_gair_dir(input_dir, options.format, options.template)[0], options)
    with staged_dir(output_dir, command="data prepare", overwrite=None) as tmp:
        tfds.disable_progress_bar()
        builder = Lima(data_dir=tmp, options=options, input_path=input_dir)
        with contextlib.redirect_stdout(io.StringIO()):  # tfds prints its own progress lines
            builder.download_and_prepare(
                download_dir=tmp / "downloads",
                download_config=tfds.download.DownloadConfig(manual_dir=str(
                    input_dir if input_dir.is_dir() else input_dir.parent)),
            )
        shutil.rmtree(tmp / "downloads", ignore_errors=True)
        record_checksums(dataset_dir(tmp))
    return dict(builder.info.metadata)


def format_prepared(metadata: dict, output_dir: str | Path) -> str:
    """`data prepare`'s report: the examples per split, each input file, and what was dropped
    or inferred from the training file."""
    lines = [f"prepared {dataset_dir(output_dir)}",
             "  " + ", ".join(f"{k}: {v:,}" for k, v in metadata["examples"].items())]
    lines += [f"  {name}: {i['rows']:,} {i['format']} rows, sha256 {i['sha256']}"
              for name, i in metadata["inputs"].items()]
    [train] = [i for i in metadata["inputs"].values() if i["split"] == "train"]
    if train["trailing_user_turns_dropped"] or train["rows_without_answer"]:
        lines.append(f"  dropped {train['trailing_user_turns_dropped']:,} unanswered last user "
                     f"turns; skipped {train['rows_without_answer']:,} rows left without a turn")
    if train["multi_turn_sources_inferred"]:
        lines.append(f"  {train['multi_turn_sources_inferred']:,} dialogues of more than one "
                     f"exchange without a source: source {MULTI_TURN!r} (GAIR's name for LIMA "
                     "§6's dialogues)")
    return "\n".join(lines)


# The prepared files' sha256, beside what TFDS records (dataset_info.json counts examples and
# bytes per split; ArrayRecord's own chunk hashes fail only when the damaged chunk is read,
# after training has started): every reader checks them first (newcomer trial, issue 17).
CHECKSUMS = "checksums"  # in metadata.json: {file name: sha256}


def _files(version_dir: Path, split: str | None = None) -> list[Path]:
    return sorted(version_dir.glob(f"*-{split or '*'}.array_record-*"))


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # in blocks, not the whole file


def record_checksums(version_dir: Path) -> None:
    metadata = read_json(version_dir / "metadata.json")
    metadata[CHECKSUMS] = {f.name: _sha256(f) for f in _files(version_dir)}
    write_json(version_dir / "metadata.json", metadata)


def check_checksums(version_dir: Path, split: str) -> None:
    """A split's files must be those `prepare` wrote: a corrupted or altered one is named in one
    line before anything reads it. A dataset prepared before checksums were recorded is read
    as it is."""
    recorded = read_metadata(version_dir).get(CHECKSUMS)
    if recorded is None:
        return
    for f in _files(version_dir, split):
        if recorded.get(f.name) != _sha256(f):
            raise UserError(f"{f}: its sha256 is not the one `limajax data prepare` recorded "
                            "in metadata.json (the file is corrupted or was altered); prepare "
                            "the dataset again")
    missing = sorted(n for n in recorded if f"-{split}." in n and not (version_dir / n).is_file())
    if missing:
        raise UserError(f"{version_dir / missing[0]}: missing (`limajax data prepare` wrote it); "
                        "prepare the dataset again")


def dataset_dir(data_dir: str | Path) -> Path:
    """The prepared dataset's version directory inside `data_dir` (or `data_dir` itself)."""
    data_dir = Path(data_dir)
    if (data_dir / "dataset_info.json").is_file():
        return data_dir
    found = sorted(
        (p.parent for p in data_dir.glob("lima/*/dataset_info.json")
         if tfds.core.Version.is_valid(p.parent.name)),
        key=lambda p: tfds.core.Version(p.name),
    )
    if not found:
        raise UserError(f"{data_dir}: no prepared LIMA dataset (run `limajax data prepare`)")
    return found[-1]


def read_metadata(data_dir: str | Path) -> dict:
    """What `prepare` recorded: input checksums, options, examples per split."""
    path = dataset_dir(data_dir) / "metadata.json"
    return read_json(path) if path.is_file() else {}


def split_names(data_dir: str | Path) -> list[str]:
    info = tfds.builder_from_directory(dataset_dir(data_dir)).info
    return [s for s in SPLITS if s in info.splits]


def load(data_dir: str | Path, split: str = "train"):
    """A random-access source of one split's records (dicts of bytes), in the input files' order."""
    builder = tfds.builder_from_directory(dataset_dir(data_dir))
    if split not in builder.info.splits:
        have = ", ".join(builder.info.splits)
        raise UserError(f"{data_dir}: no {split!r} split (it has: {have})")
    check_checksums(dataset_dir(data_dir), split)
    return builder.as_data_source(split=split)


def conversations(record) -> list[str]:
    """A record's turns as text (TFDS gives Text features back as bytes)."""
    return [t.decode("utf-8") if isinstance(t, bytes) else t for t in record["conversations"]]
