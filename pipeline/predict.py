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

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.catalog import read_csv_catalog
from pipeline.config import stage_main, validate_predict
from pipeline.errors import PipelineError
from pipeline.inference import TTA_MODES, mc_dropout_probabilities, predict_proba
from pipeline.io import (
    DEFAULT_MAX_PIXELS,
    DISPLAY_SUFFIXES,
    FITS_SUFFIXES,
    OutputError,
    atomic_path,
    check_replaceable,
    is_within,
    read_json,
)

log = logging.getLogger(__name__)


class PredictError(PipelineError, ValueError):
    """Bad predict input; the message names the key or file."""


def list_inputs(input_path: Path, image_column: str, encoding: str = "utf-8"
                ) -> tuple[list[str], list[Path]]:
    """The paths as the user gave them, and where they are on disk."""
    if input_path.is_dir():
        files = sorted(p for p in input_path.rglob("*")
                       if p.is_file() and p.name.lower().endswith(FITS_SUFFIXES + DISPLAY_SUFFIXES))
        if not files:
            raise PredictError(f"input = {str(input_path)!r}: the folder holds no JPEG, PNG, "
                               "TIFF or FITS images")
        return [str(p) for p in files], files
    if not input_path.is_file():
        raise PredictError(f"input = {str(input_path)!r}: no such file or folder")
    catalog = read_csv_catalog(input_path, "input", encoding, encoding_key="encoding")
    if image_column not in catalog.columns:
        raise PredictError(f"{input_path}: no column image_column = {image_column!r}; the "
                           f"catalog has {list(catalog.columns)}")
    given = catalog[image_column].tolist()
    root = input_path.parent
    return given, [Path(g) if Path(g).is_absolute() else root / g for g in given]


def check_output(output: Path, input_path: Path, model_dir: Path, images: list[Path]) -> None:
    """The predictions file may replace an old predictions file, never an input: not the
    catalog, an image or the model, nothing inside an input folder, and not a folder."""
    check_replaceable(output, "output", None)
    inputs = {"input": input_path, "model_dir": model_dir}
    for key, path in inputs.items():
        inside = is_within(output, path)
        if inside and (path.is_dir() or key == "input"):
            raise OutputError(f"output = {str(output)!r} lies in or is {key} = {str(path)!r}; "
                              "write the predictions somewhere else")
    target = output.expanduser().resolve()
    if any(p.expanduser().resolve() == target for p in images):
        raise OutputError(f"output = {str(output)!r} is one of the input images; write the "
                          "predictions somewhere else")


def tta_mode(cfg: DictConfig, trained: DictConfig) -> str:
    """``tta`` from the command line, else what the model was evaluated with."""
    tta = cfg.get("tta")
    return str(tta if tta is not None else OmegaConf.select(trained, "evaluate.tta",
                                                             default="none"))


def tta_zoom(cfg: DictConfig, trained: DictConfig) -> float:
    """``tta_zoom`` from the command line, else the model's own (1.0 for older models)."""
    zoom = cfg.get("tta_zoom")
    return float(zoom if zoom is not None else OmegaConf.select(trained, "evaluate.tta_zoom",
                                                                 default=1.0))


def trained_class_factors(model_dir: Path) -> list[float] | None:
    """The prior correction the train stage fitted on validation (None for older models)."""
    from pipeline.train import SUMMARY_NAME

    summary = model_dir / SUMMARY_NAME
    if not summary.is_file():
        return None
    return (read_json(summary, "train").get("decision") or {}).get("class_factors")


def load_trained_config(model_dir: Path) -> DictConfig:
    saved = model_dir / "config.yaml"
    if not saved.is_file():
        raise PredictError(f"model_dir = {str(model_dir)!r}: no config.yaml; point it at a "
                           "folder written by the train stage")
    try:
        trained = OmegaConf.load(saved)
        OmegaConf.to_container(trained.data.classes)
    except Exception as err:  # any YAML or structure problem: not a config the train stage wrote
        raise PredictError(f"{saved}: not a config the train stage wrote ({type(err).__name__}: "
                           f"{str(err).strip().splitlines()[0][:160]})") from None
    return trained


def run(cfg: DictConfig) -> pd.DataFrame:
    from pipeline.evaluate import load_model
    from pipeline.prepare import load_images

    cfg = validate_predict(cfg)
    model_dir = Path(cfg.model_dir)
    trained = load_trained_config(model_dir)
    classes = list(OmegaConf.to_container(trained.data.classes))
    input_path, out = Path(str(cfg.input)), Path(str(cfg.output))
    given, paths = list_inputs(input_path, cfg.image_column, cfg.encoding)  # fail fast
    check_output(out, input_path, model_dir, paths)
    tta, zoom = tta_mode(cfg, trained), tta_zoom(cfg, trained)
    max_pixels = int(cfg.max_image_pixels or OmegaConf.select(
        trained, "data.max_image_pixels", default=DEFAULT_MAX_PIXELS))
    model = load_model(model_dir)
    images, kept, skipped = load_images(paths, trained.prepare, given, max_pixels=max_pixels)
    for s in skipped:
        log.warning("skipped %s", s["reason"])
    if not kept.any():
        raise PredictError(f"input = {str(cfg.input)!r}: none of the {len(paths)} images could "
                           f"be read; first: {skipped[0]['reason']}")
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
    with atomic_path(out, key="output") as tmp:
        result.to_csv(tmp, index=False)
    log.info("wrote %d predictions to %s (%d images skipped)", len(result), out, len(skipped))
    return result


main = stage_main(run, config_name="predict", validator=validate_predict)

if __name__ == "__main__":
    main()
