"""Stage 5, report: a model card per model (Mitchell et al. 2019 sections) and a comparison.

Cards are rendered with Jinja2 into Markdown, then into one standalone HTML file each with the
figures embedded, plus a JSON file with the same fields for machines.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import logging
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined
from omegaconf import DictConfig

from pipeline.artifacts import (
    AUGMENTATIONS_NAME,
    COMPARISON_NAME,
    CUTOUT_MARK,
    FIGURES,
    HISTORY_NAME,
    MODEL_NAME,
    PREDICTIONS_NAME,
    Layout,
    Metrics,
    PreparedMeta,
    TrainSummary,
    cross_check_figure,
    load_trained_config,
    shows_cutouts,
)
from pipeline.calibration import temperature_bound
from pipeline.config import model_train_config, schedule_description, stage_main
from pipeline.errors import MissingInputError
from pipeline.io import KIND_WORDS, atomic_path, atomic_write_json, require_file, unseen_kind
from pipeline.metrics import BOOTSTRAP_N, bootstrap_intervals
from pipeline.models import registry as model_kinds
from pipeline.sources import get_source

log = logging.getLogger(__name__)

METRIC_ROWS = [("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
               ("macro_f1", "macro-F1"), ("roc_auc_ovr", "ROC AUC (one-vs-rest, macro)"),
               ("log_loss", "log loss")]
PACKAGES = ("tensorflow", "keras", "numpy", "astropy", "scikit-learn", "hydra-core", "dvc")


def source_description(data: DictConfig) -> str:
    """Where the galaxies and labels came from, with the credit their providers ask for."""
    return get_source(data.source).describe(data)


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


def loss_description(t: DictConfig) -> str:
    """The training loss as the card says it: hard labels, smoothed ones, or mixup blends."""
    if t.label_smoothing:
        words = (f"categorical cross-entropy against labels smoothed by {t.label_smoothing} (the "
                 f"labelled class's target is 1 - {t.label_smoothing} + "
                 f"{t.label_smoothing}/classes)")
    else:
        words = "categorical cross-entropy" if t.mixup else "sparse categorical cross-entropy"
    if t.mixup:
        words += (f" on mixup blends of image pairs (shares from Beta({t.mixup}, {t.mixup}), "
                  "each image keeping the larger share)")
    return words


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


def model_context(cfg: DictConfig, name: str, cards: Path, data_meta: PreparedMeta) -> dict:
    layout = Layout.from_config(cfg)
    reports, model_dir = layout.report_dir(name), layout.model_dir(name)
    metrics = Metrics.load(reports).to_dict()  # the template reads it as a mapping
    # The card describes how this model was trained (its bundle's config.yaml), even when
    # the current params have changed since.
    trained_cfg = load_trained_config(model_dir)
    mc = trained_cfg.models[name]
    summary = TrainSummary.load(model_dir)
    history = pd.read_csv(require_file(model_dir / HISTORY_NAME, "train"))
    predictions = pd.read_csv(require_file(reports / PREDICTIONS_NAME, "evaluate"),
                              dtype={"objid": str})
    trained_with = model_train_config(trained_cfg, name)
    kind_label, architecture = model_kinds()[mc.kind].describe(trained_cfg, mc,
                                                               summary.pretrained)
    caveats = []
    if cfg.data.source == "mock":
        caveats.append("Trained and tested on simulated galaxies: real SDSS images have "
                       "artefacts, blends, irregulars and label noise that the mock lacks.")
    if summary.pretrained is False:
        caveats.append("The backbone is not pretrained (no ImageNet weights could be loaded).")
    if metrics["n_test"] < 500:
        caveats.append(f"The test split is small ({metrics['n_test']} galaxies): the 95% "
                       "intervals above show how uncertain each figure is.")
    unseen = unseen_kind(summary.train_image_kinds)
    if unseen:
        (kind,) = summary.train_image_kinds
        caveats.append(f"Input kind: trained on {KIND_WORDS[kind]}; it never saw "
                       f"{KIND_WORDS[unseen]}, so this card's figures do not hold for those "
                       "(`predict` warns when it is given them).")
    framing = framing_description(trained_cfg.prepare)
    stress = metrics.get("framing_stress") or {}
    if stress:
        worst = min(stress, key=lambda k: stress[k]["macro_f1"])
        caveats.append(
            f"Framing: the model expects {framing}. On its test galaxies framed otherwise "
            f"(Framing section) macro-F1 falls from {metrics['macro_f1']:.3f} to as low as "
            f"{stress[worst]['macro_f1']:.3f} ({worst}); check cutouts of another survey "
            "against that table.")
    for check_name, check in (metrics.get("cross_checks") or {}).items():
        caveats.append(
            f"Another sample: on {check_name} ({check['galaxies']} galaxies framed and labelled "
            f"elsewhere, never trained or tuned on; {check['catalog']}), {check['score']} ranks "
            f"its {'/'.join(check['positive'])} label ({check['positives']} galaxies) against "
            f"the rest with ROC AUC {check['roc_auc']:.3f} (test-time zoom "
            f"{check['tta_zoom']:g}; {check['skipped']} cutouts unreadable or unmeasured). "
            "Figures on this model's own test split overstate what another survey gets.")
    figures = {k: _relative(layout.figures(name) / f"{k}.png", cards)
               for k in FIGURES if (layout.figures(name) / f"{k}.png").is_file()}
    cross_check_figures = {
        k: _relative(layout.figures(name) / cross_check_figure(k), cards)
        for k in (metrics.get("cross_checks") or {})
        if (layout.figures(name) / cross_check_figure(k)).is_file()}
    return {
        "name": name,
        "kind": mc.kind,
        "kind_label": kind_label,
        "architecture": architecture,
        "parameters": summary.parameters,
        "input_shape": summary.input_shape,
        "backbone": mc.backbone if mc.kind == "transfer" else None,
        "weights": summary.weights,
        "pretrained": summary.pretrained,
        "phases": [dataclasses.asdict(p) for p in summary.phases],
        "train_images": summary.train_images,
        "train_image_kinds": summary.train_image_kinds,
        "class_balance": CLASS_BALANCE_WORDS[trained_with.class_weight],
        "patience": trained_with.early_stopping_patience,
        "schedule": schedule_description(trained_with),
        "min_epochs": trained_with.min_epochs,
        "ema_momentum": trained_with.ema_momentum,
        "loss": loss_description(trained_with),
        "model_path": (model_dir / MODEL_NAME).as_posix(),
        "metrics": metrics,
        "ci": bootstrap_intervals(predictions, data_meta.classes),
        "overfitting": diagnose_overfitting(history, metrics["best_epoch"]),
        "caveats": caveats,
        "figures": figures,
        "cross_check_figures": cross_check_figures,
        "framing": framing,
        "framing_stress": stress,
    }


def framing_description(prep: DictConfig) -> str:
    if prep.get("framing", "fixed") == "galaxy_size":
        return (f"each galaxy cropped so that its half-light radius, measured on the cutout, "
                f"spans {prep.galaxy_radius_fraction:.0%} of the view's half-width "
                "(`prepare.framing=galaxy_size`), whatever the survey's framing")
    if prep.get("framing") == "catalog_radius":
        unit = ("pixels" if prep.radius_unit == "pixels"
                else f"arcsec at {prep.pixel_scale} arcsec per pixel")
        return (f"each galaxy cropped so that the radius in its catalog's column "
                f"`{prep.radius_column}` ({unit}) spans {prep.galaxy_radius_fraction:.0%} of "
                "the view's half-width (`prepare.framing=catalog_radius`): new cutouts need "
                "that column too")
    return (f"the central {prep.center_crop:.0%} of each cutout's side "
            "(`prepare.framing=fixed`), i.e. cutouts framed like its training data")


def data_context(cfg: DictConfig, data_meta: PreparedMeta) -> dict:
    a = cfg.augment
    transforms = (f"rotation ±{a.rotation_degrees}°, zoom ±{a.zoom:.0%}, random crop to "
                  f"≥{a.crop_fraction:.0%} of the side, {'flips, ' if a.flip else ''}Gaussian "
                  f"blur σ ≤ {a.blur_sigma} px on {a.blur_probability:.0%} of copies")
    if a.brightness or a.colour:
        transforms += (f", brightness scaled by a log-normal factor (σ {a.brightness}) "
                       f"and each band by another (σ {a.colour})")
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
        "splits": {k: dataclasses.asdict(v) for k, v in data_meta.splits.items()},
        "split_seed": int(s.seed),
        "split_fractions": f"{s.train:.0%} / {s.val:.0%} / {s.test:.0%}",
        "augment_description": augment,
    }


def _markdown_to_html(markdown_text: str, title: str, base: Path, env: Environment) -> str:
    """Markdown to one standalone HTML page, every image embedded as a data URI; figures made
    of galaxy cutouts carry ``CUTOUT_MARK``."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])

    def embed(match: re.Match) -> str:
        path = (base / match.group(1)).resolve()
        if not path.is_file():
            raise MissingInputError(f"{path}: figure referenced by the model card is missing; "
                                    "run the evaluate stage first")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        mark = f" {CUTOUT_MARK}" if shows_cutouts(path.name) else ""
        return f'src="data:image/png;base64,{data}"{mark}'

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
                              "log_loss", "ece", "ece_before_calibration", "temperature",
                              "n_test") if k in m["metrics"]},
                    "confidence_intervals_95": m["ci"],
                    "per_class": m["metrics"]["per_class"],
                    "conformal_sets": {"level": m["metrics"].get("conformal_level"),
                                       "test_coverage": m["metrics"].get("conformal")},
                    "framing": {"expects": m["framing"],
                                "test_galaxies_reframed": m["framing_stress"]},
                    "other_samples": m["metrics"].get("cross_checks") or {}},
        "evaluation_data": {"split": "test", "per_class": data["splits"]["test"]["per_class"],
                            "split_seed": data["split_seed"], "augmented": False},
        "training_data": {"source": data["source"], "description": data["source_description"],
                          "splits": data["splits"], "augmentation": data["augment_description"],
                          "train_images_with_copies": m["train_images"],
                          "cutouts_per_kind": m["train_image_kinds"]},
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
    prepared = Path(cfg.paths.prepared)
    data_meta = PreparedMeta.load(prepared)
    cards = Layout.from_config(cfg).cards
    env = Environment(loader=PackageLoader("pipeline", "templates"), undefined=StrictUndefined,
                      autoescape=False, trim_blocks=False)
    common = {
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "env": environment(cfg),
        "classes": data_meta.classes,
        "metric_rows": METRIC_ROWS,
        "bootstrap_n": BOOTSTRAP_N,
        "data": data_context(cfg, data_meta),
        "temperature_bound": temperature_bound,
    }
    written = []
    with atomic_path(cards, signature=COMPARISON_NAME, key="paths.reports") as tmp:
        tmp.mkdir(parents=True)
        # Relative links are computed against the final folder, which tmp becomes.
        contexts = [model_context(cfg, name, cards, data_meta) for name in cfg.models]
        grid = _relative(prepared / AUGMENTATIONS_NAME, cards)
        for m in contexts:
            text = env.get_template("model_card.md.j2").render(
                m=m, figures={**m["figures"], "augmentations": grid}, **common)
            (tmp / f"{m['name']}.md").write_text(text, encoding="utf-8")
            html = _markdown_to_html(text, f"Model card: {m['name']}", cards, env)
            (tmp / f"{m['name']}.html").write_text(html, encoding="utf-8")
            atomic_write_json(tmp / f"{m['name']}.json", card_as_json(m, common))
            written += [cards / f"{m['name']}.{ext}" for ext in ("md", "html", "json")]
        text = env.get_template("comparison.md.j2").render(models=contexts, **common)
        (tmp / COMPARISON_NAME).write_text(text, encoding="utf-8")
        (tmp / "comparison.html").write_text(
            _markdown_to_html(text, "Model comparison", cards, env), encoding="utf-8")
        written += [cards / COMPARISON_NAME, cards / "comparison.html"]
    log.info("wrote %d model-card files to %s", len(written), cards)
    return written


main = stage_main(run)

if __name__ == "__main__":
    main()
