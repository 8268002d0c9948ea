"""Figures shared by evaluate and report: learning curves, confusion matrix, ROC curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pipeline.metrics import CalibrationBins


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


def reliability_diagram(bins: CalibrationBins, path: Path, title: str) -> None:
    """Accuracy against confidence of the winning class, per bin (:mod:`pipeline.metrics`)."""
    edges, acc, ece = bins.edges, bins.accuracy, bins.ece
    n_bins = len(acc)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    centres = (edges[:-1] + edges[1:]) / 2
    ax.bar(centres, np.nan_to_num(acc), width=1 / n_bins, edgecolor="k", alpha=0.7,
           label="accuracy in bin")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}\nECE = {ece:.3f}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pr_curves(y_true: np.ndarray, proba: np.ndarray, classes: list[str], path: Path,
              title: str) -> None:
    """One-vs-rest precision-recall curve per class."""
    from sklearn.metrics import PrecisionRecallDisplay

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for k, name in enumerate(classes):
        if 0 < (y_true == k).sum() < len(y_true):
            PrecisionRecallDisplay.from_predictions(y_true == k, proba[:, k], name=name, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def to_display(image: np.ndarray) -> np.ndarray:
    """A [-1, 1] image as [0, 1] RGB for imshow."""
    return np.clip((np.asarray(image, dtype=np.float32) + 1) / 2, 0, 1)


def galaxy_rows(rows: list[tuple[np.ndarray, list[str], str, str]], path: Path, title: str,
                per_row: int, row_height: float) -> None:
    """A grid of galaxies, one row per (images, their titles, title colour, what to say when
    the row is empty), each galaxy as the model sees it."""
    fig, axes = plt.subplots(len(rows), per_row, figsize=(1.9 * per_row, row_height * len(rows)),
                             squeeze=False)
    for r, (images, titles, color, empty) in enumerate(rows):
        if not len(images):
            axes[r, 0].text(0.5, 0.5, empty, ha="center", va="center")
        for c in range(per_row):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(to_display(images[c]), origin="lower")
                ax.set_title(titles[c], fontsize=6.5, color=color)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def example_galaxies(images: np.ndarray, y_true: np.ndarray, proba: np.ndarray,
                     classes: list[str], path: Path, title: str, per_row: int = 6) -> None:
    """Top row: confidently right; bottom row: the most confident mistakes."""
    pred = proba.argmax(axis=1)
    conf = proba.max(axis=1)
    right = np.where(pred == y_true)[0]
    wrong = np.where(pred != y_true)[0]
    rows = []
    for kind, idx, color in (("right", right[np.argsort(-conf[right])][:per_row], "darkgreen"),
                             ("wrong", wrong[np.argsort(-conf[wrong])][:per_row], "darkred")):
        titles = [f"{kind}: true {classes[y_true[i]]}\npred {classes[pred[i]]}\n"
                  + " ".join(f"{n[:4]} {p:.2f}" for n, p in zip(classes, proba[i], strict=True))
                  for i in idx]
        rows.append((images[idx], titles, color, f"no {kind} examples"))
    galaxy_rows(rows, path, title, per_row, row_height=2.3)


def disagreements(rows: list[tuple[str, np.ndarray, np.ndarray]], path: Path, title: str,
                  per_row: int = 6) -> None:
    """One row of galaxies per (caption, images, scores): another sample's labels against the
    model's score."""
    galaxy_rows([(images, [f"{caption}\nscore {v:.2f}" for v in scores], "black",
                  f"no {caption} galaxies") for caption, images, scores in rows],
                path, title, per_row, row_height=2.6)


def first_layer_kernels(kernel: np.ndarray, path: Path, title: str, max_kernels: int = 32
                        ) -> None:
    """First convolution's kernels as small RGB images (as in Dieleman et al. 2015, fig. 6)."""
    k = kernel[..., :max_kernels]  # (h, w, in, out)
    n = k.shape[-1]
    cols = min(8, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows + 0.5), squeeze=False)
    for j, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if j < n:
            w = k[..., j]
            if w.shape[-1] == 1:
                w = np.repeat(w, 3, axis=-1)
            w = (w - w.min()) / (np.ptp(w) or 1.0)
            ax.imshow(w[..., :3], interpolation="nearest", origin="lower")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def saliency_maps(images: np.ndarray, maps: np.ndarray, labels: list[str], path: Path,
                  title: str) -> None:
    """Each galaxy beside |d p(class) / d pixel|, the pixels its prediction is most sensitive to."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.0), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(to_display(images[i]), origin="lower")
        axes[0, i].set_title(labels[i], fontsize=7)
        axes[1, i].imshow(maps[i], origin="lower", cmap="inferno")
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
