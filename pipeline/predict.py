"""Apply a trained model to new galaxies: a catalog CSV or a folder of images.

    python -m pipeline.predict model_dir=models/transfer input=cat.csv image_column=filename \\
        output=preds.csv

The model folder is the whole bundle (:class:`pipeline.artifacts.TrainedModel`): the
preprocessing (centre crop, resize, normalisation) comes from its saved ``config.yaml``, and the
test-time views and prior correction from its ``inference.json``, so the probabilities are those
evaluate scored. Each row of the output has the image path as given, the predicted class, one
probability per class, the predictive entropy, and, with Monte Carlo dropout, the spread of the
winning class's probability over dropout masks (Gal & Ghahramani 2016).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pipeline.artifacts import INFERENCE_NAME, TrainedModel, load_trained_config
from pipeline.catalog import read_csv_catalog
from pipeline.config import stage_main, validate_predict
from pipeline.errors import PipelineError
from pipeline.inference import TTA_MODES
from pipeline.io import (
    DEFAULT_MAX_PIXELS,
    DISPLAY_SUFFIXES,
    FITS_SUFFIXES,
    OutputError,
    atomic_path,
    check_replaceable,
    is_within,
)
from pipeline.preprocess import load_images

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


def run(cfg: DictConfig) -> pd.DataFrame:
    cfg = validate_predict(cfg)
    model_dir = Path(cfg.model_dir)
    load_trained_config(model_dir)  # a wrong model_dir fails before any image is listed
    input_path, out = Path(str(cfg.input)), Path(str(cfg.output))
    given, paths = list_inputs(input_path, cfg.image_column, cfg.encoding)  # fail fast
    check_output(out, input_path, model_dir, paths)
    trained = TrainedModel.load(model_dir)
    inference = trained.inference
    tta = cfg.tta or inference.tta
    zoom = float(cfg.tta_zoom if cfg.tta_zoom is not None else inference.tta_zoom)
    if (tta, zoom) != (inference.tta, inference.tta_zoom) and \
            inference.prior_correction.class_factors is not None:
        log.warning("views %s at %gx differ from the %s at %gx that the prior correction was "
                    "fitted with on validation (%s); it is applied as fitted", tta, zoom,
                    inference.tta, inference.tta_zoom, INFERENCE_NAME)
    max_pixels = int(cfg.max_image_pixels or trained.max_image_pixels or DEFAULT_MAX_PIXELS)
    images, kept, skipped = load_images(paths, trained.preprocessing, given,
                                        max_pixels=max_pixels)
    for s in skipped:
        log.warning("skipped %s", s["reason"])
    if not kept.any():
        raise PredictError(f"input = {str(cfg.input)!r}: none of the {len(paths)} images could "
                           f"be read; first: {skipped[0]['reason']}")
    x = images[kept]
    log.info("test-time views: %s (%d per image, magnified %gx); prior correction alpha %g",
             tta, TTA_MODES[tta], zoom, inference.prior_correction.alpha)
    if cfg.mc_dropout_samples > 0:
        draws = trained.mc_dropout(x, int(cfg.mc_dropout_samples), int(cfg.batch_size),
                                   int(cfg.seed), tta, zoom)
        proba = draws.mean(axis=0)
        winner = proba.argmax(axis=1)
        spread = draws[:, np.arange(len(x)), winner].std(axis=0)
    else:
        proba = trained.predict_proba(x, int(cfg.batch_size), tta, zoom)
        spread = np.full(len(x), np.nan)
    classes = list(trained.scheme.classes)
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
