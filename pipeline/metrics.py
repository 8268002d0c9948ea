"""Scores of a classifier on labelled galaxies: one place for what evaluate computes, the
cards report and the plots draw.

* :func:`classification_metrics`: accuracy, balanced accuracy, macro-F1, per-class
  precision/recall/F1, ROC AUC (macro and one class against the rest), log loss, confusion
  matrix (scikit-learn);
* :func:`calibration_bins` and the expected calibration error (Guo et al. 2017);
* :func:`bootstrap_intervals`: 95% percentile-bootstrap intervals over test galaxies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.labels import LabelScheme

BOOTSTRAP_N = 1000


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, scheme: LabelScheme) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class P/R/F1, ROC AUC and confusion matrix."""
    from sklearn import metrics

    y_pred = proba.argmax(axis=1)
    labels = list(range(scheme.n_classes))
    report = metrics.classification_report(y_true, y_pred, labels=labels,
                                           target_names=list(scheme.classes), output_dict=True,
                                           zero_division=0)
    try:
        auc = float(metrics.roc_auc_score(y_true, proba, multi_class="ovr", average="macro",
                                          labels=labels))
    except ValueError:  # a class absent from the test split
        auc = None
    # One class against all others, e.g. elliptical against disc (spiral + edge-on).
    auc_per_class = {}
    for k, c in enumerate(scheme.classes):
        positives = y_true == k
        if 0 < positives.sum() < len(y_true):
            auc_per_class[c] = float(metrics.roc_auc_score(positives, proba[:, k]))
    return {
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "roc_auc_ovr": auc,
        "roc_auc_one_vs_rest": auc_per_class,
        "log_loss": float(metrics.log_loss(y_true, proba, labels=labels)),
        "per_class": {c: {"precision": float(report[c]["precision"]),
                          "recall": float(report[c]["recall"]),
                          "f1": float(report[c]["f1-score"]),
                          "support": int(report[c]["support"])} for c in scheme.classes},
        "confusion_matrix": metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n_test": len(y_true),
    }


@dataclass
class CalibrationBins:
    """Accuracy and mean confidence of the winning class in equal-width confidence bins."""

    edges: np.ndarray
    accuracy: np.ndarray  # NaN in empty bins
    confidence: np.ndarray
    counts: np.ndarray
    ece: float  # bin-size-weighted mean |accuracy - confidence|


def calibration_bins(y_true: np.ndarray, proba: np.ndarray, bins: int = 10) -> CalibrationBins:
    """The reliability diagram's bins and the expected calibration error (ECE, Guo et al.
    2017): a probability of 0.8 should be right 80% of the time."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
        mean_conf = np.bincount(which, weights=confidence, minlength=bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] / len(y_true)
                       * np.abs(accuracy[filled] - mean_conf[filled])))
    return CalibrationBins(edges, accuracy, mean_conf, counts, ece)


def bootstrap_intervals(predictions: pd.DataFrame, classes: list[str], n: int = BOOTSTRAP_N,
                        seed: int = 0) -> dict[str, list[float]]:
    """95% percentile-bootstrap intervals of accuracy, balanced accuracy and macro-F1.

    Computed from one confusion matrix per resample (a bincount) rather than by calling
    scikit-learn's scorers n times: a thousand resamples take milliseconds, and resamples of
    a small test set that miss a class follow sklearn's conventions (balanced accuracy averages
    the classes present; F1 of an empty class is 0) without a warning per resample.
    """
    scheme = LabelScheme.from_names(classes)
    k = scheme.n_classes
    y, p = scheme.encode(predictions["actual"]), scheme.encode(predictions["predicted"])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n, len(y)))
    cells = (y[idx] * k + p[idx]) + (np.arange(n) * k * k)[:, None]
    cm = np.bincount(cells.ravel(), minlength=n * k * k).reshape(n, k, k).astype(float)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    actual, predicted = cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(actual > 0, tp / actual, np.nan)
        f1 = np.where(actual + predicted > 0, 2 * tp / (actual + predicted), 0.0)
    scores = {
        "accuracy": tp.sum(axis=1) / len(y),
        "balanced_accuracy": np.nanmean(recall, axis=1),
        "macro_f1": f1.mean(axis=1),
    }
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
            for name, v in scores.items()}
