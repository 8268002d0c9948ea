"""Where a gz1 evaluate's time goes: reading and framing cutouts, and the network's views.

    python benchmarks/evaluate_cost.py models/transfer --catalog data/raw/catalog.csv \\
        --image-column file --images 300

Reads ``--images`` cutouts of the catalog as the model's bundle says (its framing included),
on one thread and on every core, as they are and zoomed 2x (the stress test's reframing), and
times the network's forward pass; then multiplies both out over what ``experiment=gz1``'s
evaluate scores (the validation and test splits, four reframed copies of the test split and
the 2,000 galaxies of ``gz-kaggle-2000``, each at the model's test-time views).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.artifacts import TrainedModel
from pipeline.framing import reframe
from pipeline.inference import TTA_MODES, forward
from pipeline.preprocess import load_images

# experiment=gz1: validation and test read from the prepared arrays; the rest from cutouts.
GZ1_PREPARED = 584 + 585
GZ1_CUTOUTS = {"four reframed test copies": 4 * 585, "gz-kaggle-2000": 2000}


def images_per_s(n: int, run) -> float:
    started = time.perf_counter()
    run()
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a trained, evaluated model folder")
    parser.add_argument("--catalog", type=Path, required=True, help="a CSV naming cutouts")
    parser.add_argument("--image-column", default="file")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    trained = TrainedModel.load(args.model)
    catalog = pd.read_csv(args.catalog)
    paths = [args.catalog.parent / f for f in catalog[args.image_column][:args.images]]
    cores = os.cpu_count() or 1
    reading = {}
    for label, zoom in (("as framed", None), ("zoomed 2x", 2.0)):
        for workers in (1, cores):
            transform = None if zoom is None else (lambda image, z=zoom: reframe(image, zoom=z))
            reading[label, workers] = images_per_s(len(paths), lambda w=workers, t=transform: (
                load_images(paths, trained.preprocessing, progress=False, workers=w, transform=t)))
            print(f"read and frame, {label}, {workers} thread(s): "
                  f"{reading[label, workers]:.1f} cutouts/s", flush=True)
    x = load_images(paths[:args.batch_size], trained.preprocessing, progress=False).images
    x = np.resize(x, (2 * args.batch_size, *x.shape[1:]))
    forward(trained.model, x[:args.batch_size], args.batch_size)  # traced once
    network = images_per_s(len(x), lambda: forward(trained.model, x, args.batch_size))
    views = TTA_MODES[trained.inference.tta]
    print(f"network: {network:.1f} images/s (batch {args.batch_size}); {views} views each "
          f"({trained.inference.tta})")
    cutouts = sum(GZ1_CUTOUTS.values())
    passes = (GZ1_PREPARED + cutouts) * views
    for workers in (1, cores):
        read_s = (GZ1_CUTOUTS["four reframed test copies"] / reading["zoomed 2x", workers]
                  + GZ1_CUTOUTS["gz-kaggle-2000"] / reading["as framed", workers])
        print(f"experiment=gz1 evaluate, reading on {workers} thread(s): about "
              f"{passes / network / 60:.1f} min of network ({passes:,} passes) + "
              f"{read_s / 60:.1f} min of reading {cutouts:,} cutouts")


if __name__ == "__main__":
    main()
