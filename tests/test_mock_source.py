"""The simulated galaxies: bands, profiles, colours, shapes, determinism and the file contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from pipeline import fetch
from pipeline.sources import CATALOG_COLUMNS
from pipeline.sources.mock import render_galaxy


def render_many(label: str, cfg, n: int = 12, **changes) -> list[np.ndarray]:
    mock = cfg.data.mock.copy()
    for k, v in changes.items():
        mock[k] = v
    return [render_galaxy(label, np.random.default_rng([7, i]), mock)[0] for i in range(n)]


def moments(image: np.ndarray) -> tuple[float, float]:
    """Light-weighted axis ratio (minor/major) and concentration (flux within r=3 px / total).

    Only pixels 5 sigma above the sky count, so that isotropic noise does not round the shape.
    """
    img = np.where(image > 5 * np.sqrt(150), image, 0)
    y, x = np.indices(img.shape)
    total = img.sum()
    cx, cy = (img * x).sum() / total, (img * y).sum() / total
    dx, dy = x - cx, y - cy
    cov = np.array([[(img * dx * dx).sum(), (img * dx * dy).sum()],
                    [(img * dx * dy).sum(), (img * dy * dy).sum()]]) / total
    eig = np.linalg.eigvalsh(cov)
    concentration = img[np.hypot(dx, dy) < 3].sum() / total
    return float(np.sqrt(eig[0] / eig[1])), float(concentration)


@pytest.fixture
def bright(tiny_cfg):
    """Bright, star-free galaxies at full size, so shapes are measured without noise dominating."""
    cfg = tiny_cfg.copy()
    cfg.data.mock.size = 64
    cfg.data.mock.flux_range = [2e5, 3e5]
    cfg.data.mock.star_probability = 0.0
    return cfg


def test_cutout_has_three_bands_at_the_configured_size(bright):
    image, truth = render_galaxy("spiral", np.random.default_rng(0), bright.data.mock)
    assert image.shape == (3, 64, 64)
    assert image.dtype == np.float32
    # Sky-subtracted: the background scatters around zero with Poisson noise of the sky level.
    corner = image[1, :8, :8]
    assert abs(float(np.median(corner))) < 3 * np.sqrt(bright.data.mock.sky_counts)
    assert 0.5 * np.sqrt(150) < float(corner.std()) < 2 * np.sqrt(150)
    # Total r-band counts match the drawn brightness within noise and cutout losses.
    assert image[1].sum() == pytest.approx(truth.flux_r, rel=0.15)


def test_ellipticals_are_redder_than_spirals(bright):
    def g_over_r(images):
        return np.median([im[0].sum() / im[1].sum() for im in images])

    assert g_over_r(render_many("elliptical", bright)) < 0.85 * g_over_r(
        render_many("spiral", bright))


def test_de_vaucouleurs_ellipticals_are_more_concentrated_than_discs(bright):
    conc_e = np.median([moments(im[1])[1] for im in render_many("elliptical", bright)])
    conc_s = np.median([moments(im[1])[1] for im in render_many("spiral", bright)])
    assert conc_e > conc_s


def test_edge_on_discs_are_elongated(bright):
    q_edge = np.median([moments(im[1])[0] for im in render_many("edge_on", bright)])
    q_ell = np.median([moments(im[1])[0] for im in render_many("elliptical", bright)])
    assert q_edge < 0.45
    assert q_ell > 0.6


def test_psf_blurs_a_star_to_the_seeing(bright):
    cfg = bright.data.mock.copy()
    cfg.psf_fwhm_jitter = 0.0
    cfg.flux_range = [1e6, 1e6]
    cfg.sky_counts = 1e-6
    # Same galaxy with and without its neighbouring star: the difference is the star, i.e. the PSF.
    with_star = cfg.copy()
    with_star.star_probability = 1.0
    a, truth = render_galaxy("elliptical", np.random.default_rng(3), with_star)
    b, _ = render_galaxy("elliptical", np.random.default_rng(3), cfg)
    assert truth.has_star
    star = (a - b)[1]
    row, col = np.unravel_index(np.argmax(star), star.shape)
    for profile in (star[row, :], star[:, col]):
        fwhm_pix = np.count_nonzero(profile > profile.max() / 2)
        assert fwhm_pix * cfg.pixel_scale == pytest.approx(cfg.psf_fwhm, abs=1.5 * cfg.pixel_scale)


def test_rendering_is_deterministic_from_the_seed(tiny_cfg):
    a, _ = render_galaxy("spiral", np.random.default_rng([42, 5]), tiny_cfg.data.mock)
    b, _ = render_galaxy("spiral", np.random.default_rng([42, 5]), tiny_cfg.data.mock)
    c, _ = render_galaxy("spiral", np.random.default_rng([43, 5]), tiny_cfg.data.mock)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_fetch_writes_the_source_contract(tiny_cfg):
    catalog = fetch.run(tiny_cfg)
    raw = tiny_cfg.paths.raw
    on_disk = pd.read_csv(f"{raw}/catalog.csv")
    assert list(on_disk.columns[:5]) == list(CATALOG_COLUMNS)
    assert on_disk["label"].value_counts().to_dict() == {
        "elliptical": 8, "spiral": 8, "edge_on": 8}
    row = catalog.iloc[3]
    with fits.open(f"{raw}/{row.file}") as hdul:
        assert [h.name for h in hdul[1:]] == ["G", "R", "I"]
        assert hdul["R"].data.shape == (32, 32)
        wcs = WCS(hdul["R"].header)
        centre = wcs.pixel_to_world(15.5, 15.5)
        assert centre.ra.deg == pytest.approx(row.ra, abs=1e-6)
        assert centre.dec.deg == pytest.approx(row.dec, abs=1e-6)
        assert abs(hdul["R"].header["CDELT1"]) * 3600 == pytest.approx(0.396)
        assert hdul[0].header["LABEL"] == row.label


def test_same_seed_fetches_identical_files(tmp_path):
    from tests.conftest import tiny_config

    a = tiny_config(tmp_path / "a")
    b = tiny_config(tmp_path / "b")
    fetch.run(a)
    fetch.run(b)
    with fits.open(f"{a.paths.raw}/images/mock0000004.fits") as fa, \
            fits.open(f"{b.paths.raw}/images/mock0000004.fits") as fb:
        np.testing.assert_array_equal(fa["G"].data, fb["G"].data)
