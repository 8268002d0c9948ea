"""Report helpers: bootstrap intervals and the plain-words overfitting diagnosis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from pipeline.metrics import bootstrap_intervals
from pipeline.report import diagnose_overfitting

CLASSES = ["elliptical", "spiral", "edge_on"]


def predictions(n=300, error_rate=0.2, seed=0):
    rng = np.random.default_rng(seed)
    actual = rng.integers(0, 3, n)
    wrong = rng.random(n) < error_rate
    predicted = np.where(wrong, (actual + rng.integers(1, 3, n)) % 3, actual)
    return pd.DataFrame({"actual": np.array(CLASSES)[actual],
                         "predicted": np.array(CLASSES)[predicted]}), actual, predicted


def test_bootstrap_intervals_bracket_the_sklearn_scores():
    df, y, p = predictions()
    ci = bootstrap_intervals(df, CLASSES, n=2000)
    point = {"accuracy": float((y == p).mean()),
             "balanced_accuracy": balanced_accuracy_score(y, p),
             "macro_f1": f1_score(y, p, average="macro")}
    for key, value in point.items():
        low, high = ci[key]
        assert low < value < high
        assert high - low < 0.15  # 300 galaxies pin an accuracy of 0.8 to about +-0.05
        assert (low + high) / 2 == pytest.approx(value, abs=0.02)


def test_bootstrap_of_a_perfect_classifier_is_exactly_one():
    df, *_ = predictions(error_rate=0.0)
    assert bootstrap_intervals(df, CLASSES)["macro_f1"] == [1.0, 1.0]


def history(train, val):
    return pd.DataFrame({"epoch": range(1, len(train) + 1), "loss": train, "val_loss": val,
                         "accuracy": [0.95] * len(train)})


def test_diagnosis_names_overfitting_when_validation_loss_turns_up():
    h = history([0.9, 0.5, 0.3, 0.2, 0.1, 0.05], [0.9, 0.6, 0.4, 0.5, 0.6, 0.8])
    assert diagnose_overfitting(h, 3).startswith("the model began to overfit after epoch 3")


def test_diagnosis_is_calm_when_curves_stay_together():
    h = history([0.9, 0.5, 0.3, 0.2], [0.92, 0.52, 0.31, 0.21])
    assert diagnose_overfitting(h, 4).startswith("no sign of overfitting")


def test_cards_credit_the_data_and_describe_on_the_fly_augmentation():
    from pipeline.artifacts import PreparedMeta
    from pipeline.config import compose, validate
    from pipeline.report import data_context, source_description

    cfg = validate(compose(["experiment=gz1"]))
    text = source_description(cfg.data)
    assert "catalog `../shared/data/gz1-dev/labels.csv`" in text
    assert "Lintott et al. 2008, 2011" in text
    meta = PreparedMeta(classes=["a", "b"], image_size=144, center_crop=0.35, normalization="",
                        source="folder", splits={}, augmented_copies_per_galaxy=0,
                        augment_mode="on_the_fly")
    described = data_context(cfg, meta)["augment_description"]
    assert described.startswith("fresh random copies in every epoch (on the fly)")
    sdss = validate(compose(["data=sdss"]))
    assert "Galaxy Zoo 1 (Lintott et al. 2008, 2011) at vote fraction >= 0.8" in (
        source_description(sdss.data))


@pytest.mark.slow
def test_a_card_describes_how_its_model_was_trained_not_the_current_params(trained_tiny):
    from omegaconf import OmegaConf

    from pipeline import report

    cfg, _ = trained_tiny
    changed = OmegaConf.merge(cfg, {"train": {"label_smoothing": 0.2, "ema_momentum": 0.9}})
    report.run(changed)
    card = (Path(cfg.paths.reports) / "cards" / "cnn.md").read_text()
    assert "Adam, sparse categorical cross-entropy" in card
    assert "smoothed" not in card and "Polyak" not in card
