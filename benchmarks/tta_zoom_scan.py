"""Scan the test-time zoom (`evaluate.tta_zoom`) for trained models: validation and test scores.

    python benchmarks/tta_zoom_scan.py models/transfer --prepared data/prepared \\
        --zooms 1.0 1.08 1.15 1.25

For every model folder and zoom, the validation and test images are scored over the model's
own test-time views (`evaluate.tta` in its saved config) magnified by the zoom; the prior
correction is re-fitted on the zoomed validation views as the train stage would, and the
printed figures are what evaluate would report for a training with that `tta_zoom`. Choose
the zoom by the validation column; the test columns are for the record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from pipeline.evaluate import classification_metrics, load_model
from pipeline.inference import apply_class_factors, fit_prior_correction, predict_proba
from pipeline.labels import LabelScheme
from pipeline.prepare import META_NAME, load_split
from pipeline.train import class_balance_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="folders written by the train stage")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepare stage's output")
    parser.add_argument("--zooms", type=float, nargs="+", default=[1.0, 1.08, 1.15, 1.25])
    args = parser.parse_args()
    meta = json.loads((args.prepared / META_NAME).read_text())
    scheme = LabelScheme.from_names(meta["classes"])
    val, test = load_split(args.prepared, "val"), load_split(args.prepared, "test")
    train_labels = load_split(args.prepared, "train", stream=True)["labels"]
    first = scheme.classes[0]
    width = max(len(str(f)) for f in args.models)
    print(f"{'model':{width}s} {'zoom':>5s} {'alpha':>5s} {'val macro-F1':>12s} {'test acc':>8s} "
          f"{'test macro-F1':>13s} {f'AUC {first} vs rest':>22s}")
    for folder in args.models:
        model = load_model(folder)
        trained = OmegaConf.load(folder / "config.yaml")
        tta = OmegaConf.select(trained, "evaluate.tta", default="none")
        # The inverse-frequency weights the correction undoes, as the train stage computed them.
        weights = class_balance_weights(
            OmegaConf.select(trained, "train.class_weight", default="balanced"), train_labels)
        for zoom in args.zooms:
            views = {name: predict_proba(model, split["images"].astype(np.float32), tta,
                                         zoom=zoom)
                     for name, split in (("val", val), ("test", test))}
            decision = fit_prior_correction(views["val"], val["labels"], weights,
                                            scheme.n_classes)
            factors = decision["class_factors"]
            scores = classification_metrics(
                test["labels"], apply_class_factors(views["test"], factors), scheme)
            val_f1 = classification_metrics(
                val["labels"], apply_class_factors(views["val"], factors), scheme)["macro_f1"]
            print(f"{folder!s:{width}s} {zoom:5.2f} {decision['alpha']:5.2f} {val_f1:12.3f} "
                  f"{scores['accuracy']:8.3f} {scores['macro_f1']:13.3f} "
                  f"{scores['roc_auc_one_vs_rest'][first]:22.3f}", flush=True)


if __name__ == "__main__":
    main()
