"""Temperature scaling and conformal prediction sets: numbers a user would check."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.calibration import (
    apply_temperature,
    coverage_by_class,
    fit_conformal,
    fit_temperature,
    prediction_sets,
    set_labels,
)


def simulated(n: int, seed: int, sharpness: float = 1.0):
    """Calibrated probabilities (labels drawn from them), then sharpened: over-confident."""
    rng = np.random.default_rng(seed)
    calibrated = rng.dirichlet([0.6, 0.6, 0.6], size=n)
    labels = np.array([rng.choice(3, p=p) for p in calibrated])
    return apply_temperature(calibrated, 1 / sharpness), labels


def log_loss(p, y):
    return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def test_temperature_undoes_over_confidence_without_changing_the_class():
    proba, labels = simulated(4000, 0, sharpness=2.5)
    t = fit_temperature(proba, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    fixed = apply_temperature(proba, t)
    assert log_loss(fixed, labels) < log_loss(proba, labels)
    np.testing.assert_array_equal(fixed.argmax(axis=1), proba.argmax(axis=1))
    np.testing.assert_allclose(fixed.sum(axis=1), 1.0)


def test_conformal_sets_cover_the_true_class_of_each_class_at_the_asked_level():
    val, val_labels = simulated(6000, 1)
    test, test_labels = simulated(30000, 2)
    for level in (0.8, 0.9, 0.95):
        mask = prediction_sets(test, fit_conformal(val, val_labels, level))
        got = coverage_by_class(mask, test_labels, ["a", "b", "c"])
        for c in ("a", "b", "c"):
            assert level - 0.02 <= got[c]["coverage"] <= level + 0.05, (level, c, got[c])
            assert got[c]["mean_set_size"] < 3
        assert mask.sum(axis=1).min() >= 1
    sizes = [prediction_sets(test, fit_conformal(val, val_labels, lv)).sum(axis=1).mean()
             for lv in (0.8, 0.95)]
    assert sizes[0] < sizes[1]  # more coverage costs larger sets


def test_a_set_holds_the_classes_that_reach_their_threshold_and_the_top_one():
    proba = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.05, 0.05, 0.9]])
    mask = prediction_sets(proba, [0.8, 0.2, 0.25])
    assert set_labels(mask, ["elliptical", "spiral", "edge_on"]) == [
        "elliptical|spiral", "elliptical|spiral|edge_on", "edge_on"]
    got = coverage_by_class(mask, np.array([1, 2, 0]), ["elliptical", "spiral", "edge_on"])
    assert got["all"] == {"coverage": 2 / 3, "mean_set_size": 2.0, "galaxies": 3}
    assert fit_conformal(proba, np.array([0, 0, 2]), 0.9)[1] == 0.0  # no spiral to fit on
