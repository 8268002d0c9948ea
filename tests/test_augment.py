"""Augmentation transforms: what they do to flux, shape and orientation."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline.augment import augment_copies, blur, rotate, zoom
from pipeline.config import compose, validate


def gaussian_blob(size=48, sx=6.0, sy=2.0, dx=0.0) -> np.ndarray:
    """An elongated Gaussian galaxy on zero sky, as a (1, H, W, 1) batch."""
    y, x = np.indices((size, size), dtype=np.float64)
    c = (size - 1) / 2
    img = np.exp(-0.5 * (((x - c - dx) / sx) ** 2 + ((y - c) / sy) ** 2))
    return img[None, :, :, None].astype(np.float32)


def second_moments(img: np.ndarray) -> tuple[float, float]:
    y, x = np.indices(img.shape)
    total = img.sum()
    cx, cy = (img * x).sum() / total, (img * y).sum() / total
    return float((img * (x - cx) ** 2).sum() / total), float((img * (y - cy) ** 2).sum() / total)


@pytest.mark.parametrize("angle", [17.0, 45.0, 90.0, 133.0])
def test_rotation_keeps_total_flux_within_one_percent(angle):
    blob = gaussian_blob()
    rotated = rotate(blob, angle)
    assert rotated.sum() == pytest.approx(blob.sum(), rel=0.01)


def test_rotation_by_90_degrees_turns_the_long_axis():
    blob = gaussian_blob()
    mxx, myy = second_moments(blob[0, :, :, 0])
    rxx, ryy = second_moments(rotate(blob, 90.0)[0, :, :, 0])
    assert mxx > 4 * myy
    assert ryy == pytest.approx(mxx, rel=0.05)
    assert rxx == pytest.approx(myy, rel=0.1)


def test_blur_widens_a_point_source_and_keeps_its_flux():
    point = np.zeros((1, 33, 33, 1), dtype=np.float32)
    point[0, 16, 16, 0] = 1.0
    blurred = blur(point, 2.0)
    sxx, syy = second_moments(blurred[0, :, :, 0])
    assert blurred.sum() == pytest.approx(1.0, rel=1e-4)
    assert blurred.max() < 0.1
    assert np.sqrt(sxx) == pytest.approx(2.0, rel=0.05)
    assert np.sqrt(syy) == pytest.approx(2.0, rel=0.05)


def test_blur_uses_each_images_own_sigma():
    point = np.zeros((2, 33, 33, 1), dtype=np.float32)
    point[:, 16, 16, 0] = 1.0
    out = blur(point, np.array([0.0, 1.5]))
    np.testing.assert_array_equal(out[0], point[0])
    assert out[1].max() < 0.2


def test_zoom_in_makes_the_galaxy_bigger_by_the_factor():
    blob = gaussian_blob(size=64, sx=4.0, sy=4.0)
    sxx0, _ = second_moments(blob[0, :, :, 0])
    sxx1, _ = second_moments(zoom(blob, 1.5)[0, :, :, 0])
    assert np.sqrt(sxx1 / sxx0) == pytest.approx(1.5, rel=0.05)


def default_augment():
    """conf/augment/default.yaml, as the pipeline reads it."""
    return validate(compose()).augment


def test_random_copies_are_reproducible_bounded_and_different():
    cfg = default_augment()
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (10, 32, 32, 3)).astype(np.float32)
    a, src_a = augment_copies(images, cfg, seed=5)
    b, _ = augment_copies(images, cfg, seed=5)
    c, _ = augment_copies(images, cfg, seed=6)
    assert a.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(src_a, np.tile(np.arange(10), 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_no_copies_when_augmentation_is_off():
    cfg = OmegaConf.merge(default_augment(), {"copies": 0})
    copies, sources = augment_copies(np.zeros((4, 16, 16, 3), np.float32), cfg, seed=0)
    assert copies.shape == (0, 16, 16, 3)
    assert sources.shape == (0,)


def test_random_copies_are_graph_ops_seeded_per_batch():
    """On-the-fly augmentation runs inside tf.data as TensorFlow ops (no numpy_function):
    traced into a graph it draws exactly what it draws eagerly from the same seed."""
    import tensorflow as tf

    from pipeline.augment import random_augment

    cfg = default_augment()
    images = np.random.default_rng(0).uniform(-1, 1, (6, 32, 32, 3)).astype(np.float32)
    graph = tf.function(lambda x, s: random_augment(x, cfg, s))
    eager = np.asarray(random_augment(images, cfg, [3, 7]))
    np.testing.assert_allclose(np.asarray(graph(images, tf.constant([3, 7], tf.int64))), eager,
                               atol=1e-6)
    assert not np.allclose(np.asarray(random_augment(images, cfg, [3, 8])), eager)
    assert "PyFunc" not in {op.type for op in graph.get_concrete_function(
        tf.TensorSpec((None, 32, 32, 3)), tf.TensorSpec((2,), tf.int64)).graph.get_operations()}


def only_photometric(brightness: float, colour: float):
    """The default augmentation with every geometric and blur strength at zero."""
    return OmegaConf.merge(default_augment(), {
        "rotation_degrees": 0, "zoom": 0.0, "crop_fraction": 1.0, "flip": False,
        "blur_sigma": 0.0, "blur_probability": 0.0, "brightness": brightness, "colour": colour})


def three_band_galaxies(n: int = 400) -> np.ndarray:
    """n copies of one galaxy in three bands on black sky (-1), peaking at -0.5."""
    return np.repeat(np.repeat(gaussian_blob(size=32) * 0.5 - 1, 3, axis=3), n, axis=0)


def test_brightness_scales_each_galaxy_above_the_black_sky_by_one_log_normal_factor():
    from pipeline.augment import random_augment

    images = three_band_galaxies()
    out = np.asarray(random_augment(images, only_photometric(0.2, 0.0), [1, 2]))
    lit = images[0] > -0.95
    ratios = (out[:, lit] + 1) / (images[:, lit] + 1)  # (galaxies, lit pixels of all bands)
    # one factor per galaxy, for every pixel and band; the sky stays black
    assert np.ptp(ratios, axis=1).max() < 1e-3
    np.testing.assert_array_equal(out[:, 0, 0, :], -1.0)
    log_factors = np.log(ratios[:, 0])
    assert np.std(log_factors) == pytest.approx(0.2, rel=0.15)
    assert abs(np.mean(log_factors)) < 0.03


def test_colour_scales_each_band_by_its_own_factor_and_zero_strength_changes_nothing():
    from pipeline.augment import random_augment

    images = three_band_galaxies()
    out = np.asarray(random_augment(images, only_photometric(0.0, 0.1), [1, 2]))
    bands = np.log((out[:, 16, 16, :] + 1) / (images[:, 16, 16, :] + 1))  # (galaxies, bands)
    assert np.std(bands, axis=0) == pytest.approx([0.1, 0.1, 0.1], rel=0.15)
    assert abs(np.corrcoef(bands[:, 0], bands[:, 1])[0, 1]) < 0.2  # independent per band
    untouched = np.asarray(random_augment(images, only_photometric(0.0, 0.0), [1, 2]))
    np.testing.assert_array_equal(untouched, images)
