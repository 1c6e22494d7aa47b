"""LIMA's dialogues: GAIR's JSONL -> a versioned TFDS dataset (ArrayRecord) -> grain -> batches.

    prepare(GAIR_DIR, DATA_DIR)          validate, select subsets, write DATA_DIR/lima/1.0.0/
    Batches(load(DATA_DIR), tokenizer)   packed global batches, epoch after epoch, resumable

gair.py reads and checks the input files (GAIR's schema or another format of
limajax/formats.py); dataset.py is the TFDS builder; batches.py turns dialogues into packed,
bucketed batches (bucketed by config.buckets_for); stats.py reports.
"""

from limajax.data.batches import BATCH_KEYS, Batches, batches_for, steps_per_epoch
from limajax.data.dataset import (
    conversations,
    dataset_dir,
    format_prepared,
    load,
    prepare,
    read_metadata,
    split_names,
)
from limajax.data.gair import (
    SAMPLE_DATA,
    SAMPLE_TOKENIZER,
    PrepareOptions,
    read_gair_dir,
    read_gair_file,
    select,
)
from limajax.data.stats import format_stats, inspect, plot_lengths

# __all__ repeats the imports: it is the package's public surface, which ruff checks (F401).
__all__ = ["BATCH_KEYS", "SAMPLE_DATA", "SAMPLE_TOKENIZER", "Batches", "PrepareOptions",
           "batches_for", "conversations", "dataset_dir", "format_prepared", "format_stats",
           "inspect", "load", "plot_lengths", "prepare", "read_gair_dir", "read_gair_file",
           "read_metadata", "select", "split_names", "steps_per_epoch"]
