"""Test-time views: the averaged prediction must not depend on how the galaxy was turned."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.inference import TTA_MODES, predict_proba, tta_views


@pytest.fixture(scope="module")
def orientation_sensitive_model():
    """A dense layer on raw pixels: its answer changes whenever the image is turned."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    return model


def test_dihedral_views_are_the_eight_distinct_symmetries():
    image = np.random.default_rng(0).normal(size=(1, 5, 5, 2))
    views = list(tta_views(image, "dihedral"))
    assert len(views) == 8 == TTA_MODES["dihedral"]
    assert len({v.tobytes() for v in views}) == 8
    assert any(np.array_equal(v, image[:, :, ::-1]) for v in views)          # a mirror
    assert any(np.array_equal(v, np.rot90(image, 1, axes=(1, 2))) for v in views)


def test_dihedral16_adds_the_eight_symmetries_of_the_image_turned_45_degrees():
    from pipeline.augment import rotate

    image = np.random.default_rng(0).normal(size=(2, 9, 9, 3)).astype(np.float32)
    views = list(tta_views(image, "dihedral16"))
    assert len(views) == 16 == TTA_MODES["dihedral16"]
    eight = list(tta_views(image, "dihedral"))
    for view, expected in zip(views, eight + list(tta_views(rotate(image, 45.0), "dihedral")),
                              strict=True):
        np.testing.assert_array_equal(view, expected)
    # The 45-degree views really are turned: a bar along x lies along the diagonal.
    bar = np.full((1, 21, 21, 3), -1.0, np.float32)
    bar[:, 10, 3:18] = 1.0
    turned = list(tta_views(bar, "dihedral16"))[8][0, ..., 0]
    assert turned[10, 10] > 0.5 and max(turned[5, 5], turned[5, 15]) > 0 > turned[10, 4]


def test_averaged_prediction_is_the_same_for_a_turned_or_mirrored_galaxy(
        orientation_sensitive_model):
    x = np.random.default_rng(1).uniform(-1, 1, size=(4, 8, 8, 3)).astype(np.float32)
    turned = np.rot90(x, 1, axes=(1, 2)).copy()
    mirrored = x[:, :, ::-1].copy()
    model = orientation_sensitive_model
    plain = predict_proba(model, x, "none")
    assert not np.allclose(plain, predict_proba(model, turned, "none"), atol=1e-3)
    dihedral = predict_proba(model, x, "dihedral")
    np.testing.assert_allclose(dihedral, predict_proba(model, turned, "dihedral"), atol=1e-5)
    np.testing.assert_allclose(dihedral, predict_proba(model, mirrored, "dihedral"), atol=1e-5)
    np.testing.assert_allclose(dihedral.sum(axis=1), 1.0, atol=1e-5)
    # rot4 keeps chirality: invariant to turns, not to mirrors (clockwise vs anticlockwise).
    rot4 = predict_proba(model, x, "rot4")
    np.testing.assert_allclose(rot4, predict_proba(model, turned, "rot4"), atol=1e-5)
    assert not np.allclose(rot4, predict_proba(model, mirrored, "rot4"), atol=1e-3)


def test_zoomed_views_show_the_galaxy_larger_by_the_zoom():
    """evaluate.tta_zoom: a round galaxy's measured radius grows by the magnification."""
    y, x = np.indices((41, 41)) - 20.0
    galaxy = np.exp(-(x ** 2 + y ** 2) / (2 * 4.0 ** 2))
    image = np.repeat(galaxy[None, ..., None], 3, axis=-1).astype(np.float32)

    def radius(view):
        w = view[0, ..., 0]
        return np.sqrt((w * (x ** 2 + y ** 2)).sum() / w.sum() / 2)

    plain = list(tta_views(image, "dihedral"))
    zoomed = list(tta_views(image, "dihedral", zoom=1.5))
    assert len(zoomed) == 8
    assert radius(plain[0]) == pytest.approx(4.0, rel=0.02)
    assert all(radius(v) == pytest.approx(6.0, rel=0.03) for v in zoomed)
    assert np.array_equal(next(tta_views(image, "none", zoom=1.0)), image)


def test_unknown_view_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"tta = 'flips'.*\['none', 'rot4', 'dihedral', "
                                         r"'dihedral16'\]"):
        list(tta_views(np.zeros((1, 4, 4, 3)), "flips"))


def test_prior_correction_undoes_class_weights_when_validation_says_so():
    """A balanced-weight model over-calls the rare class; the fitted correction pulls it back."""
    from sklearn.metrics import f1_score

    from pipeline.inference import apply_class_factors, fit_prior_correction

    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(900, int), np.ones(100, int)]
    # Rare-class probability high for true rare galaxies, but also 0.5-0.7 for many common ones.
    p_rare = np.where(labels == 1, rng.uniform(0.6, 1.0, 1000), rng.uniform(0.0, 0.7, 1000))
    proba = np.c_[1 - p_rare, p_rare]
    weights = {0: 1000 / (2 * 900), 1: 1000 / (2 * 100)}
    decision = fit_prior_correction(proba, labels, weights, 2)
    assert decision["alpha"] > 0
    factors = np.array(decision["class_factors"])
    np.testing.assert_allclose(factors, np.array([weights[0], weights[1]]) ** -decision["alpha"])
    corrected = apply_class_factors(proba, factors)
    np.testing.assert_allclose(corrected.sum(axis=1), 1.0)
    before = f1_score(labels, proba.argmax(1), average="macro")
    after = f1_score(labels, corrected.argmax(1), average="macro")
    assert after > before + 0.05
    assert decision["validation_macro_f1"][str(decision["alpha"])] == pytest.approx(after, abs=1e-4)
    # A one-value grid is a fixed alpha: kept even where validation would pick another.
    fixed = fit_prior_correction(proba, labels, weights, 2, grid=(0.0,))
    assert fixed["alpha"] == 0.0 and fixed["class_factors"] == [1.0, 1.0]
    assert fixed["validation_macro_f1"] == {"0.0": pytest.approx(before, abs=1e-4)}
    # Without class weights there is nothing to undo.
    assert fit_prior_correction(proba, labels, None, 2)["class_factors"] is None
    assert apply_class_factors(proba, None) is proba


def test_batched_forward_pass_equals_model_predict(orientation_sensitive_model):
    """forward() pads the last batch to reuse the traced function; the answers do not change."""
    from pipeline.inference import forward

    model = orientation_sensitive_model
    x = np.random.default_rng(2).uniform(-1, 1, size=(10, 8, 8, 3)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    for batch in (1, 4, 10, 64):
        np.testing.assert_allclose(forward(model, x, batch), expected, atol=1e-6)
    assert forward(model, x[:0], 4).shape == (0, 3)
