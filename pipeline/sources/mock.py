"""Simulated SDSS-like galaxies, rendered from physical profiles so the pipeline runs offline.

Each galaxy is drawn in g, r, i at SDSS's 0.396 arcsec/pixel:

* ellipticals: a de Vaucouleurs (Sersic n = 4) profile with red colours;
* face-on spirals: a small red bulge plus a bluer exponential disc (Sersic n = 1) whose light is
  modulated by logarithmic spiral arms that are bluer still;
* edge-on discs: a thin, steeply inclined exponential disc with a small bulge and, often, a
  dust lane.

Size, ellipticity, position angle and brightness are random. The image is rendered on a finer
grid and binned (so steep Sersic cores are not undersampled), convolved with a Gaussian PSF of
about 1.4 arcsec FWHM, put on a sky background, given Poisson noise, and sky-subtracted, as SDSS
corrected frames are. Now and then a neighbouring star lands in the cutout. Everything follows
from ``seed`` and the galaxy's index, so any one galaxy can be re-rendered alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from omegaconf import MISSING, DictConfig
from tqdm import tqdm

from pipeline.errors import require, within
from pipeline.sources import SourceKind

if TYPE_CHECKING:
    from astropy.wcs import WCS

log = logging.getLogger(__name__)

BANDS = ("g", "r", "i")
MORPHOLOGIES = ("elliptical", "spiral", "edge_on")

# Typical SDSS colours (g-r, r-i) of each component; flux ratios follow as 10**(-0.4 * colour).
COLOURS = {
    "elliptical": (0.80, 0.40),
    "bulge": (0.75, 0.38),
    "disc": (0.50, 0.25),
    "arms": (0.20, 0.05),
    "edge_on_disc": (0.65, 0.32),
}


def band_ratios(g_r: float, r_i: float) -> np.ndarray:
    """Flux in g, r, i relative to r for the given colours."""
    return np.array([10 ** (-0.4 * g_r), 1.0, 10 ** (0.4 * r_i)])


@dataclass
class Galaxy:
    """The truth behind one rendered cutout (written to the catalog)."""

    label: str
    r_eff_arcsec: float
    sersic_n: float
    axis_ratio: float
    theta_deg: float
    flux_r: float
    has_star: bool


def render_galaxy(
    label: str, rng: np.random.Generator, cfg: DictConfig
) -> tuple[np.ndarray, Galaxy]:
    """Render one noisy galaxy as a ``(3, size, size)`` float32 array of g, r, i counts."""
    from astropy.convolution import Gaussian2DKernel, convolve_fft
    from astropy.modeling.models import Sersic2D
    from astropy.nddata import block_reduce
    from astropy.stats import gaussian_fwhm_to_sigma

    size, os_ = int(cfg.size), int(cfg.oversample)
    scale = float(cfg.pixel_scale)
    n_fine = size * os_
    y, x = np.mgrid[0:n_fine, 0:n_fine].astype(np.float64)
    centre = (n_fine - 1) / 2 + rng.normal(0, 0.5 * os_, size=2)
    x0, y0 = centre
    theta = rng.uniform(0, np.pi)
    flux_r = float(np.exp(rng.uniform(*np.log(cfg.flux_range))))

    def sersic(r_eff_arcsec: float, n: float, q: float) -> np.ndarray:
        r_eff = r_eff_arcsec / scale * os_
        model = Sersic2D(amplitude=1.0, r_eff=r_eff, n=n, x_0=x0, y_0=y0, ellip=1 - q, theta=theta)
        img = model(x, y)
        return img / img.sum()

    if label == "elliptical":
        r_eff = rng.uniform(1.5, 4.5)
        q = rng.uniform(0.55, 1.0)
        n = rng.uniform(3.5, 4.5)
        light = sersic(r_eff, n, q)[None] * band_ratios(*COLOURS["elliptical"])[:, None, None]
    elif label == "spiral":
        r_eff = rng.uniform(2.5, 6.5)
        q = rng.uniform(0.6, 1.0)
        n = 1.0
        bulge_frac = rng.uniform(0.1, 0.3)
        disc = sersic(r_eff, 1.0, q)
        bulge = sersic(rng.uniform(0.6, 1.2), 4.0, rng.uniform(0.8, 1.0))
        # Logarithmic spiral arms in the disc plane: the phase of an m-armed pattern winds as
        # ln(r) / tan(pitch); deprojecting by q puts the arms on the inclined disc.
        dx, dy = x - x0, y - y0
        xp = dx * np.cos(theta) + dy * np.sin(theta)
        yp = (-dx * np.sin(theta) + dy * np.cos(theta)) / q
        r = np.hypot(xp, yp) + 1e-3
        phi = np.arctan2(yp, xp) * rng.choice([-1, 1])
        m = rng.choice([2, 2, 3])
        pitch = np.deg2rad(rng.uniform(12, 28))
        r0 = (r_eff / scale * os_) * 0.3
        pattern = np.cos(m * (phi - np.log(r / r0) / np.tan(pitch) - rng.uniform(0, 2 * np.pi)))
        arm_strength = rng.uniform(0.4, 0.9)
        # Arms fade into the bulge, where the pattern would not be resolved.
        arms = disc * arm_strength * np.clip(pattern, 0, None) ** 2 * (1 - np.exp(-(r / r0) ** 2))
        smooth = disc * (1 - arm_strength * 0.5)
        norm = smooth.sum() + arms.sum()
        light = (
            (1 - bulge_frac) * (smooth / norm)[None] * band_ratios(*COLOURS["disc"])[:, None, None]
            + (1 - bulge_frac) * (arms / norm)[None] * band_ratios(*COLOURS["arms"])[:, None, None]
            + bulge_frac * bulge[None] * band_ratios(*COLOURS["bulge"])[:, None, None]
        )
    elif label == "edge_on":
        r_eff = rng.uniform(3.0, 6.5)
        q = rng.uniform(0.08, 0.22)
        n = rng.uniform(0.8, 1.2)
        bulge_frac = rng.uniform(0.05, 0.25)
        disc = sersic(r_eff, n, q)
        if rng.random() < 0.6:  # a dust lane along the mid-plane
            dx, dy = x - x0, y - y0
            height = -dx * np.sin(theta) + dy * np.cos(theta)
            width = max(q * r_eff / scale * os_ * 0.25, 0.5 * os_)
            disc = disc * (1 - rng.uniform(0.4, 0.8) * np.exp(-0.5 * (height / width) ** 2))
            disc /= disc.sum()
        bulge = sersic(rng.uniform(0.6, 1.2), 4.0, rng.uniform(0.6, 0.9))
        disc_colour = band_ratios(*COLOURS["edge_on_disc"])[:, None, None]
        light = ((1 - bulge_frac) * disc[None] * disc_colour
                 + bulge_frac * bulge[None] * band_ratios(*COLOURS["bulge"])[:, None, None])
    else:
        raise ValueError(f"mock source cannot render class {label!r}; it knows {MORPHOLOGIES}")

    light = light * flux_r
    has_star = bool(rng.random() < cfg.star_probability)
    if has_star:
        # A point source away from the galaxy's core; the PSF convolution below shapes it.
        radius = rng.uniform(0.25, 0.45) * n_fine
        angle = rng.uniform(0, 2 * np.pi)
        sx = int(np.clip(x0 + radius * np.cos(angle), 0, n_fine - 1))
        sy = int(np.clip(y0 + radius * np.sin(angle), 0, n_fine - 1))
        star_colour = band_ratios(rng.uniform(0.3, 1.4), rng.uniform(0.1, 0.6))
        light[:, sy, sx] += flux_r * rng.uniform(0.05, 0.6) * star_colour

    binned = block_reduce(light, (1, os_, os_), func=np.sum)
    fwhm_pix = (cfg.psf_fwhm + rng.uniform(-1, 1) * cfg.psf_fwhm_jitter) / scale
    kernel = Gaussian2DKernel(x_stddev=fwhm_pix * gaussian_fwhm_to_sigma)
    blurred = np.stack([convolve_fft(b, kernel, boundary="fill", normalize_kernel=True)
                        for b in binned])
    sky = float(cfg.sky_counts)
    noisy = rng.poisson(np.clip(blurred, 0, None) + sky).astype(np.float32) - sky
    truth = Galaxy(label, float(r_eff), float(n), float(q), float(np.rad2deg(theta)), flux_r,
                   has_star)
    return noisy, truth


def cutout_wcs(ra: float, dec: float, size: int, pixel_scale: float) -> WCS:
    """A north-up TAN WCS centred on the galaxy, like an SDSS cutout's."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]
    w.wcs.cdelt = [-pixel_scale / 3600, pixel_scale / 3600]
    return w


def write_cutout(path: Path, image: np.ndarray, wcs: WCS, meta: dict) -> None:
    """One FITS file per galaxy: an empty primary HDU and one image extension per band."""
    from astropy.io import fits

    primary = fits.PrimaryHDU()
    for key, value in meta.items():
        primary.header[key] = value
    hdus = [primary]
    for band, plane in zip(BANDS, image, strict=True):
        header = wcs.to_header()
        header["FILTER"] = (band, "SDSS filter")
        header["BUNIT"] = ("count", "sky-subtracted counts")
        hdus.append(fits.ImageHDU(plane.astype(np.float32), header=header, name=band.upper()))
    fits.HDUList(hdus).writeto(path, overwrite=True)


def fetch_mock(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    """Render ``data.mock.n_per_class`` galaxies per class into ``out_dir``."""
    mock = cfg.data.mock
    classes = list(cfg.data.classes)
    labels = [c for c in classes for _ in range(int(mock.n_per_class))]
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, label in enumerate(tqdm(labels, desc="render mock galaxies", unit="gal")):
        rng = np.random.default_rng([int(cfg.seed), index])
        image, truth = render_galaxy(label, rng, mock)
        ra, dec = float(rng.uniform(120, 240)), float(rng.uniform(0, 60))
        objid = f"mock{index:07d}"
        rel = f"images/{objid}.fits"
        write_cutout(out_dir / rel, image, cutout_wcs(ra, dec, int(mock.size), mock.pixel_scale),
                     {"OBJID": objid, "LABEL": label, "ORIGIN": "pipeline mock source",
                      "SEED": int(cfg.seed)})
        rows.append({"objid": objid, "ra": ra, "dec": dec, "label": label, "file": rel,
                     "r_eff_arcsec": truth.r_eff_arcsec, "sersic_n": truth.sersic_n,
                     "axis_ratio": truth.axis_ratio, "theta_deg": truth.theta_deg,
                     "flux_r": truth.flux_r, "has_star": truth.has_star})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the source
@dataclass
class MockConfig:
    """``data.mock`` (values and their reasons: ``conf/data/mock.yaml``)."""

    n_per_class: int = MISSING
    size: int = MISSING
    pixel_scale: float = MISSING
    psf_fwhm: float = MISSING
    psf_fwhm_jitter: float = MISSING
    sky_counts: float = MISSING
    flux_range: list[float] = MISSING
    star_probability: float = MISSING
    oversample: int = MISSING


def validate(data: DictConfig) -> None:
    m = data.mock
    unknown = [c for c in data.classes if c not in MORPHOLOGIES]
    require(not unknown, "data.classes", list(data.classes),
            f"classes the mock source can render: {list(MORPHOLOGIES)}")
    require(1 <= m.n_per_class <= 100_000, "data.mock.n_per_class", m.n_per_class,
            "an integer in [1, 100000]")
    require(16 <= m.size <= 1024, "data.mock.size", m.size, "a cutout side in [16, 1024] pixels")
    require(within(m.pixel_scale, 0.01, 10), "data.mock.pixel_scale", m.pixel_scale,
            "arcsec/pixel in [0.01, 10]")
    require(within(m.psf_fwhm, 0.05, 20), "data.mock.psf_fwhm", m.psf_fwhm,
            "arcsec in [0.05, 20]")
    require(within(m.psf_fwhm_jitter, 0, m.psf_fwhm) and m.psf_fwhm_jitter < m.psf_fwhm,
            "data.mock.psf_fwhm_jitter", m.psf_fwhm_jitter,
            f"arcsec in [0, data.mock.psf_fwhm = {m.psf_fwhm}) so the seeing stays positive")
    require(within(m.sky_counts, 0, 1e9), "data.mock.sky_counts", m.sky_counts,
            "counts per pixel in [0, 1e9]")
    require(len(m.flux_range) == 2 and all(within(f, 1e-3, 1e15) for f in m.flux_range)
            and m.flux_range[0] <= m.flux_range[1], "data.mock.flux_range",
            list(m.flux_range), "[low, high] counts with 0 < low <= high")
    require(within(m.star_probability, 0, 1), "data.mock.star_probability", m.star_probability,
            "a probability in [0, 1]")
    require(1 <= m.oversample <= 8, "data.mock.oversample", m.oversample,
            "an integer in [1, 8] (render this many times finer, then bin)")


def describe(data: DictConfig) -> str:
    return ("simulated SDSS-like gri galaxies rendered by the pipeline from Sersic profiles, "
            "with PSF, sky and Poisson noise")


SOURCE = SourceKind("mock", MockConfig, fetch_mock, validate, describe)
