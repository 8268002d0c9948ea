"""Is the prior correction's five-value grid the right amount of freedom? Asked on validation.

    python benchmarks/decision_rule.py pipeline/released/gz1-transfer-v5 \\
        pipeline/released/gz1-cnn-v2 --prepared /tmp/gz1c/prepared

Evaluate undoes the training's class weights by one exponent ``alpha`` picked from five values
by validation macro-F1 (``pipeline.inference.fit_prior_correction``). A finer grid, or a free
factor per class, can only fit validation better; whether it decides unseen galaxies better is
measured here without touching test: validation is split in halves (stratified, ``--repeats``
times), each rule is fitted on one half and scored on the other. The test figures of each rule
fitted on all of validation are printed after, for the record, not for choosing.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedShuffleSplit

from pipeline.artifacts import TrainedModel, load_split
from pipeline.inference import (
    PRIOR_CORRECTION_GRID,
    apply_class_factors,
    fit_prior_correction,
    predict_proba,
)


def macro_f1(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    return float(f1_score(labels, predicted, average="macro", labels=list(range(n_classes)),
                          zero_division=0))


def per_class_factors(proba: np.ndarray, labels: np.ndarray) -> list[float]:
    """A free factor for every class but the first (e^-2 to e^2, 41 each), by macro-F1; ties
    go to the mildest. What ``fit_prior_correction`` does with one exponent, unconstrained."""
    k = proba.shape[1]
    logs = np.round(np.arange(-2.0, 2.01, 0.1), 2)
    candidates = [np.exp(np.array([0.0, *free])) for free in itertools.product(logs, repeat=k - 1)]
    best = max(candidates, key=lambda f: (
        round(macro_f1(labels, apply_class_factors(proba, f).argmax(1), k), 9),
        -float(np.abs(np.log(f)).sum())))
    return [float(f) for f in best]


def rules(class_weights: list[float] | None, n_classes: int) -> dict:
    """Each decision rule as a function (validation proba, labels) -> class factors; the alpha
    rules are evaluate's own fit (``fit_prior_correction``) on a given grid."""
    weights = dict(enumerate(class_weights or []))

    def alpha_on(grid):
        return lambda proba, labels: fit_prior_correction(
            proba, labels, weights, n_classes, tuple(grid))["class_factors"]

    return {
        "none": lambda proba, labels: None,
        "alpha, 5 values (committed)": alpha_on(PRIOR_CORRECTION_GRID),
        "alpha, 0 to 1.5 by 0.05": alpha_on(np.round(np.arange(0, 1.501, 0.05), 2)),
        "a factor per class": per_class_factors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="trained or released model folders")
    parser.add_argument("--prepared", type=Path, required=True,
                        help="the prepared folder the models were trained and evaluated on")
    parser.add_argument("--repeats", type=int, default=60, help="random halvings of validation")
    args = parser.parse_args()

    splits = {s: load_split(args.prepared, s) for s in ("val", "test")}
    for folder in args.models:
        bundle = TrainedModel.load(folder)
        inference = bundle.inference
        proba = {s: predict_proba(bundle.model, d["images"].astype(np.float32), inference.tta,
                                  256, None, zoom=inference.tta_zoom) for s, d in splits.items()}
        y_val, y_test = splits["val"]["labels"], splits["test"]["labels"]
        k = bundle.scheme.n_classes
        halves = StratifiedShuffleSplit(n_splits=args.repeats, test_size=0.5, random_state=0)
        print(f"{folder} ({len(y_val)} validation, {len(y_test)} test galaxies, "
              f"{inference.tta} views at {inference.tta_zoom}x)")
        for name, fit in rules(bundle.summary.class_balance_weights, k).items():
            held_out = []
            for on, scored in halves.split(proba["val"], y_val):
                factors = fit(proba["val"][on], y_val[on])
                held_out.append(macro_f1(
                    y_val[scored], apply_class_factors(proba["val"][scored], factors).argmax(1), k))
            predicted = apply_class_factors(proba["test"], fit(proba["val"], y_val)).argmax(1)
            per_class = f1_score(y_test, predicted, average=None, labels=list(range(k)))
            print(f"  {name:28s} validation, other half: {np.mean(held_out):.3f} "
                  f"(s.e. {np.std(held_out) / np.sqrt(len(held_out)):.3f})  |  test: accuracy "
                  f"{np.mean(predicted == y_test):.3f}, macro-F1 "
                  f"{macro_f1(y_test, predicted, k):.3f}, per class "
                  f"{' / '.join(f'{f:.3f}' for f in per_class)}")


if __name__ == "__main__":
    main()
