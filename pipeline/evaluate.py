"""Stage 4, evaluate: choose how each model is applied, on validation, then score it on test.

1. **Inference settings** (``inference.json`` in the model's folder): the test-time views
   (``evaluate.tta``, ``evaluate.tta_zoom``) and the prior correction fitted on the validation
   split for exactly those views (``evaluate.prior_correction``). They are one decision, kept
   with the model, so ``predict`` applies the model as it was scored here; and changing a view
   re-runs this stage, not training.
2. **Test scores**: ``metrics.json`` (for ``dvc metrics show``), ``predictions.csv`` (one row per
   test galaxy, for ``dvc plots`` confusion matrices and the model card) and figures.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pipeline import plots
from pipeline.artifacts import (
    CATALOG_NAME,
    FIGURES_DIR,
    HISTORY_NAME,
    MODEL_NAME,
    PREDICTIONS_NAME,
    ConformalSets,
    InferenceSettings,
    Layout,
    Metrics,
    PreparedMeta,
    PriorCorrection,
    TrainedModel,
    cross_check_figure,
    file_sha256,
    load_split,
)
from pipeline.calibration import (
    TEMPERATURE_RANGE,
    apply_temperature,
    coverage_by_class,
    fit_conformal,
    fit_temperature,
    set_labels,
    temperature_bound,
)
from pipeline.catalog import image_paths, read_csv_catalog
from pipeline.config import stage_main
from pipeline.errors import PipelineError
from pipeline.inference import (
    PRIOR_CORRECTION_GRID,
    TTA_MODES,
    apply_class_factors,
    fit_prior_correction,
    predict_proba,
)
from pipeline.io import DEFAULT_MAX_PIXELS, atomic_path, require_file
from pipeline.metrics import calibration_bins, classification_metrics
from pipeline.preprocess import catalog_radii, load_images

log = logging.getLogger(__name__)
# Cutouts are decoded and framed on every core (much of it runs outside the GIL, and the
# pixels do not depend on the thread): gz1's stress test and cross-check read ~4,300 of them.
READ_WORKERS = os.cpu_count() or 1


def fit_inference(trained: TrainedModel, val: dict, ev: DictConfig) -> InferenceSettings:
    """Everything about how the model is applied, chosen on the validation split in order:
    the test-time views ``ev`` asks for; the prior correction for exactly those views
    (:func:`pipeline.inference.fit_prior_correction`); a temperature for the corrected
    probabilities; the conformal thresholds on the calibrated ones
    (:mod:`pipeline.calibration`)."""
    how = str(ev.prior_correction)
    weights = trained.summary.class_balance_weights
    labels = val["labels"]
    raw = predict_proba(trained.model, val["images"].astype(np.float32), ev.tta,
                        zoom=float(ev.tta_zoom))
    correction = PriorCorrection(how=how)
    if how != "none" and weights is not None:
        grid = PRIOR_CORRECTION_GRID if how == "fit" else (float(how),)
        fitted = fit_prior_correction(raw, labels, dict(enumerate(weights)),
                                      trained.scheme.n_classes, grid)
        correction = PriorCorrection(how=how, **fitted)
        log.info("prior correction: alpha %.2f (validation macro-F1 by alpha: %s)",
                 correction.alpha, correction.validation_macro_f1)
    proba = apply_class_factors(raw, correction.class_factors)
    temperature = fit_temperature(proba, labels) if ev.calibration == "temperature" else 1.0
    bound = temperature_bound(temperature)
    if bound is not None:
        log.warning("calibration: the temperature stopped at its bound %.2f (searched %s): %s",
                    temperature, TEMPERATURE_RANGE,
                    "the validation split is separated perfectly, so calibrated probabilities "
                    "sit at 0 and 1" if bound < 1 else
                    "the model is barely better than chance on validation, so calibrated "
                    "probabilities are near uniform")
    proba = apply_temperature(proba, temperature)
    conformal = None
    if ev.conformal_level > 0:
        conformal = ConformalSets(level=float(ev.conformal_level),
                                  thresholds=fit_conformal(proba, labels, ev.conformal_level))
    log.info("calibration: temperature %.3f; conformal thresholds %s", temperature,
             None if conformal is None else [round(t, 3) for t in conformal.thresholds])
    return InferenceSettings(tta=str(ev.tta), tta_zoom=float(ev.tta_zoom),
                             prior_correction=correction, temperature=temperature,
                             conformal=conformal,
                             model_sha256=file_sha256(trained.folder / MODEL_NAME))


def framing_stress(trained: TrainedModel, raw: Path, test: dict, zooms: list[float],
                   pixel_scales: list[float], max_pixels: int | None = None
                   ) -> dict[str, dict[str, float]]:
    """How the model fares on its test galaxies framed otherwise: each raw cutout reframed
    (:func:`pipeline.framing.reframe`: ``zoom`` times tighter, or its field drawn on pixels
    ``scale`` times larger), then prepared the way the model's own bundle says and scored.

    Galaxies whose size cannot be measured on a copy (``prepare.framing = galaxy_size``,
    ``prepare.unmeasured = skip``) are counted in ``skipped`` and score as wrong: a survey
    user loses them too.
    """
    from sklearn.metrics import accuracy_score, f1_score

    from pipeline.framing import reframe

    catalog = read_csv_catalog(raw / CATALOG_NAME, f"paths.raw ({raw})")
    catalog = catalog.set_index(catalog["objid"].astype(str))
    catalog = catalog[~catalog.index.duplicated(keep="last")]
    ids = [str(o) for o in test["objid"]]
    missing = [o for o in ids if o not in catalog.index]
    if missing:
        raise PipelineError(f"{raw / CATALOG_NAME}: {len(missing)} test galaxies (first "
                            f"{missing[0]}) are not in the catalog prepare read; run prepare "
                            "again")
    galaxies = catalog.loc[ids]
    paths = [raw / f for f in galaxies["file"]]
    y = test["labels"]
    # A catalog radius is in the original cutout's pixels: a reframed copy scales it.
    radii = catalog_radii(galaxies, trained.preprocessing, str(raw / CATALOG_NAME))
    cases = [(f"zoom {z:g}x", {"zoom": float(z)}) for z in zooms]
    cases += [(f"pixels {s:g}x larger", {"resample": 1.0 / float(s)}) for s in pixel_scales]
    result: dict[str, dict[str, float]] = {}
    for name, how in cases:
        scale = how.get("zoom", 1.0) * how.get("resample", 1.0)
        images, kept, skipped, *_ = load_images(
            paths, trained.preprocessing, max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
            progress=False, transform=lambda image, how=how: reframe(image, **how),
            radii=None if radii is None else radii * scale, workers=READ_WORKERS)
        predicted = np.full(len(y), -1)
        if kept.any():
            predicted[kept] = trained.predict_proba(images[kept]).argmax(axis=1)
        result[name] = {"accuracy": float(accuracy_score(y, predicted)),
                        "macro_f1": float(f1_score(y, predicted, average="macro",
                                                   labels=np.arange(trained.scheme.n_classes),
                                                   zero_division=0)),
                        "skipped": len(skipped)}
        log.info("framing stress, %s: accuracy %.3f, macro-F1 %.3f, %d skipped", name,
                 result[name]["accuracy"], result[name]["macro_f1"], len(skipped))
    return result


def cross_check(trained: TrainedModel, name: str, check: DictConfig,
                max_pixels: int | None = None, shown: int = 6) -> tuple[dict, list]:
    """How well the model ranks a labelled sample from elsewhere that nobody tuned on (another
    survey's framing, another labelling rule): the ROC AUC of the summed probabilities of
    ``check.score`` for the catalog rows whose ``check.label_column`` is in ``check.positive``.
    Its cutouts are prepared as the model's bundle says and viewed at ``check.tta_zoom`` (null:
    the model's own). Unreadable or unmeasurable cutouts are counted in ``skipped``.

    Also returns the ``shown`` positives scored lowest and negatives scored highest, as rows
    for :func:`plots.disagreements`: an AUC alone cannot say whether the model or the other
    sample's labelling rule is at fault."""
    from sklearn.metrics import roc_auc_score

    key = f"evaluate.cross_checks.{name}"
    path = Path(str(check.catalog)).expanduser()
    catalog = read_csv_catalog(path, f"{key}.catalog", str(check.encoding), f"{key}.encoding")
    for column in ("image_column", "label_column"):
        if check[column] not in catalog.columns:
            raise PipelineError(f"{path}: no column {key}.{column} = {check[column]!r}; the "
                                f"catalog has {list(catalog.columns)}")
    positive = catalog[check.label_column].isin(list(check.positive)).to_numpy()
    if positive.all() or not positive.any():
        raise PipelineError(
            f"{path}: {key}.positive = {list(check.positive)} matches {int(positive.sum())} of "
            f"{len(positive)} rows; a ROC AUC needs both kinds (labels there: "
            f"{sorted(catalog[check.label_column].unique())[:10]})")
    paths = image_paths(catalog[check.image_column], path.parent)
    images, kept, skipped, *_ = load_images(paths, trained.preprocessing,
                                            max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                                            radii=catalog_radii(catalog, trained.preprocessing,
                                                                f"{key}.catalog = {path}"),
                                            workers=READ_WORKERS)
    if not kept.any():
        raise PipelineError(f"{path}: none of its {len(paths)} cutouts could be read "
                            f"(first: {skipped[0]}); check {key}.image_column")
    zoom = None if check.tta_zoom is None else float(check.tta_zoom)
    images = images[kept]
    proba = trained.predict_proba(images, zoom=zoom)
    columns = [list(trained.scheme.classes).index(c) for c in check.score]
    score, labelled = proba[:, columns].sum(axis=1), positive[kept]
    auc = float(roc_auc_score(labelled, score))
    result = {"catalog": str(path), "score": "p_" + "+p_".join(check.score),
              "positive": list(check.positive), "galaxies": len(images),
              "positives": int(labelled.sum()), "skipped": len(skipped),
              "tta_zoom": trained.inference.tta_zoom if zoom is None else zoom,
              "roc_auc": auc}
    log.info("cross-check %s: ROC AUC %.3f of %s for %s, %d galaxies (%d skipped)", name, auc,
             result["score"], list(check.positive), result["galaxies"], len(skipped))
    low = np.flatnonzero(labelled)[np.argsort(score[labelled], kind="stable")][:shown]
    high = np.flatnonzero(~labelled)[np.argsort(-score[~labelled], kind="stable")][:shown]
    label = "/".join(check.positive)
    rows = [(f"labelled {label}", images[low], score[low]),
            (f"not {label}", images[high], score[high])]
    return result, rows


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


def run(cfg: DictConfig, name: str | None = None) -> Metrics:
    name = name or cfg.model
    layout = Layout.from_config(cfg)
    model_dir, out_dir = layout.model_dir(name), layout.report_dir(name)
    scheme = PreparedMeta.load(layout.prepared).scheme
    val, test = load_split(layout.prepared, "val"), load_split(layout.prepared, "test")
    history = pd.read_csv(require_file(model_dir / HISTORY_NAME, "train"))
    trained = TrainedModel.load(model_dir, with_inference=False)
    inference = fit_inference(trained, val, cfg.evaluate)
    inference.save(model_dir)
    trained = trained.with_inference(inference)

    x_test, y = test["images"].astype(np.float32), test["labels"]
    # Before and after the temperature from one forward pass. Undoing a small temperature from
    # the calibrated values cannot work: their clipped tails are gone (at T = 0.05 a model with
    # an ECE of 0.01 read 0.33).
    before = trained.with_inference(dataclasses.replace(inference, temperature=1.0))
    uncalibrated_proba = before.predict_proba(x_test)
    proba = trained.calibrate(uncalibrated_proba)
    summary = trained.summary
    correction = inference.prior_correction
    bins = calibration_bins(y, proba)
    uncalibrated = calibration_bins(y, uncalibrated_proba)
    sets = trained.prediction_sets(proba)
    checks = {k: cross_check(trained, k, check, trained.max_image_pixels)
              for k, check in cfg.evaluate.cross_checks.items()}
    result = Metrics(
        **classification_metrics(y, proba, scheme),
        model=name,
        kind=summary.kind,
        pretrained=summary.pretrained,
        best_epoch=summary.best_epoch,
        epochs_run=summary.epochs,
        train_loss_at_best=summary.train_loss_at_best,
        val_loss_at_best=summary.best_val_loss,
        generalization_gap=summary.best_val_loss - summary.train_loss_at_best,
        train_wall_time_s=summary.wall_time_s,
        tta=inference.tta,
        tta_views=TTA_MODES[inference.tta],
        tta_zoom=inference.tta_zoom,
        prior_correction_alpha=correction.alpha,
        prior_correction=correction.how,
        ece=bins.ece,
        ece_before_calibration=uncalibrated.ece,
        temperature=inference.temperature,
        conformal_level=None if sets is None else inference.conformal.level,
        conformal=None if sets is None else coverage_by_class(sets, y, list(scheme.classes)),
        framing_stress=framing_stress(
            trained, layout.raw, test, list(cfg.evaluate.framing_zooms),
            list(cfg.evaluate.framing_pixel_scales), trained.max_image_pixels) or None,
        cross_checks={k: result for k, (result, _) in checks.items()} or None,
    )

    predictions = pd.DataFrame({"objid": test["objid"], "actual": scheme.decode(y),
                                "predicted": scheme.decode(proba.argmax(axis=1))})
    for k, c in enumerate(scheme.classes):
        predictions[f"p_{c}"] = proba[:, k]
    if sets is not None:
        predictions["prediction_set"] = set_labels(sets, list(scheme.classes))
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / PREDICTIONS_NAME, key="paths.reports") as tmp:
        predictions.to_csv(tmp, index=False)
    classes = list(scheme.classes)
    model = trained.model
    with atomic_path(out_dir / FIGURES_DIR, signature="learning_curves.png",
                     key="paths.reports") as tmp:
        tmp.mkdir()
        plots.learning_curves(history, summary.best_epoch, tmp / "learning_curves.png",
                              f"{name}: learning curves")
        plots.confusion_matrix(np.array(result.confusion_matrix), classes,
                               tmp / "confusion_matrix.png", f"{name}: test confusion matrix")
        plots.roc_curves(y, proba, classes, tmp / "roc.png", f"{name}: one-vs-rest ROC")
        plots.pr_curves(y, proba, classes, tmp / "pr.png", f"{name}: precision-recall")
        plots.reliability_diagram(bins, tmp / "reliability.png", f"{name}: reliability")
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
        for k, (summary, rows) in checks.items():
            plots.disagreements(rows, tmp / cross_check_figure(k),
                                f"{name} on {k}: its labels against {summary['score']}")
    result.save(out_dir)
    log.info("%s on %d test galaxies: accuracy %.3f, balanced accuracy %.3f, macro-F1 %.3f",
             name, len(y), result.accuracy, result.balanced_accuracy, result.macro_f1)
    return result


main = stage_main(run)

if __name__ == "__main__":
    main()
