"""Training-set augmentation: rotations, scaling, crops (truncation), flips, blur and
brightness and colour changes, as TensorFlow ops.

Geometry is one affine map per image (rotation x zoom x flip x crop composed into a single
matrix), applied to a whole batch at once by ``keras.ops.image.affine_transform``, so every
copy is interpolated once, not once per transform. Blur is a Gaussian of per-image width: two
depthwise convolutions (the kernel is separable) with the batch folded into the channels.
Random draws are stateless, from a seed per batch. Being graph ops, the same code runs inside
``tf.data`` for on-the-fly augmentation (every core, no Python, no GIL) and eagerly in prepare
for stored copies.
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

# Edges are mirrored, not zero-filled: a galaxy cutout continues into sky, not into a black frame.
FILL_MODE = "reflect"
TRUNCATE = 4.0  # blur kernels reach this many sigmas, as scipy.ndimage.gaussian_filter's do


def affine_matrices(angles_deg, zooms, flips_x, flips_y, shifts, size: tuple[int, int]):
    """Per-image affine maps in Keras' 8-parameter form (output pixel -> input pixel).

    ``zooms`` > 1 magnify (the galaxy looks bigger); ``shifts`` are (dx, dy) in pixels of the
    output frame, used for random crops. NumPy arrays or tensors; returns a float32 tensor.
    """
    from keras import ops

    h, w = size
    cy, cx = (h - 1) / 2, (w - 1) / 2
    theta = ops.deg2rad(ops.cast(angles_deg, "float32"))
    zooms = ops.cast(zooms, "float32")
    shifts = ops.cast(shifts, "float32")
    cos, sin = ops.cos(theta), ops.sin(theta)
    sx = ops.where(flips_x, -1.0, 1.0) / zooms
    sy = ops.where(flips_y, -1.0, 1.0) / zooms
    # input = R(theta) @ diag(sx, sy) @ (out - c - shift) + c
    a0, a1 = cos * sx, -sin * sy
    b0, b1 = sin * sx, cos * sy
    ox, oy = cx + shifts[:, 0], cy + shifts[:, 1]
    a2 = cx - a0 * ox - a1 * oy
    b2 = cy - b0 * ox - b1 * oy
    zeros = ops.zeros_like(a0)
    return ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def transform(images, matrices):
    """Apply one affine map per image with bilinear interpolation (a float32 tensor)."""
    import keras

    return keras.ops.image.affine_transform(
        keras.ops.cast(images, "float32"), matrices, interpolation="bilinear",
        fill_mode=FILL_MODE, data_format="channels_last")


def gaussian_blur(images, sigmas, max_sigma: float):
    """Blur each image by its own sigma (pixels, at most ``max_sigma``); flux is conserved and a
    sigma of 0 leaves the image exactly as it was. Edges are mirrored (edge pixel repeated)."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    if max_sigma <= 0:
        return images
    h, w, c = images.shape[1], images.shape[2], images.shape[3]
    radius = max(1, min(int(TRUNCATE * max_sigma + 0.5), h - 1, w - 1))
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigmas = tf.convert_to_tensor(sigmas, tf.float32)
    kernels = tf.exp(-0.5 * (taps[None, :] / tf.maximum(sigmas, 1e-6)[:, None]) ** 2)
    identity = tf.cast(tf.equal(taps, 0.0), tf.float32)[None, :]
    kernels = tf.where(sigmas[:, None] > 0, kernels, identity)
    kernels = kernels / tf.reduce_sum(kernels, axis=1, keepdims=True)  # (N, taps)
    n = tf.shape(images)[0]
    # (N, H, W, C) -> (1, H, W, N*C): one depthwise filter per image and channel
    folded = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, h, w, n * c])
    per_channel = tf.reshape(tf.repeat(kernels, c, axis=0), [n * c, 2 * radius + 1])
    across = tf.reshape(tf.transpose(per_channel), [1, 2 * radius + 1, n * c, 1])
    down = tf.reshape(tf.transpose(per_channel), [2 * radius + 1, 1, n * c, 1])
    padded = tf.pad(folded, [[0, 0], [0, 0], [radius, radius], [0, 0]], mode="SYMMETRIC")
    folded = tf.nn.depthwise_conv2d(padded, across, [1, 1, 1, 1], "VALID")
    padded = tf.pad(folded, [[0, 0], [radius, radius], [0, 0], [0, 0]], mode="SYMMETRIC")
    folded = tf.nn.depthwise_conv2d(padded, down, [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(folded, [h, w, n, c]), [2, 0, 1, 3])


def random_augment(images, cfg: DictConfig, seed):
    """One random augmented copy of each image, drawn from the strengths in ``conf/augment``
    with stateless random ops seeded by ``seed`` (two integers): the same seed, the same copy.
    Returns a float32 tensor in [-1, 1]."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)  # float16 as prepared, or float32
    n = tf.shape(images)[0]
    h, w = images.shape[1], images.shape[2]
    streams = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=9)

    def uniform(k: int, low: float, high: float, shape=None):
        return tf.random.stateless_uniform(shape if shape is not None else [n], streams[k],
                                           low, high)

    angles = uniform(0, -cfg.rotation_degrees, cfg.rotation_degrees)
    zooms = uniform(1, 1 - cfg.zoom, 1 + cfg.zoom)
    flips_x = uniform(2, 0, 1) < (0.5 if cfg.flip else 0.0)
    flips_y = uniform(3, 0, 1) < (0.5 if cfg.flip else 0.0)
    # A random crop of side `crop` resized back is a zoom by 1/crop about a shifted centre.
    crop = uniform(4, cfg.crop_fraction, 1.0)
    zooms = zooms / crop
    max_shift = (1 - crop)[:, None] * tf.constant([w, h], tf.float32) / 2
    shifts = uniform(5, -1, 1, [n, 2]) * max_shift
    out = transform(images, affine_matrices(angles, zooms, flips_x, flips_y, shifts, (h, w)))
    sigmas = tf.where(uniform(6, 0, 1) < cfg.blur_probability,
                      uniform(7, 0, cfg.blur_sigma), 0.0)
    out = gaussian_blur(out, sigmas, float(cfg.blur_sigma))
    if cfg.brightness > 0 or cfg.colour > 0:
        # Log-normal factors, one per image and one per image and band (Dieleman et al. 2015
        # perturbed colour and brightness): the same galaxy imaged deeper, or through another
        # survey's zero points. They scale what lies above the black level (-1), so sky stays.
        draws = tf.random.stateless_normal([n, images.shape[3] + 1], streams[8])
        factors = tf.exp(cfg.brightness * draws[:, :1] + cfg.colour * draws[:, 1:])
        out = (out + 1.0) * factors[:, None, None, :] - 1.0
    return tf.clip_by_value(out, -1.0, 1.0)


def augment_copies(
    images: np.ndarray, cfg: DictConfig, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``cfg.copies`` augmented copies of every image, and the index of each copy's original."""
    copies, sources = [], []
    index = np.arange(len(images))
    size = int(cfg.batch_size)
    for copy in range(int(cfg.copies)):
        for start in range(0, len(images), size):
            batch = slice(start, start + size)
            copies.append(np.asarray(random_augment(images[batch], cfg,
                                                    [seed, copy * 1_000_000 + start])))
            sources.append(index[batch])
    if not copies:
        return images[:0].astype(np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(copies), np.concatenate(sources)


# NumPy in, NumPy out: for test-time views, notebooks and tests.
def rotate(images: np.ndarray, angles_deg: np.ndarray | float) -> np.ndarray:
    """Rotate each image about its centre by its angle (degrees, counter-clockwise)."""
    n = len(images)
    angles = np.broadcast_to(np.asarray(angles_deg, dtype=np.float32), (n,))
    false = np.zeros(n, dtype=bool)
    return np.asarray(transform(images, affine_matrices(
        angles, np.ones(n, np.float32), false, false, np.zeros((n, 2), np.float32),
        images.shape[1:3])))


def zoom(images: np.ndarray, factors: np.ndarray | float) -> np.ndarray:
    """Scale each image about its centre (factor > 1 zooms in)."""
    n = len(images)
    factors = np.broadcast_to(np.asarray(factors, dtype=np.float32), (n,))
    false = np.zeros(n, dtype=bool)
    return np.asarray(transform(images, affine_matrices(
        np.zeros(n, np.float32), factors, false, false, np.zeros((n, 2), np.float32),
        images.shape[1:3])))


def blur(images: np.ndarray, sigmas: np.ndarray | float) -> np.ndarray:
    """Gaussian-blur each image by its own sigma (pixels); flux is conserved."""
    sigmas = np.broadcast_to(np.asarray(sigmas, dtype=np.float32), (len(images),))
    return np.asarray(gaussian_blur(images, sigmas, float(sigmas.max(initial=0.0))))
