"""Stage 5, report: a model card per model (Mitchell et al. 2019 sections) and a comparison.

Cards are rendered with Jinja2 into Markdown, then into one standalone HTML file each with the
figures embedded, plus a JSON file with the same fields for machines.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined
from omegaconf import DictConfig

from pipeline.config import model_train_config, stage_main
from pipeline.errors import MissingInputError
from pipeline.io import atomic_path, atomic_write_json, read_json, require_file
from pipeline.labels import LabelScheme
from pipeline.prepare import META_NAME
from pipeline.train import MODEL_NAME, SUMMARY_NAME, schedule_description

log = logging.getLogger(__name__)

METRIC_ROWS = [("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
               ("macro_f1", "macro-F1"), ("roc_auc_ovr", "ROC AUC (one-vs-rest, macro)"),
               ("log_loss", "log loss")]
BOOTSTRAP_N = 1000
FIGURES = ("learning_curves", "confusion_matrix", "roc", "pr", "reliability", "examples",
           "kernels", "saliency")
PACKAGES = ("tensorflow", "keras", "numpy", "astropy", "scikit-learn", "hydra-core", "dvc")
LABEL_CREDITS = {"gz1": "Galaxy Zoo 1 (Lintott et al. 2008, 2011)",
                 "gz2": "Galaxy Zoo 2 (Willett et al. 2013)"}


def source_description(data: DictConfig) -> str:
    """Where the galaxies and labels came from, with the credit their providers ask for."""
    if data.source == "mock":
        return ("simulated SDSS-like gri galaxies rendered by the pipeline from Sersic profiles, "
                "with PSF, sky and Poisson noise")
    if data.source == "sdss":
        sd = data.sdss
        return (f"SDSS DR{sd.data_release} {sd.image_type} cutouts fetched with astroquery, "
                f"labels from {LABEL_CREDITS.get(sd.catalog, sd.catalog)} at vote fraction >= "
                f"{sd.vote_threshold}; imaging credit: the Sloan Digital Sky Survey")
    text = f"labelled image folder, catalog `{data.folder.catalog}`"
    return text + (f"; credit: {data.folder.credit}" if data.folder.credit else "")


def bootstrap_intervals(predictions: pd.DataFrame, classes: list[str], n: int = BOOTSTRAP_N,
                        seed: int = 0) -> dict[str, list[float]]:
    """95% percentile-bootstrap intervals of accuracy, balanced accuracy and macro-F1.

    Computed from one confusion matrix per resample (a bincount) rather than by calling
    scikit-learn's scorers n times: a thousand resamples take milliseconds, and resamples of
    a small test set that miss a class follow sklearn's conventions (balanced accuracy averages
    the classes present; F1 of an empty class is 0) without a warning per resample.
    """
    scheme = LabelScheme.from_names(classes)
    k = scheme.n_classes
    y, p = scheme.encode(predictions["actual"]), scheme.encode(predictions["predicted"])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n, len(y)))
    cells = (y[idx] * k + p[idx]) + (np.arange(n) * k * k)[:, None]
    cm = np.bincount(cells.ravel(), minlength=n * k * k).reshape(n, k, k).astype(float)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    actual, predicted = cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(actual > 0, tp / actual, np.nan)
        f1 = np.where(actual + predicted > 0, 2 * tp / (actual + predicted), 0.0)
    scores = {
        "accuracy": tp.sum(axis=1) / len(y),
        "balanced_accuracy": np.nanmean(recall, axis=1),
        "macro_f1": f1.mean(axis=1),
    }
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
            for name, v in scores.items()}


def diagnose_overfitting(history: pd.DataFrame, best_epoch: int) -> str:
    """A plain-words reading of the learning curves."""
    best = history.loc[history["epoch"] == best_epoch].iloc[0]
    last = history.iloc[-1]
    gap = best["val_loss"] - best["loss"]
    rise = last["val_loss"] - best["val_loss"]
    if best["accuracy"] < 0.8:
        return (f"underfitting: training accuracy is only {best['accuracy']:.2f} at the best "
                "epoch; a larger model, more epochs or a higher learning rate may help.")
    if rise > 0.1 * max(best["val_loss"], 1e-3) and last["loss"] < best["loss"]:
        return (f"the model began to overfit after epoch {best_epoch}: validation loss rose by "
                f"{rise:.3f} while training loss kept falling. Early stopping restored the "
                f"weights of epoch {best_epoch}.")
    if gap > 0.25 * max(best["val_loss"], 1e-3) + 0.05:
        return (f"a train-validation loss gap of {gap:.3f} at the best epoch suggests mild "
                "overfitting; more augmentation, dropout or L2 would narrow it.")
    return (f"no sign of overfitting: training and validation loss stay close (gap {gap:+.3f}) "
            f"up to the best epoch ({best_epoch}).")


CLASS_BALANCE_WORDS = {  # train.class_weight, as the card says it
    "balanced": "inverse-frequency class weights in the loss (`balanced`)",
    "resample": "class-balanced sampling, every class drawn equally often each epoch "
                "(`resample`)",
    "none": "no class weights (`none`)",
}


def run_overrides() -> list[str]:
    """The command-line overrides of this run (empty under DVC, which reads params.yaml)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def environment(cfg: DictConfig) -> dict:
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = "unknown (not a git checkout)"
    lock = Path("dvc.lock")
    dvc_lock = hashlib.sha256(lock.read_bytes()).hexdigest()[:12] if lock.is_file() else "none"
    return {"packages": packages, "git_revision": rev, "dvc_lock": dvc_lock,
            "overrides": run_overrides(),
            "seed": int(cfg.seed),
            "train_seed": int(cfg.train.seed), "python": platform.python_version(),
            "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"}


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


def model_input(cfg: DictConfig, mc: DictConfig) -> str:
    """The image size the network sees: the prepared size, or the size it resizes to itself."""
    if mc.input_size:
        return f"images resized to {mc.input_size}x{mc.input_size} px inside the model"
    return f"{cfg.prepare.image_size}x{cfg.prepare.image_size} px input"


def model_context(cfg: DictConfig, name: str, cards: Path, data_meta: dict) -> dict:
    mc = cfg.models[name]
    reports = Path(cfg.paths.reports) / name
    model_dir = Path(cfg.paths.models) / name
    metrics = read_json(reports / "metrics.json", "evaluate")
    summary = read_json(model_dir / SUMMARY_NAME, "train")
    history = pd.read_csv(require_file(model_dir / "history.csv", "train"))
    predictions = pd.read_csv(require_file(reports / "predictions.csv", "evaluate"),
                              dtype={"objid": str})
    trained_with = model_train_config(cfg, name)
    if mc.kind == "cnn":
        architecture = (f"{model_input(cfg, mc)}, "
                        f"{len(mc.filters)} conv blocks (filters {list(mc.filters)}, kernel "
                        f"{mc.kernel_size}, padding '{mc.padding}', {mc.activation}"
                        f"{', batch norm' if mc.batch_norm else ''}, max-pool {mc.pool_size}), "
                        f"global average pooling, dropout {mc.dropout}, dense {mc.dense_units}, "
                        f"softmax; L2 {mc.l2}.")
        kind_label = "CNN trained from scratch"
    else:
        architecture = (f"{mc.backbone} (alpha {mc.alpha}) backbone, {model_input(cfg, mc)}, "
                        f"global average pooling, dropout {mc.dropout}, dense "
                        f"{mc.dense_units}, softmax; L2 {mc.l2} on the head.")
        kind_label = "transfer-learned CNN" if summary["pretrained"] else (
            "CNN on a randomly initialised backbone, NOT pretrained")
    caveats = []
    if cfg.data.source == "mock":
        caveats.append("Trained and tested on simulated galaxies: real SDSS images have "
                       "artefacts, blends, irregulars and label noise that the mock lacks.")
    if summary["pretrained"] is False:
        caveats.append("The backbone is not pretrained (no ImageNet weights could be loaded).")
    if metrics["n_test"] < 500:
        caveats.append(f"The test split is small ({metrics['n_test']} galaxies): the 95% "
                       "intervals above show how uncertain each figure is.")
    figures = {k: _relative(reports / "figures" / f"{k}.png", cards)
               for k in FIGURES if (reports / "figures" / f"{k}.png").is_file()}
    return {
        "name": name,
        "kind": mc.kind,
        "kind_label": kind_label,
        "architecture": architecture,
        "parameters": summary["parameters"],
        "input_shape": summary["input_shape"],
        "backbone": mc.backbone if mc.kind == "transfer" else None,
        "weights": summary["weights"],
        "pretrained": summary["pretrained"],
        "phases": summary["phases"],
        "train_images": summary["train_images"],
        "class_balance": CLASS_BALANCE_WORDS[trained_with.class_weight],
        "patience": trained_with.early_stopping_patience,
        "schedule": schedule_description(trained_with),
        "min_epochs": trained_with.min_epochs,
        "ema_momentum": trained_with.ema_momentum,
        "model_path": (model_dir / MODEL_NAME).as_posix(),
        "metrics": metrics,
        "ci": bootstrap_intervals(predictions, data_meta["classes"]),
        "overfitting": diagnose_overfitting(history, metrics["best_epoch"]),
        "caveats": caveats,
        "figures": figures,
    }


def data_context(cfg: DictConfig, data_meta: dict) -> dict:
    a = cfg.augment
    transforms = (f"rotation ±{a.rotation_degrees}°, zoom ±{a.zoom:.0%}, random crop to "
                  f"≥{a.crop_fraction:.0%} of the side, {'flips, ' if a.flip else ''}Gaussian "
                  f"blur σ ≤ {a.blur_sigma} px on {a.blur_probability:.0%} of copies")
    if a.mode == "on_the_fly" and a.copies > 0:
        augment = f"fresh random copies in every epoch (on the fly); {transforms}"
    elif a.copies > 0:
        augment = f"{a.copies} copies per galaxy; {transforms}"
    else:
        augment = "none"
    s = cfg.prepare.split
    return {
        "source": cfg.data.source,
        "source_description": source_description(cfg.data),
        "splits": data_meta["splits"],
        "split_seed": int(s.seed),
        "split_fractions": f"{s.train:.0%} / {s.val:.0%} / {s.test:.0%}",
        "augment_description": augment,
    }


def _markdown_to_html(markdown_text: str, title: str, base: Path, env: Environment) -> str:
    """Markdown to one standalone HTML page, every image embedded as a data URI."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])

    def embed(match: re.Match) -> str:
        path = (base / match.group(1)).resolve()
        if not path.is_file():
            raise MissingInputError(f"{path}: figure referenced by the model card is missing; "
                                    "run the evaluate stage first")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', embed, body)
    return env.get_template("page.html.j2").render(title=title, body=body)


def card_as_json(m: dict, common: dict) -> dict:
    """The card's fields under Mitchell et al.'s section names (model-card-toolkit's layout as a
    guide: model_details, considerations, quantitative_analysis, datasets)."""
    data = common["data"]
    return {
        "schema": "galaxy-morphology-pipeline model card v1 (after Mitchell et al. 2019)",
        "generated": common["generated"],
        "model_details": {"name": m["name"], "kind": m["kind"], "description": m["kind_label"],
                          "architecture": m["architecture"], "parameters": m["parameters"],
                          "input_shape": m["input_shape"], "backbone": m["backbone"],
                          "weights": m["weights"], "pretrained": m["pretrained"],
                          "training_phases": m["phases"], "path": m["model_path"]},
        "intended_use": {
            "primary_uses": ["morphological classification of SDSS-like gri cutouts into "
                             + ", ".join(common["classes"]), "triage before visual inspection",
                             "teaching"],
            "out_of_scope": ["classes not trained on (mergers, irregulars, artefacts)",
                             "other surveys without retraining or a labelled check",
                             "decisions about single objects without inspection"]},
        "factors": ["apparent size and brightness", "inclination", "seeing",
                    "neighbouring sources", f"data source: {data['source']}"],
        "metrics": {"test": {k: m["metrics"][k] for k in
                             ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr",
                              "log_loss", "ece", "n_test") if k in m["metrics"]},
                    "confidence_intervals_95": m["ci"],
                    "per_class": m["metrics"]["per_class"]},
        "evaluation_data": {"split": "test", "per_class": data["splits"]["test"]["per_class"],
                            "split_seed": data["split_seed"], "augmented": False},
        "training_data": {"source": data["source"], "description": data["source_description"],
                          "splits": data["splits"], "augmentation": data["augment_description"],
                          "train_images_with_copies": m["train_images"]},
        "quantitative_analyses": {
            "confusion_matrix": m["metrics"]["confusion_matrix"],
            "best_epoch": m["metrics"]["best_epoch"], "epochs_run": m["metrics"]["epochs_run"],
            "train_loss_at_best": m["metrics"]["train_loss_at_best"],
            "val_loss_at_best": m["metrics"]["val_loss_at_best"],
            "generalization_gap": m["metrics"]["generalization_gap"],
            "overfitting_diagnosis": m["overfitting"],
            "figures": sorted(m["figures"])},
        "ethical_considerations": ["volunteer-label biases (e.g. fewer arms seen in faint, "
                                   "small or distant galaxies) are inherited",
                                   "catalogues built from the model can bias downstream science"],
        "caveats_and_recommendations": m["caveats"] + [
            "check performance on a labelled sample of your own data first",
            "report balanced accuracy and macro-F1 when classes are imbalanced"],
        "environment": common["env"],
    }


def run(cfg: DictConfig) -> list[Path]:
    reports = Path(cfg.paths.reports)
    prepared = Path(cfg.paths.prepared)
    data_meta = read_json(prepared / META_NAME, "prepare")
    cards = reports / "cards"
    env = Environment(loader=PackageLoader("pipeline", "templates"), undefined=StrictUndefined,
                      autoescape=False, trim_blocks=False)
    common = {
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "env": environment(cfg),
        "classes": data_meta["classes"],
        "metric_rows": METRIC_ROWS,
        "bootstrap_n": BOOTSTRAP_N,
        "data": data_context(cfg, data_meta),
    }
    written = []
    with atomic_path(cards, signature="comparison.md", key="paths.reports") as tmp:
        tmp.mkdir(parents=True)
        # Relative links are computed against the final folder, which tmp becomes.
        contexts = [model_context(cfg, name, cards, data_meta) for name in cfg.models]
        grid = _relative(prepared / "augmentations.png", cards)
        for m in contexts:
            text = env.get_template("model_card.md.j2").render(
                m=m, figures={**m["figures"], "augmentations": grid}, **common)
            (tmp / f"{m['name']}.md").write_text(text, encoding="utf-8")
            html = _markdown_to_html(text, f"Model card: {m['name']}", cards, env)
            (tmp / f"{m['name']}.html").write_text(html, encoding="utf-8")
            atomic_write_json(tmp / f"{m['name']}.json", card_as_json(m, common))
            written += [cards / f"{m['name']}.{ext}" for ext in ("md", "html", "json")]
        text = env.get_template("comparison.md.j2").render(models=contexts, **common)
        (tmp / "comparison.md").write_text(text, encoding="utf-8")
        (tmp / "comparison.html").write_text(
            _markdown_to_html(text, "Model comparison", cards, env), encoding="utf-8")
        written += [cards / "comparison.md", cards / "comparison.html"]
    log.info("wrote %d model-card files to %s", len(written), cards)
    return written


main = stage_main(run)

if __name__ == "__main__":
    main()
