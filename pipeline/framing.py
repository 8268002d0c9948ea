"""Framing: which part of a cutout the model sees, so that every galaxy has one apparent size.

Surveys frame galaxies differently: Galaxy Zoo 1 scaled each field to the galaxy's Petrosian
radius and left it small in a 423-pixel frame; a 0.1″/px DR16 cutout is filled by its galaxy.
A fixed centre crop (``prepare.framing = fixed``, ``prepare.center_crop``) suits only the
framing it was tuned on. ``galaxy_size`` measures the central galaxy's half-light radius on
the image itself (photutils segmentation and Kron photometry) and crops a square around the
centre in which that radius spans ``prepare.galaxy_radius_fraction`` of the half-width,
padding with the frame's own sky where the galaxy is too large for its frame.
``catalog_radius`` does the same with a radius the catalog gives (``prepare.radius_column``,
e.g. SDSS ``petroR90_r`` in arcsec with the cutouts' ``prepare.pixel_scale``). Prepare and
predict both frame through :func:`frame_galaxy`, with the settings saved in the model.
"""

from __future__ import annotations

import numpy as np

from pipeline.io import warnings_as

# Detection thresholds in sky-noise sigmas, tried in turn. At 2 sigmas the central segment of
# a GZ1 cutout often swallows its neighbours, and the radius of a 0.5x copy scattered by 46%
# around the original's; at 8 sigmas by 9% (docs/benchmarks.md, "Any cutout, any framing").
# A faint galaxy with nothing 8 sigmas up is measured at 3.
THRESHOLD_SIGMAS = (8.0, 3.0)
# Measuring on a copy binned to at most this side keeps photutils at ~20 ms per cutout.
MEASURE_SIDE = 256
# Display images are quantised: their sky's MAD is often 0; half a grey level is the floor.
DISPLAY_NOISE_FLOOR = 0.5


class UnmeasuredError(ValueError):
    """No source at the cutout's centre to measure a size on."""


def _bin(gray: np.ndarray, factor: int) -> np.ndarray:
    h, w = (s // factor * factor for s in gray.shape)
    return gray[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def border_pixels(images: np.ndarray, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """The outer frame's pixels of ``images`` along the two image ``axes`` (cutouts are
    centred on their galaxy: the border is sky), gathered on the first of them; the other axes
    (batch, bands) are kept. Prepare's sky level and noise and the framing's detection
    threshold and padding all read the sky here."""
    stack = np.moveaxis(images, axes, (0, 1))
    k = max(2, min(stack.shape[:2]) // 16)
    rest = stack.shape[2:]
    return np.concatenate([stack[:k].reshape(-1, *rest), stack[-k:].reshape(-1, *rest),
                           stack[k:-k, :k].reshape(-1, *rest),
                           stack[k:-k, -k:].reshape(-1, *rest)])


def half_light_radius(image: np.ndarray, display: bool) -> float:
    """The central galaxy's half-light radius in pixels of ``image`` (H, W, bands).

    The bands' mean, binned to at most :data:`MEASURE_SIDE` pixels, is sky-subtracted with the
    border's median, smoothed, and segmented at :data:`THRESHOLD_SIGMAS` times the border's
    noise (the lower one for a faint galaxy); the segment under the centre is the galaxy, and
    photutils' Kron photometry (other segments masked) gives the circle holding half its light.
    """
    from astropy.convolution import convolve
    from astropy.stats import mad_std
    from photutils.segmentation import SourceCatalog, detect_sources, make_2dgaussian_kernel
    from photutils.utils.exceptions import NoDetectionsWarning

    gray = np.asarray(image, dtype=np.float32).mean(axis=2)
    factor = max(1, int(np.ceil(max(gray.shape) / MEASURE_SIDE)))
    if factor > 1:
        gray = _bin(gray, factor)
    edge = border_pixels(gray)
    sky = float(np.median(edge))
    noise = float(mad_std(edge))
    if display:
        noise = max(noise, DISPLAY_NOISE_FLOOR / factor)
    if not np.isfinite(noise) or noise <= 0:
        raise UnmeasuredError("the sky around the galaxy has no measurable noise")
    data = gray - sky
    smoothed = convolve(data, make_2dgaussian_kernel(2.0, size=5))
    cy, cx = (s // 2 for s in gray.shape)
    for sigmas in THRESHOLD_SIGMAS:
        # No detection is an answer: try lower, then give up. (Threads take turns here.)
        with warnings_as("ignore", NoDetectionsWarning):
            segments = detect_sources(smoothed, sigmas * noise, n_pixels=5)
        centre = (segments.data[cy - 1:cy + 2, cx - 1:cx + 2] if segments is not None
                  else np.zeros(1, dtype=int))
        labels = centre[centre > 0]
        if labels.size:
            break
    else:
        raise UnmeasuredError(f"no source {THRESHOLD_SIGMAS[-1]:g} sky sigmas above the sky at "
                              "the cutout's centre")
    source = SourceCatalog(data, segments, convolved_data=smoothed).select_label(
        int(np.bincount(labels).argmax()))
    value = source.flux_radius(0.5)  # a Quantity in pixels
    radius = float(getattr(value, "value", value))
    if not np.isfinite(radius) or radius <= 0:
        raise UnmeasuredError("the central source's half-light radius has no solution")
    return radius * factor


def centred_square(image: np.ndarray, side: int, seed: int = 0) -> np.ndarray:
    """The ``side``-pixel square about the centre; beyond the frame, the frame's own sky.

    Padding draws pixels at random from the border (seeded, so a galaxy's view never depends
    on what else is processed with it): the sky keeps its level, noise and quantisation.
    """
    h, w = image.shape[:2]
    if side <= h and side <= w:
        top, left = (h - side) // 2, (w - side) // 2
        return image[top:top + side, left:left + side]
    edge = border_pixels(image)
    rng = np.random.default_rng(seed)
    canvas = edge[rng.integers(0, len(edge), size=side * side)].reshape(
        side, side, *image.shape[2:]).astype(image.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    src_top, src_left = max(0, -top), max(0, -left)
    dst_top, dst_left = max(0, top), max(0, left)
    ch, cw = min(h - src_top, side), min(w - src_left, side)
    canvas[dst_top:dst_top + ch, dst_left:dst_left + cw] = \
        image[src_top:src_top + ch, src_left:src_left + cw]
    return canvas


def galaxy_view_side(radius: float, fraction: float) -> int:
    """Side of the square in which a ``radius`` spans ``fraction`` of the half-width."""
    return max(8, round(2.0 * radius / fraction))


def frame_galaxy(image: np.ndarray, fraction: float, display: bool,
                 radius: float | None = None) -> tuple[np.ndarray, float]:
    """``image`` cropped (or sky-padded) so its galaxy's radius spans ``fraction`` of the
    half-width, and that radius in pixels: ``radius`` where a catalog gives it, else the
    half-light radius measured on the image (predict reports it beside each galaxy)."""
    if radius is None:
        radius = half_light_radius(image, display)
    elif not (np.isfinite(radius) and radius > 0):
        raise UnmeasuredError(f"the catalog's radius ({radius} pixels) is not a positive number")
    return centred_square(image, galaxy_view_side(radius, fraction)), float(radius)


def reframe(image: np.ndarray, zoom: float = 1.0, resample: float = 1.0, seed: int = 0
            ) -> np.ndarray:
    """The same cutout framed ``zoom`` times tighter (2: the galaxy looks twice as large;
    0.5: sky-padded) and drawn on ``resample`` times as many pixels per side (0.5: pixels twice
    as large): the framing stress test's copies, and a way to see what another survey's
    framing does to a model. Square, ``resample * min(H, W)`` pixels a side."""
    import keras

    n = min(image.shape[:2])
    square = centred_square(image, round(n / zoom), seed).astype(np.float32)
    out_side = max(8, round(n * resample))
    out = keras.ops.image.resize(square[None], (out_side, out_side), interpolation="bilinear",
                                 antialias=True, data_format="channels_last")
    return np.asarray(keras.ops.convert_to_numpy(out)[0], dtype=np.float32)
