"""Figures shared by evaluate and report: learning curves, confusion matrix, ROC curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def learning_curves(history: pd.DataFrame, best_epoch: int, path: Path, title: str) -> None:
    """Train and validation loss and accuracy per epoch, best epoch and phase changes marked."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(history["epoch"], history[metric], "o-", ms=3, label=f"train {metric}")
        ax.plot(history["epoch"], history[f"val_{metric}"], "s-", ms=3,
                label=f"validation {metric}")
        ax.axvline(best_epoch, color="k", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        if "phase" in history:
            changes = history["epoch"][history["phase"].ne(history["phase"].shift())].iloc[1:]
            for e in changes:
                ax.axvline(e - 0.5, color="grey", ls=":", lw=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(ax=ax, colorbar=False,
                                                                cmap="Blues")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def roc_curves(y_true: np.ndarray, proba: np.ndarray, classes: list[str], path: Path,
               title: str) -> None:
    """One-vs-rest ROC curve per class."""
    from sklearn.metrics import RocCurveDisplay

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for k, name in enumerate(classes):
        if 0 < (y_true == k).sum() < len(y_true):
            RocCurveDisplay.from_predictions(y_true == k, proba[:, k], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
