"""Training-set augmentation: rotations, scaling, crops (truncation), flips and blur.

Geometry is one affine map per image (rotation x zoom x flip x crop composed into a single
matrix), applied to a whole batch at once by ``keras.ops.image.affine_transform``, so every
copy is interpolated once, not once per transform. Blur is a Gaussian of per-image width,
applied to groups of images that share a (rounded) width by ``scipy.ndimage.gaussian_filter``.
Both work on ``(N, H, W, C)`` arrays; no Python loop touches pixels.
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig
from scipy import ndimage

# Edges are mirrored, not zero-filled: a galaxy cutout continues into sky, not into a black frame.
FILL_MODE = "reflect"
_BLUR_STEP = 0.05  # sigmas are rounded to this (pixels) so that images can be blurred in groups


def affine_matrices(
    angles_deg: np.ndarray,
    zooms: np.ndarray,
    flips_x: np.ndarray,
    flips_y: np.ndarray,
    shifts: np.ndarray,
    size: tuple[int, int],
) -> np.ndarray:
    """Per-image affine maps in Keras' 8-parameter form (output pixel -> input pixel).

    ``zooms`` > 1 magnify (the galaxy looks bigger); ``shifts`` are (dx, dy) in pixels of the
    output frame, used for random crops.
    """
    h, w = size
    cy, cx = (h - 1) / 2, (w - 1) / 2
    theta = np.deg2rad(angles_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    sx = np.where(flips_x, -1.0, 1.0) / zooms
    sy = np.where(flips_y, -1.0, 1.0) / zooms
    # input = R(theta) @ diag(sx, sy) @ (out - c - shift) + c
    a0, a1 = cos * sx, -sin * sy
    b0, b1 = sin * sx, cos * sy
    ox, oy = cx + shifts[:, 0], cy + shifts[:, 1]
    a2 = cx - a0 * ox - a1 * oy
    b2 = cy - b0 * ox - b1 * oy
    zeros = np.zeros_like(a0)
    return np.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1).astype(np.float32)


def transform(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Apply one affine map per image with bilinear interpolation."""
    import keras

    out = keras.ops.image.affine_transform(
        images.astype(np.float32), matrices, interpolation="bilinear", fill_mode=FILL_MODE,
        data_format="channels_last")
    return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)


def rotate(images: np.ndarray, angles_deg: np.ndarray | float) -> np.ndarray:
    """Rotate each image about its centre by its angle (degrees, counter-clockwise)."""
    n = len(images)
    angles = np.broadcast_to(np.asarray(angles_deg, dtype=np.float64), (n,))
    ones, false = np.ones(n), np.zeros(n, dtype=bool)
    return transform(images, affine_matrices(angles, ones, false, false, np.zeros((n, 2)),
                                             images.shape[1:3]))


def zoom(images: np.ndarray, factors: np.ndarray | float) -> np.ndarray:
    """Scale each image about its centre (factor > 1 zooms in)."""
    n = len(images)
    factors = np.broadcast_to(np.asarray(factors, dtype=np.float64), (n,))
    false = np.zeros(n, dtype=bool)
    return transform(images, affine_matrices(np.zeros(n), factors, false, false, np.zeros((n, 2)),
                                             images.shape[1:3]))


def blur(images: np.ndarray, sigmas: np.ndarray | float) -> np.ndarray:
    """Gaussian-blur each image by its own sigma (pixels); flux is conserved."""
    n = len(images)
    sigmas = np.round(np.broadcast_to(np.asarray(sigmas, dtype=np.float64), (n,)) / _BLUR_STEP)
    sigmas = sigmas * _BLUR_STEP
    out = images.astype(np.float32, copy=True)
    for s in np.unique(sigmas[sigmas > 0]):
        group = sigmas == s
        out[group] = ndimage.gaussian_filter(out[group], sigma=(0, s, s, 0), mode=FILL_MODE)
    return out


def random_augment(images: np.ndarray, cfg: DictConfig, rng: np.random.Generator) -> np.ndarray:
    """One random augmented copy of each image, drawn from the strengths in ``conf/augment``."""
    n = len(images)
    h, w = images.shape[1:3]
    angles = rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees, n)
    zooms = rng.uniform(1 - cfg.zoom, 1 + cfg.zoom, n)
    flips_x = rng.random(n) < 0.5 if cfg.flip else np.zeros(n, dtype=bool)
    flips_y = rng.random(n) < 0.5 if cfg.flip else np.zeros(n, dtype=bool)
    # A random crop of side `crop` resized back is a zoom by 1/crop about a shifted centre.
    crop = rng.uniform(cfg.crop_fraction, 1.0, n)
    zooms = zooms / crop
    max_shift = (1 - crop)[:, None] * np.array([w, h]) / 2
    shifts = rng.uniform(-1, 1, (n, 2)) * max_shift
    out = transform(images, affine_matrices(angles, zooms, flips_x, flips_y, shifts, (h, w)))
    sigmas = np.where(rng.random(n) < cfg.blur_probability, rng.uniform(0, cfg.blur_sigma, n), 0)
    out = blur(out, sigmas)
    return np.clip(out, -1.0, 1.0)


def augment_copies(
    images: np.ndarray, cfg: DictConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``cfg.copies`` augmented copies of every image, and the index of each copy's original."""
    rng = np.random.default_rng(seed)
    copies, sources = [], []
    index = np.arange(len(images))
    for _ in range(int(cfg.copies)):
        for start in range(0, len(images), int(cfg.batch_size)):
            batch = slice(start, start + int(cfg.batch_size))
            copies.append(random_augment(images[batch], cfg, rng))
            sources.append(index[batch])
    if not copies:
        return images[:0].astype(np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(copies), np.concatenate(sources)
