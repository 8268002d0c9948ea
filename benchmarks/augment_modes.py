"""Stored augmented copies against on-the-fly augmentation, at equal epochs.

    python benchmarks/augment_modes.py [--per-class 300] [--epochs 10]

Renders a mock data set, prepares it twice (augment.mode=stored with 2 copies, and
augment.mode=on_the_fly), trains the default CNN for the same number of epochs on each with
early stopping off, and prints throughput (images/s from the per-epoch CSV), wall time per
epoch and test accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import evaluate, fetch, prepare, train
from pipeline.config import compose, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        for mode in ("stored", "on_the_fly"):
            cfg = validate(compose([
                f"data.mock.n_per_class={args.per_class}", f"augment.mode={mode}",
                f"train.epochs={args.epochs}", "train.early_stopping_patience=1000",
                "train.reduce_lr_patience=1000", "train.verbose=0",
                f"paths.raw={root / 'raw'}", f"paths.prepared={root / mode / 'prepared'}",
                f"paths.models={root / mode / 'models'}",
                f"paths.reports={root / mode / 'reports'}",
                f"paths.backup={root / mode / 'backup'}"]))
            if not (root / "raw").exists():
                fetch.run(cfg)
            prepare.run(cfg)
            summary = train.run(cfg, "cnn")
            metrics = evaluate.run(cfg, "cnn")
            history = pd.read_csv(Path(cfg.paths.models) / "cnn" / "history.csv")
            rows.append({"mode": mode, "train images per epoch": summary.train_images,
                         "images/s": round(float(history["images_per_s"].iloc[1:].mean()), 1),
                         "s per epoch": round(float(history["epoch_time_s"].iloc[1:].mean()), 2),
                         "test accuracy": round(metrics.accuracy, 3),
                         "test macro-F1": round(metrics.macro_f1, 3)})
    print(json.dumps(rows, indent=1))
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
