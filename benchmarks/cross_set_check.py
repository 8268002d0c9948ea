"""Cross-set check: a model trained on gz1-dev, scored on gz-kaggle-2000 (spiral vs non_spiral).

    python -m pipeline.predict model_dir=MODEL input=../shared/data/gz-kaggle-2000/labels.csv \\
        image_column=filename output=kaggle_preds.csv mc_dropout_samples=0
    python benchmarks/cross_set_check.py kaggle_preds.csv

The Kaggle labels are a noisy rule (see ../shared/data/README.md): "spiral" needs a disc, visible
arms and Galaxy Zoo 2's "anything odd" vote, so "non_spiral" holds ellipticals, edge-on discs and
many undisturbed spirals, and "spiral" some pairs and mergers. So the score of
interest is how well the model's spiral probability ranks the two (ROC AUC), plus the share of
each Kaggle label the model calls spiral.

    python benchmarks/cross_set_check.py kaggle_preds.csv --gallery /tmp/kaggle

also draws the disagreements to look at (written outside the repository: the images are
Kaggle's): a random sample of the Kaggle non_spirals the model calls spiral, and of the Kaggle
spirals it does not, each thumbnail with the model's p_spiral.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score


def gallery(rows: pd.DataFrame, root: Path, title: str, path: Path, n: int, seed: int) -> None:
    """A grid of ``n`` random galaxies of ``rows`` (their central half), each with p_spiral."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    picks = rows.sample(min(n, len(rows)), random_state=seed)
    cols = 8
    nrows = max(1, -(-len(picks) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(cols * 1.6, nrows * 1.75), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, picks.iterrows(), strict=False):  # spare axes stay blank
        with Image.open(root / row["filename"]) as im:
            side = min(im.size)
            ax.imshow(im.convert("RGB").crop((side // 4, side // 4, side - side // 4,
                                              side - side // 4)))
        ax.set_title(f"p_spiral {row['p_spiral']:.2f}", fontsize=7)
    fig.suptitle(f"{title} ({len(picks)} of {len(rows)}, random)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("--labels", type=Path,
                        default=Path("../shared/data/gz-kaggle-2000/labels.csv"))
    parser.add_argument("--gallery", type=Path, metavar="PREFIX",
                        help="also draw the disagreements into PREFIX-*.png")
    parser.add_argument("--gallery-size", type=int, default=40)
    args = parser.parse_args()
    preds = pd.read_csv(args.predictions)
    labels = pd.read_csv(args.labels)
    # predict carries the input catalog's own columns (filename, label); older outputs named
    # the file in an "image" column only.
    key = "filename" if "filename" in preds.columns else "image"
    df = labels.merge(preds.drop(columns=["label", "split", "GalaxyID"], errors="ignore"),
                      left_on="filename", right_on=key, how="inner")
    is_spiral = df["label"] == "spiral"
    print(f"galaxies scored: {len(df)} ({int(is_spiral.sum())} spiral, "
          f"{int((~is_spiral).sum())} non_spiral)")
    auc = roc_auc_score(is_spiral, df["p_spiral"])
    print(f"ROC AUC of p_spiral for Kaggle 'spiral': {auc:.3f}")
    disc = df["p_spiral"] + df.get("p_edge_on", 0)
    print(f"ROC AUC of p_spiral + p_edge_on (any disc): {roc_auc_score(is_spiral, disc):.3f}")
    called = df["predicted"] == "spiral"
    print(f"called spiral: {called[is_spiral].mean():.1%} of Kaggle spirals, "
          f"{called[~is_spiral].mean():.1%} of Kaggle non_spirals")
    print("predicted classes by Kaggle label:")
    print(pd.crosstab(df["label"], df["predicted"]).to_string())
    if args.gallery:
        args.gallery.parent.mkdir(parents=True, exist_ok=True)
        root = args.labels.parent
        gallery(df[~is_spiral & called], root, "Kaggle non_spiral, called spiral",
                Path(f"{args.gallery}-non_spiral-called-spiral.png"), args.gallery_size, 0)
        gallery(df[is_spiral & ~called], root, "Kaggle spiral, not called spiral",
                Path(f"{args.gallery}-spiral-not-called-spiral.png"), args.gallery_size, 0)


if __name__ == "__main__":
    main()
