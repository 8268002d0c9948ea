"""What a model loses when given the other kind of cutout: its FITS test galaxies as JPEGs.

    python benchmarks/kind_mismatch.py models/transfer models/cnn --raw data/raw \\
        --prepared data/prepared --stretch 0.5 2

A model trained on flux (FITS) cutouts, as the default mock pipeline's are, is scored on its
test galaxies twice: as the FITS cutouts it was tested on, and as colour JPEGs made from the
same i, r, g planes by astropy's Lupton et al. (2004) recipe (``make_lupton_rgb``, the recipe
behind SkyServer's JPEGs), at each ``--stretch`` in units of the image's 99th percentile.
``predict`` warns about such inputs; this says how much the warning is worth on these galaxies.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from pipeline.artifacts import TrainedModel, load_split
from pipeline.io import read_image
from pipeline.preprocess import load_images


def lupton_jpeg(fits_path: Path, out: Path, stretch: float, q: float) -> Path:
    """A colour JPEG of a FITS cutout: R, G, B = i, r, g, as SDSS composites are made."""
    from astropy.visualization import make_lupton_rgb

    rgb, _ = read_image(fits_path)  # (H, W, 3) in i, r, g order
    scale = float(np.percentile(rgb, 99))
    with np.errstate(invalid="ignore", divide="ignore"):  # its 0/0 on blank sky is masked
        image = make_lupton_rgb(*np.moveaxis(rgb / scale, -1, 0), minimum=0, stretch=stretch,
                                Q=q)
    Image.fromarray(image).save(out, quality=95)
    return out


def scores(trained: TrainedModel, paths: list[Path], labels: np.ndarray) -> tuple[float, float]:
    loaded = load_images(paths, trained.preprocessing, progress=False)
    predicted = np.full(len(labels), -1)
    predicted[loaded.kept] = trained.predict_proba(loaded.images[loaded.kept]).argmax(axis=1)
    classes = np.arange(trained.scheme.n_classes)
    return (accuracy_score(labels, predicted),
            f1_score(labels, predicted, labels=classes, average="macro", zero_division=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="trained, evaluated model folders")
    parser.add_argument("--raw", type=Path, required=True, help="paths.raw (catalog.csv, FITS)")
    parser.add_argument("--prepared", type=Path, required=True, help="paths.prepared (test split)")
    parser.add_argument("--stretch", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--q", type=float, default=8.0, help="make_lupton_rgb's softening Q")
    args = parser.parse_args()
    test = load_split(args.prepared, "test")
    catalog = pd.read_csv(args.raw / "catalog.csv", dtype={"objid": str}).set_index("objid")
    fits_paths = [args.raw / catalog.loc[str(o), "file"] for o in test["objid"]]
    print(f"{len(fits_paths)} test galaxies from {args.prepared}")
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = {s: [lupton_jpeg(p, Path(tmp) / f"{p.stem}_s{s:g}.jpeg", s, args.q)
                     for p in fits_paths] for s in args.stretch}
        print("| model | input | accuracy | macro-F1 |\n|---|---|---|---|")
        for folder in args.models:
            trained = TrainedModel.load(folder)
            kinds = trained.summary.train_image_kinds
            rows = [("FITS, as tested", fits_paths)] + [
                (f"Lupton JPEG, stretch {s:g} (Q {args.q:g})", jpegs[s]) for s in args.stretch]
            for label, paths in rows:
                accuracy, macro_f1 = scores(trained, paths, test["labels"])
                print(f"| {folder} (trained on {kinds}) | {label} | {accuracy:.3f} | "
                      f"{macro_f1:.3f} |", flush=True)


if __name__ == "__main__":
    main()
