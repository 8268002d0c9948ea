"""Stage 4, evaluate: score a trained model on the held-out test split.

Writes ``metrics.json`` (for ``dvc metrics show``), ``predictions.csv`` (one row per test
galaxy, for ``dvc plots`` confusion matrices and for the model card) and figures.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pipeline import plots
from pipeline.config import stage_main
from pipeline.errors import MissingInputError, PipelineError
from pipeline.inference import TTA_MODES, predict_proba
from pipeline.io import atomic_path, atomic_write_json, read_json, require_file
from pipeline.labels import LabelScheme
from pipeline.prepare import META_NAME, load_split
from pipeline.train import HISTORY_NAME, MODEL_NAME, SUMMARY_NAME

log = logging.getLogger(__name__)


def load_model(model_dir: Path):
    """Load a saved model with Keras ``safe_mode`` (no arbitrary code from the file runs).

    Not compiled: inference needs no optimizer, and one saved under mixed precision would not
    match a float32 one. A file that is not a Keras model, or one that ``safe_mode`` refuses,
    is an error that names it.
    """
    import zipfile

    import keras

    path = Path(model_dir) / MODEL_NAME
    if not path.is_file():
        raise MissingInputError(f"{path}: no trained model; run the train stage first")
    if not zipfile.is_zipfile(path):
        raise PipelineError(f"{path}: not a Keras model (a .keras file is a zip archive); "
                            "train the model again or point at a folder the train stage wrote")
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as err:  # any failure: the file is not a model this pipeline can use
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "safe_mode" in str(err):
            raise PipelineError(
                f"{path}: refused by Keras safe_mode, because loading it would run code stored "
                f"in the file ({first[:160]}); this pipeline never writes such models, so "
                "use one the train stage wrote") from None
        raise PipelineError(f"{path}: cannot load the model ({type(err).__name__}: "
                            f"{first[:200]}); train it again") from None


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, scheme: LabelScheme) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class P/R/F1, ROC AUC and confusion matrix."""
    from sklearn import metrics

    y_pred = proba.argmax(axis=1)
    labels = list(range(scheme.n_classes))
    report = metrics.classification_report(y_true, y_pred, labels=labels,
                                           target_names=list(scheme.classes), output_dict=True,
                                           zero_division=0)
    try:
        auc = float(metrics.roc_auc_score(y_true, proba, multi_class="ovr", average="macro",
                                          labels=labels))
    except ValueError:  # a class absent from the test split
        auc = None
    # One class against all others, e.g. elliptical against disc (spiral + edge-on).
    auc_per_class = {}
    for k, c in enumerate(scheme.classes):
        positives = y_true == k
        if 0 < positives.sum() < len(y_true):
            auc_per_class[c] = float(metrics.roc_auc_score(positives, proba[:, k]))
    return {
        "accuracy": float(metrics.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "roc_auc_ovr": auc,
        "roc_auc_one_vs_rest": auc_per_class,
        "log_loss": float(metrics.log_loss(y_true, proba, labels=labels)),
        "per_class": {c: {"precision": float(report[c]["precision"]),
                          "recall": float(report[c]["recall"]),
                          "f1": float(report[c]["f1-score"]),
                          "support": int(report[c]["support"])} for c in scheme.classes},
        "confusion_matrix": metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n_test": len(y_true),
    }


def saliency(model, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """|d p(class) / d input|, maximised over channels (Simonyan et al. 2014)."""
    import tensorflow as tf

    x = tf.convert_to_tensor(images, dtype=tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        p = model(x, training=False)
        chosen = tf.gather(p, tf.convert_to_tensor(classes), axis=1, batch_dims=1)
    grads = tape.gradient(chosen, x)
    return tf.reduce_max(tf.abs(grads), axis=-1).numpy()


def first_conv_kernel(model) -> tuple[np.ndarray, str] | None:
    """The first convolution's kernel, searching inside a nested backbone too."""
    import keras

    def walk(layers):
        for layer in layers:
            if isinstance(layer, keras.layers.Conv2D) and not isinstance(
                    layer, keras.layers.DepthwiseConv2D):
                return layer
            if isinstance(layer, keras.Model):
                found = walk(layer.layers)
                if found is not None:
                    return found
        return None

    layer = walk(model.layers)
    if layer is None:
        return None
    return keras.ops.convert_to_numpy(layer.kernel), layer.name


def run(cfg: DictConfig, name: str | None = None) -> dict:
    name = name or cfg.model
    model_dir = Path(cfg.paths.models) / name
    out_dir = Path(cfg.paths.reports) / name
    meta = read_json(Path(cfg.paths.prepared) / META_NAME, "prepare")
    scheme = LabelScheme.from_names(meta["classes"])
    test = load_split(Path(cfg.paths.prepared), "test")
    summary = read_json(model_dir / SUMMARY_NAME, "train")
    history = pd.read_csv(require_file(model_dir / HISTORY_NAME, "train"))
    model = load_model(model_dir)
    decision = summary.get("decision") or {}
    proba = predict_proba(model, test["images"].astype(np.float32), cfg.evaluate.tta,
                          class_factors=decision.get("class_factors"),
                          zoom=float(cfg.evaluate.tta_zoom))
    y = test["labels"]
    result = classification_metrics(y, proba, scheme)

    result.update({
        "model": name,
        "kind": summary["kind"],
        "pretrained": summary["pretrained"],
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs"],
        "train_loss_at_best": summary["train_loss_at_best"],
        "val_loss_at_best": summary["best_val_loss"],
        # Positive and growing gap = the model fits the training set better than unseen data.
        "generalization_gap": summary["best_val_loss"] - summary["train_loss_at_best"],
        "train_wall_time_s": summary["wall_time_s"],
        "tta": cfg.evaluate.tta,
        "tta_views": TTA_MODES[cfg.evaluate.tta],
        "tta_zoom": float(cfg.evaluate.tta_zoom),
        "prior_correction_alpha": decision.get("alpha", 0.0),
        "prior_correction": decision.get("how", "fit"),  # fit, none or a fixed alpha
    })

    predictions = pd.DataFrame({"objid": test["objid"], "actual": scheme.decode(y),
                                "predicted": scheme.decode(proba.argmax(axis=1))})
    for k, c in enumerate(scheme.classes):
        predictions[f"p_{c}"] = proba[:, k]
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "predictions.csv", key="paths.reports") as tmp:
        predictions.to_csv(tmp, index=False)
    classes = list(scheme.classes)
    x_test = test["images"].astype(np.float32)
    with atomic_path(out_dir / "figures", signature="learning_curves.png",
                     key="paths.reports") as tmp:
        tmp.mkdir()
        plots.learning_curves(history, summary["best_epoch"], tmp / "learning_curves.png",
                              f"{name}: learning curves")
        plots.confusion_matrix(np.array(result["confusion_matrix"]), classes,
                               tmp / "confusion_matrix.png", f"{name}: test confusion matrix")
        plots.roc_curves(y, proba, classes, tmp / "roc.png", f"{name}: one-vs-rest ROC")
        plots.pr_curves(y, proba, classes, tmp / "pr.png", f"{name}: precision-recall")
        result["ece"] = plots.reliability_diagram(y, proba, tmp / "reliability.png",
                                                  f"{name}: reliability")
        plots.example_galaxies(x_test, y, proba, classes, tmp / "examples.png",
                               f"{name}: test galaxies classified right and wrong")
        kernel = first_conv_kernel(model)
        if kernel is not None:
            plots.first_layer_kernels(kernel[0], tmp / "kernels.png",
                                      f"{name}: first-layer kernels ({kernel[1]})")
        # Saliency for the first test galaxy of each class.
        picks = [int(np.flatnonzero(y == k)[0]) for k in range(len(classes)) if (y == k).any()]
        pred = proba.argmax(axis=1)
        maps = saliency(model, x_test[picks], pred[picks])
        plots.saliency_maps(x_test[picks], maps,
                            [f"true {classes[y[i]]}\npred {classes[pred[i]]}" for i in picks],
                            tmp / "saliency.png", f"{name}: saliency of the predicted class")
    atomic_write_json(out_dir / "metrics.json", result)
    log.info("%s on %d test galaxies: accuracy %.3f, balanced accuracy %.3f, macro-F1 %.3f",
             name, len(y), result["accuracy"], result["balanced_accuracy"], result["macro_f1"])
    return result


main = stage_main(run)

if __name__ == "__main__":
    main()
