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


@pytest.mark.slow
def test_the_ece_before_calibration_is_the_models_own_at_a_small_temperature(
        trained_tiny, tmp_path, monkeypatch, caplog):
    """A validation split the model separates perfectly fits a very small temperature (the
    default mock run's transfer model hits the search's 0.05). The card's ECE before
    calibration must still be the model's own: reading it back from the calibrated values gave
    0.33 for a model at 0.01. The tiny model is less sure than that one, so its temperature is
    set smaller still to show the same loss."""
    import dataclasses
    import shutil
    from pathlib import Path

    from omegaconf import OmegaConf

    from pipeline import evaluate, report
    from pipeline.artifacts import TrainedModel, load_split
    from pipeline.metrics import calibration_bins

    cfg, _ = trained_tiny
    models = tmp_path / "models"
    # A copy: evaluate rewrites the bundle's inference settings.
    shutil.copytree(Path(cfg.paths.models) / "cnn", models / "cnn")
    own = OmegaConf.merge(cfg, {"paths": {"models": str(models),
                                          "reports": str(tmp_path / "reports")}})
    monkeypatch.setattr(evaluate, "fit_temperature", lambda proba, labels: 0.01)
    metrics = evaluate.run(own, "cnn")
    assert "the temperature stopped at its bound 0.01 (searched (0.05, 20.0)): the validation " \
        "split is separated perfectly" in caplog.text
    own.models = {"cnn": cfg.models.cnn}
    report.run(own)
    card = (tmp_path / "reports" / "cards" / "cnn.md").read_text()
    assert "temperature\n0.010, fitted on the validation split" in card
    assert "That temperature is the search's\nlower bound (0.05): the model separates its " \
        "validation split perfectly" in card

    bundle = TrainedModel.load(models / "cnn")
    test = load_split(Path(cfg.paths.prepared), "test")
    as_trained = bundle.with_inference(dataclasses.replace(bundle.inference, temperature=1.0))
    own_proba = as_trained.predict_proba(test["images"].astype(np.float32))
    assert metrics.temperature == 0.01
    assert metrics.ece_before_calibration == pytest.approx(
        calibration_bins(test["labels"], own_proba).ece, abs=1e-6)
    assert metrics.ece == pytest.approx(
        calibration_bins(test["labels"], bundle.predict_proba(
            test["images"].astype(np.float32))).ece, abs=1e-6)
