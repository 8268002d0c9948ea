"""Eight test-time views against sixteen (`evaluate.tta=dihedral16`) for trained models.

    python benchmarks/tta_rotation_scan.py models/transfer --prepared data/prepared

For every model folder: the validation and test images are scored over the 8 dihedral views,
over the 8 dihedral views of the images turned by 45 degrees, and over all 16, each magnified by
the model's own ``tta_zoom``; the prior correction is re-fitted on each view set's validation
predictions as evaluate fits it. Choose by the validation column; the test columns are for the
record.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipeline.artifacts import PreparedMeta, TrainedModel, load_split
from pipeline.augment import rotate
from pipeline.inference import apply_class_factors, fit_prior_correction, predict_proba
from pipeline.metrics import classification_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="folders written by the train stage")
    parser.add_argument("--prepared", type=Path, required=True, help="the prepare stage's output")
    parser.add_argument("--spiral-class", default="spiral", help="the class whose F1 is printed")
    args = parser.parse_args()
    scheme = PreparedMeta.load(args.prepared).scheme
    val, test = load_split(args.prepared, "val"), load_split(args.prepared, "test")
    for folder in args.models:
        trained = TrainedModel.load(folder)
        balance = trained.summary.class_balance_weights
        weights = None if balance is None else dict(enumerate(balance))
        zoom = trained.inference.tta_zoom
        views = {}
        for name, split in (("val", val), ("test", test)):
            x = split["images"].astype(np.float32)
            plain = predict_proba(trained.model, x, "dihedral", zoom=zoom)
            turned = predict_proba(trained.model, rotate(x, 45.0), "dihedral", zoom=zoom)
            views[name] = {"8": plain, "8 at 45 deg": turned, "16": (plain + turned) / 2}
        for key in ("8", "8 at 45 deg", "16"):
            fit = fit_prior_correction(views["val"][key], val["labels"], weights,
                                       scheme.n_classes)
            scores = {name: classification_metrics(
                split["labels"], apply_class_factors(views[name][key], fit["class_factors"]),
                scheme) for name, split in (("val", val), ("test", test))}
            c = args.spiral_class
            print(f"{folder} views {key:11s} alpha {fit['alpha']:.2f} "
                  f"val macro-F1 {scores['val']['macro_f1']:.4f} {c} "
                  f"{scores['val']['per_class'][c]['f1']:.3f} | test accuracy "
                  f"{scores['test']['accuracy']:.3f} macro-F1 {scores['test']['macro_f1']:.3f} "
                  f"{c} {scores['test']['per_class'][c]['f1']:.3f}", flush=True)


if __name__ == "__main__":
    main()
