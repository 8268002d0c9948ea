"""The expected calibration error and its bins, as the reliability diagram draws them."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics import calibration_bins


def test_an_overconfident_model_has_the_ece_its_bins_say():
    # Always 90% sure, right 60% of the time: one bin, a gap of 0.3.
    proba = np.tile([0.9, 0.1], (10, 1))
    y = np.array([0] * 6 + [1] * 4)
    bins = calibration_bins(y, proba)
    assert bins.ece == pytest.approx(0.3)
    assert bins.counts[9] == 10 and bins.counts.sum() == 10  # bins are [0.9, 1.0], ...
    assert bins.confidence[9] == pytest.approx(0.9)
    assert np.nanmax(bins.accuracy) == pytest.approx(0.6)


def test_a_calibrated_model_has_a_small_ece():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.5, 1.0, 20000)
    y = (rng.uniform(size=p.size) > p).astype(int)  # class 0 is right with probability p
    bins = calibration_bins(y, np.column_stack([p, 1 - p]))
    assert bins.ece < 0.01
    assert np.isnan(bins.accuracy[:5]).all()  # no confidence below 0.5 with two classes
