"""Prepare speed: the pipeline's batched normalise + augment against a naive per-image loop.

    python benchmarks/prepare_throughput.py [--images 2000] [--size 64]

Both do the same work on the same flux images: an asinh stretch to [-1, 1] with a
sigma-clipped sky, then one augmented copy (rotation, zoom, flip, Gaussian blur). The naive
version calls scipy.ndimage per image and per transform, as one would by hand; the pipeline
uses `pipeline.prepare.normalize_flux` on the whole batch and `pipeline.augment.random_augment`
(one batched affine map per image, grouped blur).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def naive(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from astropy.stats import sigma_clipped_stats

    out = np.empty_like(images)
    for i, img in enumerate(images):
        bands = []
        for b in range(img.shape[-1]):
            _, med, std = sigma_clipped_stats(img[..., b], sigma=3.0, maxiters=5)
            bands.append((img[..., b] - med, std))
        beta = 3.0 * np.mean([s for _, s in bands])
        stretched = np.arcsinh(np.stack([x for x, _ in bands], -1) / beta)
        norm = 2 * np.clip(stretched / np.percentile(stretched, 99.5), 0, 1) - 1
        rotated = ndimage.rotate(norm, rng.uniform(-180, 180), axes=(0, 1), reshape=False,
                                 order=1, mode="reflect")
        z = rng.uniform(0.85, 1.15)
        zoomed = ndimage.affine_transform(
            rotated, [1 / z, 1 / z, 1], offset=[(1 - 1 / z) * (s - 1) / 2 for s in
                                               (img.shape[0], img.shape[1])] + [0],
            order=1, mode="reflect")
        if rng.random() < 0.5:
            zoomed = zoomed[::-1]
        out[i] = ndimage.gaussian_filter(zoomed, (rng.uniform(0, 1), rng.uniform(0, 1), 0))
    return out


def batched(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from pipeline.augment import random_augment
    from pipeline.config import compose, validate
    from pipeline.preprocess import normalize_flux

    cfg = validate(compose()).augment
    norm = normalize_flux(images, 3.0, 99.5)
    seed = int(rng.integers(2**31))
    return np.concatenate([np.asarray(random_augment(norm[s:s + 512], cfg, [seed, s]))
                           for s in range(0, len(norm), 512)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y, x = np.indices((args.size, args.size))
    galaxy = 3000 * np.exp(-np.hypot(x - args.size / 2, y - args.size / 2) / 4)
    images = (galaxy[None, ..., None] * [0.6, 1.0, 1.3]
              + rng.normal(0, 12, (args.images, args.size, args.size, 3))).astype(np.float32)
    batched(images[:64], np.random.default_rng(1))  # warm up (TensorFlow start-up)
    rates = {}
    for name, fn in (("naive per-image loop (scipy.ndimage)", naive),
                     ("pipeline, batched", batched)):
        start = time.perf_counter()
        fn(images, np.random.default_rng(1))
        rates[name] = args.images / (time.perf_counter() - start)
        print(f"{name}: {rates[name]:.0f} images/s")
    values = list(rates.values())
    print(f"speed-up: {values[1] / values[0]:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
