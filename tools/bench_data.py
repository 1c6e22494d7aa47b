"""Time the data path on LIMA's real dialogues: prepare the TFDS dataset, then one epoch of
padded global batches (DESIGN §4; issue 3 asks for seconds, not minutes, on 2 cores).

    python tools/bench_data.py [--input ../shared/fixtures/lima] [--tokenizer ...] [--batch-size 32]
"""

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=FIXTURES / "lima", type=Path)
    parser.add_argument("--tokenizer", default=FIXTURES / "llama_tokenizer" / "tokenizer.model")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="epochs to time (best is reported)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    from limajax import data
    from limajax.tokenizer import Tokenizer

    t_import = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data.prepare(args.input, Path(tmp) / "lima")
        t_prepare = time.perf_counter() - t0

        t0 = time.perf_counter()
        tokenizer = Tokenizer.from_path(args.tokenizer)
        source = data.load(Path(tmp) / "lima", "train")
        t_load = time.perf_counter() - t0

        epochs = []
        for epoch in range(args.repeat):
            batches = data.Batches(source, tokenizer, batch_size=args.batch_size, num_epochs=1,
                                   seed=epoch, process_index=0, process_count=1)
            t0 = time.perf_counter()
            shapes, tokens, targets = Counter(), 0, 0.0
            for batch in batches:
                shapes[batch["inputs"].shape] += 1
                tokens += batch["inputs"].size
                targets += float(batch["loss_mask"].sum())
            epochs.append(time.perf_counter() - t0)

    best = min(epochs)
    print(f"examples: {len(source):,}; batches per epoch: {batches.steps_per_epoch} of "
          f"{args.batch_size}; shapes: {dict(shapes)}")
    print(f"padded tokens per epoch: {tokens:,}; loss-carrying targets: {int(targets):,}")
    print(f"import limajax.data + tokenizer: {t_import:.2f} s")
    print(f"prepare (validate + write ArrayRecord): {t_prepare:.2f} s")
    print(f"load tokenizer + data source: {t_load:.2f} s")
    print(f"one epoch of padded batches: {best:.2f} s best of {args.repeat} "
          f"({', '.join(f'{e:.2f}' for e in epochs)}), {tokens / best / 1e6:.1f} M padded tokens/s")
    print(f"prepare + load + one epoch: {t_prepare + t_load + best:.2f} s")


if __name__ == "__main__":
    main()
