"""How well the measured half-light radius follows a galaxy through reframing.

    python benchmarks/framing_radius.py ../shared/data/gz1-dev --galaxies 40 --sigmas 8 3

For each of the first N cutouts of a labelled folder (``labels.csv`` with a ``filename``
column), measures the half-light radius (:func:`pipeline.framing.half_light_radius`) on the
cutout and on copies reframed 0.5x, 2x and 4x, and prints the ratio (copy / original / zoom):
1.0 means the framing step would show the copy exactly like the original. ``--sigmas`` sets the
detection thresholds tried in turn, to compare settings. ``--radius-column`` (with
``--pixel-scale`` for arcsec) also compares the measured radius with a catalog's, e.g. the
mock source's true ``r_eff_arcsec`` (what ``prepare.framing=catalog_radius`` would use):

    python benchmarks/framing_radius.py data/raw --catalog data/raw/catalog.csv \
        --image-column file --radius-column r_eff_arcsec --pixel-scale 0.396 --galaxies 100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import numpy as np
    import pandas as pd

    from pipeline import framing
    from pipeline.io import read_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--galaxies", type=int, default=40)
    parser.add_argument("--zooms", type=float, nargs="*", default=[0.5, 2.0, 4.0])
    parser.add_argument("--sigmas", type=float, nargs="*", default=list(framing.THRESHOLD_SIGMAS))
    parser.add_argument("--catalog", type=Path, help="default: FOLDER/labels.csv")
    parser.add_argument("--image-column", default="filename")
    parser.add_argument("--radius-column", help="a catalog radius to compare with")
    parser.add_argument("--pixel-scale", type=float, help="arcsec per pixel (radius in arcsec)")
    parser.add_argument("--group-column", help="also compare per value of this column (label)")
    args = parser.parse_args()
    framing.THRESHOLD_SIGMAS = tuple(args.sigmas)
    catalog = pd.read_csv(args.catalog or args.folder / "labels.csv").head(args.galaxies)
    files = catalog[args.image_column]
    rows, start = [], time.perf_counter()
    for name in files:
        image, kind = read_image(args.folder / name)
        display = kind != "flux"
        row = {}
        for zoom in [1.0, *args.zooms]:
            copy = image if zoom == 1.0 else np.clip(framing.reframe(image, zoom=zoom, seed=1),
                                                     0, 255 if display else None)
            try:
                row[zoom] = framing.half_light_radius(copy, display)
            except framing.UnmeasuredError:
                row[zoom] = float("nan")
        rows.append(row)
    seconds = time.perf_counter() - start
    table = pd.DataFrame(rows)
    print(f"{len(table)} cutouts, thresholds {args.sigmas} sigmas, "
          f"{seconds / len(table) / (1 + len(args.zooms)) * 1000:.0f} ms per measurement")
    print(f"original radius: median {table[1.0].median():.1f} px, unmeasured "
          f"{int(table[1.0].isna().sum())}")
    print("| zoom | median ratio | mean | std | min | max | unmeasured |")
    print("|---|---|---|---|---|---|---|")
    for zoom in args.zooms:
        ratio = table[zoom] / table[1.0] / zoom
        print(f"| {zoom:g}x | {ratio.median():.2f} | {ratio.mean():.2f} | {ratio.std():.2f} | "
              f"{ratio.min():.2f} | {ratio.max():.2f} | {int(table[zoom].isna().sum())} |")
    if args.radius_column:
        given = catalog[args.radius_column].to_numpy(dtype=float) / (args.pixel_scale or 1.0)
        ratio = table[1.0].to_numpy() / given
        print(f"measured / catalog radius ({args.radius_column}): median {np.nanmedian(ratio):.2f}"
              f", 16-84th percentiles {np.nanpercentile(ratio, 16):.2f}-"
              f"{np.nanpercentile(ratio, 84):.2f}, catalog median {np.median(given):.1f} px")
        if args.group_column:
            for value, rows in catalog.groupby(args.group_column).indices.items():
                print(f"  {value}: median {np.nanmedian(ratio[rows]):.2f}, 16-84th percentiles "
                      f"{np.nanpercentile(ratio[rows], 16):.2f}-"
                      f"{np.nanpercentile(ratio[rows], 84):.2f} ({len(rows)} galaxies)")


if __name__ == "__main__":
    main()
