"""Framing stress test: how trained models fare on their test galaxies framed otherwise.

    python benchmarks/framing_stress.py --raw data/raw --prepared data/prepared \\
        models/transfer other/models/transfer --zooms 0.5 1 2 4 --pixel-scales 2

Each test galaxy's raw cutout is reframed (zoomed in by cropping its centre, zoomed out by
padding with its own sky, or its field drawn on larger pixels), prepared as each model's own
bundle says (``prepare.framing``: fixed centre crop or the galaxy's measured size) and scored.
Evaluate runs the same test for the model card (``evaluate.framing_zooms``); this script puts
several models side by side, e.g. one trained with each framing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline.artifacts import TrainedModel, load_split
from pipeline.evaluate import framing_stress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="trained, evaluated model folders")
    parser.add_argument("--raw", type=Path, required=True, help="paths.raw of the test galaxies")
    parser.add_argument("--prepared", type=Path, required=True,
                        help="paths.prepared holding the test split")
    parser.add_argument("--zooms", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--pixel-scales", type=float, nargs="*", default=[2.0])
    args = parser.parse_args()
    test = load_split(args.prepared, "test")
    print(f"{len(test['labels'])} test galaxies from {args.prepared}")
    rows = []
    for folder in args.models:
        bundle = TrainedModel.load(folder)
        prep = bundle.preprocessing
        framing = str(prep.get("framing", "fixed"))
        how = (f"galaxy_size {prep.galaxy_radius_fraction}" if framing == "galaxy_size"
               else f"fixed {prep.center_crop}")
        start = time.perf_counter()
        scores = framing_stress(bundle, args.raw, test, args.zooms, args.pixel_scales,
                                bundle.max_image_pixels)
        seconds = time.perf_counter() - start
        for case, v in scores.items():
            rows.append((str(folder), how, case, v["accuracy"], v["macro_f1"], v["skipped"]))
        print(f"{folder}: {seconds:.0f} s")
    print("\n| model | its framing | test galaxies reframed | accuracy | macro-F1 | skipped |")
    print("|---|---|---|---|---|---|")
    for model, how, case, acc, f1, skipped in rows:
        print(f"| {model} | {how} | {case} | {acc:.3f} | {f1:.3f} | {skipped} |")


if __name__ == "__main__":
    main()
