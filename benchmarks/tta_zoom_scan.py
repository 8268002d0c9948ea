"""Scan the test-time views (`evaluate.tta`, `evaluate.tta_zoom`) of trained models: validation
and test scores.

    python benchmarks/tta_zoom_scan.py models/transfer --prepared data/prepared \\
        --zooms 1.0 1.08 1.15 1.25 [--average] [--tta dihedral dihedral16]

For every model folder, view set (``--tta``; default the model's own, `tta` in its
inference.json) and zoom, the validation and test images are scored over those views magnified
by the zoom; the prior correction
is re-fitted on the zoomed validation views as the evaluate stage does, and the printed figures
are what evaluate reports with that `evaluate.tta_zoom`. Choose
the zoom by the validation column; the test columns are for the record. ``--average`` also
scores the views of all the given zooms averaged together (a multi-scale test-time view set),
and the last column gives the test macro-F1 at every alpha of the grid, to show what the
validation fit of alpha chose from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.artifacts import PreparedMeta, TrainedModel, load_split
from pipeline.inference import (
    PRIOR_CORRECTION_GRID,
    apply_class_factors,
    fit_prior_correction,
    predict_proba,
)
from pipeline.metrics import classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="folders written by the train stage")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepare stage's output")
    parser.add_argument("--zooms", type=float, nargs="+", default=[1.0, 1.08, 1.15, 1.25])
    parser.add_argument("--average", action="store_true",
                        help="also score the views of all zooms averaged together")
    parser.add_argument("--tta", nargs="+", help="view sets to compare (default: the model's own)")
    args = parser.parse_args()
    scheme = PreparedMeta.load(args.prepared).scheme
    val, test = load_split(args.prepared, "val"), load_split(args.prepared, "test")
    first = scheme.classes[0]
    width = max(len(str(f)) for f in args.models)

    f1_classes = "/".join(scheme.classes)
    print(f"{'model':{width}s} {'views':>10s} {'zoom':>5s} {'alpha':>5s} {'val macro-F1':>12s} "
          f"{'test acc':>8s} {'test macro-F1':>13s} {f'AUC {first} vs rest':>22s}  test F1 "
          f"{f1_classes}  test macro-F1 by alpha "
          f"{' / '.join(str(a) for a in PRIOR_CORRECTION_GRID)}")
    for folder in args.models:
        trained = TrainedModel.load(folder)
        model = trained.model
        # The inverse-frequency weights the correction undoes, as the train stage computed them.
        balance = trained.summary.class_balance_weights
        weights = None if balance is None else dict(enumerate(balance))
        for tta in args.tta or [trained.inference.tta]:
            by_zoom = {zoom: {name: predict_proba(model, split["images"].astype(np.float32),
                                                  tta, zoom=zoom)
                              for name, split in (("val", val), ("test", test))}
                       for zoom in args.zooms}
            if args.average and len(args.zooms) > 1:
                by_zoom["mean"] = {name: np.mean([v[name] for v in by_zoom.values()], axis=0)
                                   for name in ("val", "test")}
            for zoom, views in by_zoom.items():
                decision = fit_prior_correction(views["val"], val["labels"], weights,
                                                scheme.n_classes)
                factors = decision["class_factors"]
                scores = classification_metrics(
                    test["labels"], apply_class_factors(views["test"], factors), scheme)
                val_f1 = classification_metrics(
                    val["labels"], apply_class_factors(views["val"], factors), scheme)["macro_f1"]
                # The same fit run on the test views scores every alpha of the grid there.
                on_test = fit_prior_correction(views["test"], test["labels"], weights,
                                               scheme.n_classes)["validation_macro_f1"]
                by_alpha = " / ".join(f"{f1:.3f}" for f1 in on_test.values())
                by_class = "/".join(f"{scores['per_class'][c]['f1']:.3f}" for c in scheme.classes)
                label = "all" if zoom == "mean" else f"{zoom:.2f}"
                print(f"{folder!s:{width}s} {tta:>10s} {label:>5s} {decision['alpha']:5.2f} "
                      f"{val_f1:12.3f} {scores['accuracy']:8.3f} {scores['macro_f1']:13.3f} "
                      f"{scores['roc_auc_one_vs_rest'][first]:22.3f}  {by_class}  {by_alpha}",
                      flush=True)


if __name__ == "__main__":
    main()
