"""Cross-set check: a model trained on gz1-dev, scored on gz-kaggle-2000 (spiral vs non_spiral).

    python -m pipeline.predict model_dir=MODEL input=../shared/data/gz-kaggle-2000/labels.csv \\
        image_column=filename output=kaggle_preds.csv mc_dropout_samples=0
    python benchmarks/cross_set_check.py kaggle_preds.csv

The Kaggle labels are a noisy rule (see ../shared/data/README.md): "spiral" needs visible arms,
and "non_spiral" holds ellipticals, edge-on discs and some ordinary spirals. So the score of
interest is how well the model's spiral probability ranks the two (ROC AUC), plus the share of
each Kaggle label the model calls spiral.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("--labels", type=Path,
                        default=Path("../shared/data/gz-kaggle-2000/labels.csv"))
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


if __name__ == "__main__":
    main()
