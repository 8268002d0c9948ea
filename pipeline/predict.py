"""Apply a trained model to new galaxies: a catalog CSV or a folder of images.

    python -m pipeline.predict model_dir=models/transfer input=cat.csv image_column=filename \\
        output=preds.csv

The preprocessing (centre crop, resize, normalisation) comes from the model's own saved
``config.yaml``. Each row of the output has the image path as given, the predicted class, one
probability per class, the predictive entropy, and, with Monte Carlo dropout, the spread of the
winning class's probability over dropout masks (Gal & Ghahramani 2016). Probabilities are
averaged over the same test-time views as evaluate used (the model's ``evaluate.tta`` and
``evaluate.tta_zoom``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.config import CONF_DIR, TTA_ZOOM_RANGE
from pipeline.errors import PipelineError
from pipeline.inference import TTA_MODES, mc_dropout_probabilities, predict_proba
from pipeline.io import DISPLAY_SUFFIXES, FITS_SUFFIXES, atomic_path

log = logging.getLogger(__name__)


class PredictError(PipelineError, ValueError):
    """Bad predict input; the message names the key or file."""


def list_inputs(input_path: Path, image_column: str) -> tuple[list[str], list[Path]]:
    """The paths as the user gave them, and where they are on disk."""
    if input_path.is_dir():
        files = sorted(p for p in input_path.rglob("*")
                       if p.is_file() and p.name.lower().endswith(FITS_SUFFIXES + DISPLAY_SUFFIXES))
        if not files:
            raise PredictError(f"input = {str(input_path)!r}: the folder holds no JPEG, PNG or "
                               "FITS images")
        return [str(p) for p in files], files
    if not input_path.is_file():
        raise PredictError(f"input = {str(input_path)!r}: no such file or folder")
    catalog = pd.read_csv(input_path, dtype=str, keep_default_na=False)
    if image_column not in catalog.columns:
        raise PredictError(f"{input_path}: no column image_column = {image_column!r}; the "
                           f"catalog has {list(catalog.columns)}")
    given = catalog[image_column].tolist()
    root = input_path.parent
    return given, [Path(g) if Path(g).is_absolute() else root / g for g in given]


def tta_mode(cfg: DictConfig, trained: DictConfig) -> str:
    """``tta`` from the command line, else what the model was evaluated with."""
    tta = cfg.get("tta")
    if tta is None:
        tta = OmegaConf.select(trained, "evaluate.tta", default="none")
    if tta not in TTA_MODES:
        raise PredictError(f"tta = {tta!r}: use one of {list(TTA_MODES)}, or null for the "
                           "model's own evaluate.tta")
    return str(tta)


def tta_zoom(cfg: DictConfig, trained: DictConfig) -> float:
    """``tta_zoom`` from the command line, else the model's own (1.0 for older models)."""
    zoom = cfg.get("tta_zoom")
    if zoom is None:
        zoom = OmegaConf.select(trained, "evaluate.tta_zoom", default=1.0)
    low, high = TTA_ZOOM_RANGE
    if not isinstance(zoom, int | float) or isinstance(zoom, bool) or not low <= zoom <= high:
        raise PredictError(f"tta_zoom = {zoom!r}: use a magnification in [{low}, {high}] "
                           "(1.0 = as is), or null for the model's own evaluate.tta_zoom")
    return float(zoom)


def trained_class_factors(model_dir: Path) -> list[float] | None:
    """The prior correction the train stage fitted on validation (None for older models)."""
    from pipeline.train import SUMMARY_NAME

    summary = model_dir / SUMMARY_NAME
    if not summary.is_file():
        return None
    return (json.loads(summary.read_text()).get("decision") or {}).get("class_factors")


def run(cfg: DictConfig) -> pd.DataFrame:
    from pipeline.evaluate import load_model
    from pipeline.prepare import load_images

    model_dir = Path(cfg.model_dir)
    saved_config = model_dir / "config.yaml"
    if not saved_config.is_file():
        raise PredictError(f"model_dir = {str(model_dir)!r}: no config.yaml; point it at a "
                           "folder written by the train stage")
    trained = OmegaConf.load(saved_config)
    classes = list(OmegaConf.to_container(trained.data.classes))
    given, paths = list_inputs(Path(str(cfg.input)), cfg.image_column)  # fail fast on bad input
    tta, zoom = tta_mode(cfg, trained), tta_zoom(cfg, trained)  # also before any image is read
    model = load_model(model_dir)
    images, kept, skipped = load_images(paths, trained.prepare, given)
    for s in skipped:
        log.warning("skipped %s", s["reason"])
    if not kept.any():
        raise PredictError(f"input = {str(cfg.input)!r}: none of the {len(paths)} images could "
                           "be read")
    x = images[kept]
    factors = trained_class_factors(model_dir)
    log.info("test-time views: %s (%d per image, magnified %gx); prior correction factors %s",
             tta, TTA_MODES[tta], zoom, factors)
    if cfg.mc_dropout_samples > 0:
        draws = mc_dropout_probabilities(model, x, int(cfg.mc_dropout_samples),
                                         int(cfg.batch_size), int(cfg.seed), tta, factors,
                                         zoom=zoom)
        proba = draws.mean(axis=0)
        winner = proba.argmax(axis=1)
        spread = draws[:, np.arange(len(x)), winner].std(axis=0)
    else:
        proba = predict_proba(model, x, tta, int(cfg.batch_size), factors, zoom=zoom)
        spread = np.full(len(x), np.nan)
    entropy = -(proba * np.log(np.clip(proba, 1e-12, 1))).sum(axis=1)
    result = pd.DataFrame({"image": np.array(given)[kept],
                           "predicted": np.array(classes)[proba.argmax(axis=1)]})
    for k, c in enumerate(classes):
        result[f"p_{c}"] = proba[:, k]
    result["entropy"] = entropy
    result["mc_dropout_std"] = spread
    out = Path(str(cfg.output))
    with atomic_path(out) as tmp:
        result.to_csv(tmp, index=False)
    log.info("wrote %d predictions to %s (%d images skipped)", len(result), out, len(skipped))
    return result


def main() -> None:
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="predict", version_base="1.3")
    def entry(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except PipelineError as err:
            log.error("%s", err)
            sys.exit(2)

    entry()


if __name__ == "__main__":
    main()
