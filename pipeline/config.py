"""Typed config schemas, validation, and the Hydra entry point shared by every stage.

`conf/` is the source of truth. Two routes reach a stage's ``run(cfg)``:

* by hand or in a Hydra multirun, ``python -m pipeline.train model=transfer`` composes ``conf/``;
* under DVC, the stage reads the composed, git-tracked ``params.yaml`` as its primary config
  (``--config-dir . --config-name params``), because DVC composes ``conf/`` into
  ``params.yaml`` only on ``dvc exp run``, never on ``dvc repro``.

Either way :func:`validate` checks the whole config against the dataclasses below before any
work starts, so a typo or a bad value fails in the first second with the key, the value and
what would be valid.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import logging
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import PipelineError
from pipeline.inference import TTA_MODES

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

ACTIVATIONS = ("relu", "elu", "selu", "gelu", "silu", "swish", "tanh", "sigmoid",
               "leaky_relu", "mish", "softplus", "linear")
PADDINGS = ("valid", "same")
SOURCES = ("mock", "folder", "sdss")
BACKBONES = ("mobilenet_v2", "mobilenet")
STRATEGIES = ("default", "mirrored", "multi_worker")
LR_SCHEDULES = ("plateau", "cosine")
CLASS_BALANCE = ("balanced", "resample", "none")
TTA_ZOOM_RANGE = (0.5, 2.0)
SEED_MAX = 2**32 - 1  # numpy and TensorFlow both take seeds in [0, 2**32)
# Width multipliers that keras.applications has ImageNet weights for.
PRETRAINED_ALPHAS = {"mobilenet_v2": (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
                     "mobilenet": (0.25, 0.5, 0.75, 1.0)}
MODEL_NAME = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(PipelineError, ValueError):
    """A config value that cannot work; the message names the key and what is valid."""


# --------------------------------------------------------------------------- schemas
@dataclass
class PathsConfig:
    raw: str = "data/raw"
    prepared: str = "data/prepared"
    models: str = "models"
    reports: str = "reports"
    backup: str = ".cache/train-backup"


@dataclass
class MockConfig:
    n_per_class: int = 600
    size: int = 64
    pixel_scale: float = 0.396
    psf_fwhm: float = 1.4
    psf_fwhm_jitter: float = 0.2
    sky_counts: float = 150.0
    flux_range: list[float] = field(default_factory=lambda: [8.0e3, 3.0e5])
    star_probability: float = 0.25
    oversample: int = 2


@dataclass
class FolderConfig:
    catalog: str | None = None
    image_column: str = "filename"
    label_column: str = "label"
    id_column: str | None = None
    ra_column: str | None = None
    dec_column: str | None = None
    image_root: str | None = None
    encoding: str = "utf-8"
    label_map: dict[str, str] | None = None
    credit: str | None = None


@dataclass
class SdssJpegConfig:
    size: int = 128
    scale_mode: str = "petrosian"
    scale: float = 0.396
    petrosian_factor: float = 8.46
    min_scale: float = 0.1
    max_scale: float = 2.0


@dataclass
class SdssFitsConfig:
    size: int = 64


@dataclass
class SdssConfig:
    catalog: str = "gz1"
    data_release: int = 17
    vote_threshold: float = 0.8
    n_per_class: int = 1000
    candidates_per_class: int = 5000
    image_type: str = "jpeg"
    skyserver_url: str = "https://skyserver.sdss.org"
    sas_url: str = "https://data.sdss.org/sas"
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 1.0
    concurrency: int = 8
    max_bytes: int = 50_000_000
    cache_dir: str = ".cache/sdss"
    jpeg: SdssJpegConfig = field(default_factory=SdssJpegConfig)
    fits: SdssFitsConfig = field(default_factory=SdssFitsConfig)


@dataclass
class DataConfig:
    source: str = "mock"
    classes: list[str] = field(default_factory=lambda: ["elliptical", "spiral", "edge_on"])
    max_bad_fraction: float = 0.05
    max_image_pixels: int = 20_000_000
    mock: MockConfig = field(default_factory=MockConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)
    sdss: SdssConfig = field(default_factory=SdssConfig)


@dataclass
class SplitConfig:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    seed: int = 1234


@dataclass
class PrepareConfig:
    image_size: int = 64
    center_crop: float = 1.0
    softening_sigmas: float = 3.0
    white_percentile: float = 99.5
    split: SplitConfig = field(default_factory=SplitConfig)
    grid_examples: int = 6


@dataclass
class AugmentConfig:
    mode: str = "stored"
    copies: int = 2
    rotation_degrees: float = 180.0
    zoom: float = 0.15
    blur_sigma: float = 1.0
    blur_probability: float = 0.5
    flip: bool = True
    crop_fraction: float = 0.85
    batch_size: int = 512


@dataclass
class ModelConfig:
    """Both architectures in one schema; ``kind`` says which keys the builder reads."""

    kind: str = "cnn"
    train: dict[str, Any] = field(default_factory=dict)  # this model's train.* overrides
    # shared head
    dense_units: int = 128
    dropout: float = 0.3
    l2: float = 1e-4
    activation: str = "relu"
    # cnn
    filters: list[int] = field(default_factory=lambda: [32, 64, 128])
    kernel_size: int = 3
    padding: str = "same"
    pool_size: int = 2
    batch_norm: bool = True
    # both: side the image is resized to inside the model (None = prepare.image_size)
    input_size: int | None = None
    # transfer
    backbone: str = "mobilenet_v2"
    alpha: float = 1.0
    weights: str | None = "imagenet"
    allow_random_init: bool = True
    fine_tune_layers: int = 30
    fine_tune_epochs: int = 10
    fine_tune_learning_rate: float = 1e-4


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    early_stopping_patience: int = 5
    early_stopping_min_delta: float = 1e-3
    reduce_lr_patience: int = 3
    reduce_lr_factor: float = 0.3
    lr_schedule: str = "plateau"
    warmup_epochs: int = 0
    class_weight: str = "balanced"
    prior_correction: str = "fit"
    min_epochs: int = 0
    ema_momentum: float = 0.0
    seed: int = 42
    deterministic: bool = False
    mixed_precision: bool = False
    jit_compile: bool = False
    strategy: str = "default"
    verbose: int = 2


@dataclass
class EvaluateConfig:
    tta: str = "dihedral"
    tta_zoom: float = 1.0


@dataclass
class PredictConfig:
    """``conf/predict.yaml``: applying a trained model to new images."""

    model_dir: str = "models/transfer"
    input: str = "???"
    image_column: str = "filename"
    encoding: str = "utf-8"
    output: str = "predictions.csv"
    batch_size: int = 256
    tta: str | None = None
    tta_zoom: float | None = None
    mc_dropout_samples: int = 30
    seed: int = 0
    max_image_pixels: int | None = None


@dataclass
class Config:
    seed: int = 42
    model: str = "cnn"
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# --------------------------------------------------------------------------- validation
def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: {valid}")


def validate(cfg: DictConfig | dict) -> DictConfig:
    """Return ``cfg`` merged onto the typed schema, or raise :class:`ConfigError`.

    The merge catches unknown keys and wrong types; the checks below catch values that type
    checks cannot (ranges, choices, fractions that must sum to 1).
    """
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {_first_line(err)}") from None

    _require(0 <= merged.seed <= SEED_MAX, "seed", merged.seed, f"an integer in [0, {SEED_MAX}]")
    _validate_paths(merged.paths)
    _validate_data(merged.data)
    _validate_prepare(merged.prepare)
    _validate_augment(merged.augment)
    _require(merged.evaluate.tta in TTA_MODES, "evaluate.tta", merged.evaluate.tta,
             f"one of {list(TTA_MODES)} (test-time views averaged per image)")
    _require(TTA_ZOOM_RANGE[0] <= merged.evaluate.tta_zoom <= TTA_ZOOM_RANGE[1],
             "evaluate.tta_zoom", merged.evaluate.tta_zoom,
             f"a magnification in [{TTA_ZOOM_RANGE[0]}, {TTA_ZOOM_RANGE[1]}] (1.0 = as is)")

    _validate_train(merged.train, "train")
    _require(len(merged.models) >= 1, "models", {}, "at least one model entry")
    _require(merged.model in merged.models, "model", merged.model,
             f"one of {list(merged.models)} (the keys of 'models')")
    for name, mc in merged.models.items():
        _validate_model(merged, name, mc)
    return merged


def validate_predict(cfg: DictConfig | dict) -> DictConfig:
    """``conf/predict.yaml`` merged onto :class:`PredictConfig`, or a :class:`ConfigError`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PredictConfig), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {_first_line(err)}") from None
    _require(not OmegaConf.is_missing(merged, "input"), "input", "???",
             "a catalog CSV or a folder of images (input=path)")
    for key in ("model_dir", "input", "output", "image_column"):
        _require(bool(str(merged[key]).strip()), key, merged[key], "a non-empty value")
    _require(1 <= merged.batch_size <= 65536, "batch_size", merged.batch_size,
             "an integer in [1, 65536]")
    _require(0 <= merged.mc_dropout_samples <= 10_000, "mc_dropout_samples",
             merged.mc_dropout_samples, "an integer in [0, 10000] (0 = off)")
    _require(0 <= merged.seed <= SEED_MAX, "seed", merged.seed, f"an integer in [0, {SEED_MAX}]")
    _require(merged.tta is None or merged.tta in TTA_MODES, "tta", merged.tta,
             f"one of {list(TTA_MODES)}, or null for the model's own evaluate.tta")
    low, high = TTA_ZOOM_RANGE
    _require(merged.tta_zoom is None or _in(merged.tta_zoom, low, high), "tta_zoom",
             merged.tta_zoom, f"a magnification in [{low}, {high}] (1.0 = as is), or null for "
             "the model's own evaluate.tta_zoom")
    _require(merged.max_image_pixels is None or 256 <= merged.max_image_pixels <= 10**9,
             "max_image_pixels", merged.max_image_pixels,
             "pixels per image in [256, 1e9], or null for the model's own limit")
    try:
        codecs.lookup(str(merged.encoding))
    except LookupError:
        _require(False, "encoding", merged.encoding,
                 "a Python text encoding such as utf-8, latin-1 or cp1252")
    return merged


def _in(value: float, low: float, high: float) -> bool:
    """``low <= value <= high`` for a finite number (NaN and inf fail)."""
    return math.isfinite(value) and low <= value <= high


def _validate_paths(paths: DictConfig) -> None:
    """Each output folder stands alone: none is another, lies inside another, or holds the
    project, because stages replace their outputs whole."""
    cwd = Path.cwd().resolve()
    resolved = {}
    for key, value in paths.items():
        _require(bool(str(value).strip()), f"paths.{key}", value, "a folder path")
        path = Path(str(value)).expanduser().resolve()
        _require(not cwd.is_relative_to(path), f"paths.{key}", str(value),
                 "a folder that does not hold the project (outputs are replaced whole)")
        resolved[key] = path
    for key, path in resolved.items():
        for other, other_path in resolved.items():
            if key != other:
                _require(not path.is_relative_to(other_path), f"paths.{key}", paths[key],
                         f"a folder apart from paths.{other} = {paths[other]!r} (each stage "
                         "replaces its output whole)")


def _validate_data(d: DictConfig) -> None:
    _require(d.source in SOURCES, "data.source", d.source, f"one of {list(SOURCES)}")
    _require(len(d.classes) >= 2 and len(set(d.classes)) == len(d.classes), "data.classes",
             list(d.classes), "at least two distinct class names")
    _require(all(MODEL_NAME.fullmatch(str(c)) for c in d.classes), "data.classes",
             list(d.classes), "names of letters, digits, '_' and '-'")
    _require(_in(d.max_bad_fraction, 0, 1), "data.max_bad_fraction", d.max_bad_fraction,
             "a fraction in [0, 1]")
    _require(256 <= d.max_image_pixels <= 10**9, "data.max_image_pixels", d.max_image_pixels,
             "pixels per image in [256, 1e9] (about 12 bytes each while decoding)")
    if d.source == "folder":
        _require(bool(d.folder.catalog), "data.folder.catalog", d.folder.catalog,
                 "the path to a catalog CSV (image path and label columns)")
        _require(bool(d.folder.image_column) and bool(d.folder.label_column),
                 "data.folder.image_column", d.folder.image_column,
                 "the names of the catalog's image and label columns")
    try:
        codecs.lookup(str(d.folder.encoding))
    except LookupError:
        _require(False, "data.folder.encoding", d.folder.encoding,
                 "a Python text encoding such as utf-8, latin-1 or cp1252")
    if d.source == "sdss":
        _validate_sdss(d)
    m = d.mock
    _require(1 <= m.n_per_class <= 100_000, "data.mock.n_per_class", m.n_per_class,
             "an integer in [1, 100000]")
    _require(16 <= m.size <= 1024, "data.mock.size", m.size, "a cutout side in [16, 1024] pixels")
    _require(_in(m.pixel_scale, 0.01, 10), "data.mock.pixel_scale", m.pixel_scale,
             "arcsec/pixel in [0.01, 10]")
    _require(_in(m.psf_fwhm, 0.05, 20), "data.mock.psf_fwhm", m.psf_fwhm,
             "arcsec in [0.05, 20]")
    _require(_in(m.psf_fwhm_jitter, 0, m.psf_fwhm) and m.psf_fwhm_jitter < m.psf_fwhm,
             "data.mock.psf_fwhm_jitter", m.psf_fwhm_jitter,
             f"arcsec in [0, data.mock.psf_fwhm = {m.psf_fwhm}) so the seeing stays positive")
    _require(_in(m.sky_counts, 0, 1e9), "data.mock.sky_counts", m.sky_counts,
             "counts per pixel in [0, 1e9]")
    _require(len(m.flux_range) == 2 and all(_in(f, 1e-3, 1e15) for f in m.flux_range)
             and m.flux_range[0] <= m.flux_range[1], "data.mock.flux_range",
             list(m.flux_range), "[low, high] counts with 0 < low <= high")
    _require(_in(m.star_probability, 0, 1), "data.mock.star_probability", m.star_probability,
             "a probability in [0, 1]")
    _require(1 <= m.oversample <= 8, "data.mock.oversample", m.oversample,
             "an integer in [1, 8] (render this many times finer, then bin)")


def _validate_prepare(p: DictConfig) -> None:
    _require(16 <= p.image_size <= 1024, "prepare.image_size", p.image_size,
             "an integer in [16, 1024] pixels")
    _require(_in(p.center_crop, 0, 1) and p.center_crop > 0, "prepare.center_crop",
             p.center_crop, "a fraction in (0, 1]")
    _require(_in(p.softening_sigmas, 0.01, 1000), "prepare.softening_sigmas",
             p.softening_sigmas, "sky-noise sigmas in [0.01, 1000] (0 would divide by zero)")
    _require(_in(p.white_percentile, 50, 100), "prepare.white_percentile", p.white_percentile,
             "a percentile in [50, 100]")
    _require(1 <= p.grid_examples <= 50, "prepare.grid_examples", p.grid_examples,
             "an integer in [1, 50]")
    s = p.split
    fractions = (s.train, s.val, s.test)
    _require(all(_in(f, 0, 1) and f > 0 for f in fractions)
             and math.isclose(sum(fractions), 1.0, abs_tol=1e-6),
             "prepare.split", dict(zip(("train", "val", "test"), fractions, strict=True)),
             "three positive fractions that sum to 1")
    _require(0 <= s.seed <= SEED_MAX, "prepare.split.seed", s.seed,
             f"an integer in [0, {SEED_MAX}]")


def _validate_augment(a: DictConfig) -> None:
    _require(a.mode in ("stored", "on_the_fly"), "augment.mode", a.mode,
             "'stored' (copies written by prepare) or 'on_the_fly' (drawn in the tf.data "
             "pipeline every epoch)")
    _require(0 <= a.copies <= 50, "augment.copies", a.copies, "an integer in [0, 50]")
    _require(_in(a.rotation_degrees, 0, 180), "augment.rotation_degrees", a.rotation_degrees,
             "degrees in [0, 180]")
    _require(_in(a.zoom, 0, 0.9), "augment.zoom", a.zoom, "a fraction in [0, 0.9]")
    _require(_in(a.blur_sigma, 0, 20), "augment.blur_sigma", a.blur_sigma,
             "pixels in [0, 20]")
    _require(_in(a.blur_probability, 0, 1), "augment.blur_probability", a.blur_probability,
             "a probability in [0, 1]")
    _require(_in(a.crop_fraction, 0.1, 1), "augment.crop_fraction", a.crop_fraction,
             "a fraction in [0.1, 1]")
    _require(1 <= a.batch_size <= 65536, "augment.batch_size", a.batch_size,
             "images per batch in [1, 65536]")


def _validate_model(cfg: DictConfig, name: str, mc: DictConfig) -> None:
    k = f"models.{name}"
    _require(bool(MODEL_NAME.fullmatch(name)) and name != "cards", "models", name,
             "model names of letters, digits, '_' and '-' (they name folders), not 'cards'")
    _require(mc.kind in ("cnn", "transfer"), f"{k}.kind", mc.kind, "'cnn' or 'transfer'")
    _require(mc.activation in ACTIVATIONS, f"{k}.activation", mc.activation,
             f"one of {list(ACTIVATIONS)}")
    _require(_in(mc.dropout, 0, 1) and mc.dropout < 1, f"{k}.dropout", mc.dropout,
             "a fraction in [0, 1)")
    _require(_in(mc.l2, 0, 1), f"{k}.l2", mc.l2, "a weight in [0, 1]")
    _require(0 <= mc.dense_units <= 65536, f"{k}.dense_units", mc.dense_units,
             "an integer in [0, 65536]")
    _require(mc.padding in PADDINGS, f"{k}.padding", mc.padding, f"one of {list(PADDINGS)}")
    _require(1 <= len(mc.filters) <= 32 and all(1 <= f <= 4096 for f in mc.filters),
             f"{k}.filters", list(mc.filters), "1 to 32 integers in [1, 4096]")
    _require(1 <= mc.kernel_size <= 31, f"{k}.kernel_size", mc.kernel_size,
             "an integer in [1, 31]")
    _require(1 <= mc.pool_size <= 8, f"{k}.pool_size", mc.pool_size, "an integer in [1, 8]")
    _require(mc.backbone in BACKBONES, f"{k}.backbone", mc.backbone,
             f"one of {list(BACKBONES)}")
    _validate_train(model_train_config(cfg, name), f"{k}.train")
    _require(mc.input_size is None or 32 <= mc.input_size <= 1024, f"{k}.input_size",
             mc.input_size, "null (use prepare.image_size) or an integer in [32, 1024]")
    size = int(mc.input_size or cfg.prepare.image_size)
    if mc.kind == "cnn":
        side = size
        for _ in mc.filters:
            side = (side - (mc.kernel_size - 1 if mc.padding == "valid" else 0)) // mc.pool_size
        _require(side >= 1, f"{k}.filters", list(mc.filters),
                 f"few enough blocks that a {size}-pixel image (padding '{mc.padding}', kernel "
                 f"{mc.kernel_size}, pool {mc.pool_size}) keeps at least 1 pixel: use fewer "
                 f"blocks, padding 'same', or a larger {k}.input_size / prepare.image_size")
    else:
        _require(size >= 32, f"{k}.input_size", mc.input_size,
                 f"a side of at least 32 pixels for {mc.backbone} (set {k}.input_size, or "
                 f"prepare.image_size >= 32; it is {cfg.prepare.image_size})")
    pretrained = mc.weights is not None and str(mc.weights).lower() not in ("null", "none", "")
    alphas = PRETRAINED_ALPHAS[mc.backbone]
    _require(_in(mc.alpha, 0.01, 4) and (not pretrained or mc.alpha in alphas), f"{k}.alpha",
             mc.alpha, f"one of {list(alphas)} for pretrained {mc.backbone} weights "
             "(any width in (0, 4] with weights null)")
    _require(0 <= mc.fine_tune_layers <= 10_000, f"{k}.fine_tune_layers", mc.fine_tune_layers,
             "an integer in [0, 10000]")
    _require(0 <= mc.fine_tune_epochs <= 10_000, f"{k}.fine_tune_epochs", mc.fine_tune_epochs,
             "an integer in [0, 10000]")
    _require(_in(mc.fine_tune_learning_rate, 0, 10) and mc.fine_tune_learning_rate > 0,
             f"{k}.fine_tune_learning_rate", mc.fine_tune_learning_rate,
             "a positive number up to 10")


def _fraction(value) -> float | None:
    """``value`` as a number in [0, 1], or None if it is not one."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if 0.0 <= number <= 1.0 else None


def _validate_train(t: DictConfig, key: str) -> None:
    """Range checks of a train config: the shared one, or a model's merged one."""
    _require(1 <= t.epochs <= 10_000, f"{key}.epochs", t.epochs, "an integer in [1, 10000]")
    _require(1 <= t.batch_size <= 65536, f"{key}.batch_size", t.batch_size,
             "an integer in [1, 65536]")
    _require(_in(t.learning_rate, 0, 10) and t.learning_rate > 0, f"{key}.learning_rate",
             t.learning_rate, "a positive number up to 10")
    _require(1 <= t.early_stopping_patience <= 10_000, f"{key}.early_stopping_patience",
             t.early_stopping_patience, "an integer in [1, 10000]")
    _require(_in(t.early_stopping_min_delta, 0, 100), f"{key}.early_stopping_min_delta",
             t.early_stopping_min_delta, "a loss change in [0, 100]")
    _require(0 <= t.reduce_lr_patience <= 10_000, f"{key}.reduce_lr_patience",
             t.reduce_lr_patience, "an integer in [0, 10000]")
    _require(_in(t.reduce_lr_factor, 0, 1) and 0 < t.reduce_lr_factor < 1,
             f"{key}.reduce_lr_factor", t.reduce_lr_factor, "a factor in (0, 1)")
    _require(t.strategy in STRATEGIES, f"{key}.strategy", t.strategy, f"one of {list(STRATEGIES)}")
    _require(t.class_weight in CLASS_BALANCE, f"{key}.class_weight", t.class_weight,
             "'balanced' (inverse-frequency loss weights), 'resample' (every class drawn "
             "equally often each epoch) or 'none'")
    _require(t.lr_schedule in LR_SCHEDULES, f"{key}.lr_schedule", t.lr_schedule,
             f"one of {list(LR_SCHEDULES)}")
    _require(0 <= t.warmup_epochs <= 10_000, f"{key}.warmup_epochs", t.warmup_epochs,
             "an integer in [0, 10000]")
    _require(0 <= t.min_epochs <= 10_000, f"{key}.min_epochs", t.min_epochs,
             "an integer in [0, 10000]")
    _require(_in(t.ema_momentum, 0, 1) and t.ema_momentum < 1, f"{key}.ema_momentum",
             t.ema_momentum,
             "a momentum in [0, 1): 0 = no weight averaging, 0.99 = average over ~100 steps")
    _require(t.prior_correction in ("fit", "none") or _fraction(t.prior_correction) is not None,
             f"{key}.prior_correction", t.prior_correction,
             "'fit' (undo part of the class weights, alpha chosen on validation macro-F1), "
             "'none', or a fixed alpha in [0, 1]")
    _require(0 <= t.seed <= SEED_MAX, f"{key}.seed", t.seed, f"an integer in [0, {SEED_MAX}]")
    _require(t.verbose in (0, 1, 2), f"{key}.verbose", t.verbose,
             "0 (silent), 1 (progress bar) or 2 (one line per epoch)")


def model_train_config(cfg: DictConfig, name: str) -> DictConfig:
    """``train`` with ``models.<name>.train`` merged over it: what that model trains with.

    Models differ in what suits them (a CNN from scratch wants more epochs than a frozen
    backbone's head), so each may override any ``train`` key; unknown keys are refused.
    """
    overrides = cfg.models[name].get("train") or {}
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg.train, overrides)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key 'models.{name}.train.{key}': {_first_line(err)}") from None


def _validate_sdss(d: DictConfig) -> None:
    """Everything that reaches SQL or a URL is a checked number or a known name."""
    from pipeline.sources.sdss import GALAXY_ZOO

    s = d.sdss
    _require(s.catalog in GALAXY_ZOO, "data.sdss.catalog", s.catalog,
             f"one of {sorted(GALAXY_ZOO)}")
    known = sorted(GALAXY_ZOO[s.catalog].class_conditions)
    unknown = [c for c in d.classes if c not in known]
    _require(not unknown, "data.classes", list(d.classes),
             f"classes that {s.catalog} can select: {known}")
    _require(8 <= s.data_release <= 19, "data.sdss.data_release", s.data_release,
             "an SDSS data release from 8 to 19")
    _require(0 <= s.vote_threshold <= 1, "data.sdss.vote_threshold", s.vote_threshold,
             "a vote fraction in [0, 1]")
    _require(1 <= s.n_per_class <= 500_000, "data.sdss.n_per_class", s.n_per_class,
             "an integer in [1, 500000]")
    _require(s.n_per_class <= s.candidates_per_class <= 500_000,
             "data.sdss.candidates_per_class", s.candidates_per_class,
             f"an integer from data.sdss.n_per_class ({s.n_per_class}) to 500000 (the CAS "
             "returns at most 500,000 rows)")
    _require(s.image_type in ("jpeg", "fits"), "data.sdss.image_type", s.image_type,
             "'jpeg' or 'fits'")
    for key in ("skyserver_url", "sas_url"):
        url = str(s[key])
        _require(url.startswith(("http://", "https://")) and " " not in url,
                 f"data.sdss.{key}", url, "an http(s) URL")
    _require(_in(s.timeout_s, 0.01, 3600) and s.timeout_s > 0, "data.sdss.timeout_s",
             s.timeout_s, "seconds in (0, 3600] for each whole request")
    _require(0 <= s.retries <= 20, "data.sdss.retries", s.retries, "an integer in [0, 20]")
    _require(_in(s.backoff_s, 0, 600), "data.sdss.backoff_s", s.backoff_s,
             "seconds in [0, 600]")
    _require(1 <= s.concurrency <= 64, "data.sdss.concurrency", s.concurrency,
             "1 to 64 requests at once (be polite to the archive)")
    _require(1024 <= s.max_bytes <= 2**31, "data.sdss.max_bytes", s.max_bytes,
             "bytes in [1024, 2**31]")
    _require(bool(str(s.cache_dir).strip()), "data.sdss.cache_dir", s.cache_dir,
             "a folder for downloads")
    j = s.jpeg
    _require(16 <= j.size <= 2048, "data.sdss.jpeg.size", j.size, "16 to 2048 pixels")
    _require(j.scale_mode in ("fixed", "petrosian"), "data.sdss.jpeg.scale_mode",
             j.scale_mode, "'fixed' or 'petrosian'")
    _require(_in(j.min_scale, 0.01, 100) and _in(j.max_scale, j.min_scale, 100),
             "data.sdss.jpeg.min_scale", j.min_scale,
             "arcsec/pixel with 0.01 <= min_scale <= max_scale <= 100")
    _require(_in(j.scale, j.min_scale, j.max_scale) or j.scale_mode == "petrosian",
             "data.sdss.jpeg.scale", j.scale, "arcsec/pixel within [min_scale, max_scale]")
    _require(_in(j.petrosian_factor, 0.1, 100), "data.sdss.jpeg.petrosian_factor",
             j.petrosian_factor, "cutout widths in Petrosian R90 radii, in [0.1, 100]")
    _require(8 <= s.fits.size <= 1024, "data.sdss.fits.size", s.fits.size, "8 to 1024 pixels")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


# --------------------------------------------------------------------------- composition
def compose(overrides: list[str] | None = None, config_dir: str | Path = CONF_DIR,
            config_name: str = "config") -> DictConfig:
    """Compose ``conf/`` exactly as DVC's Hydra integration does for ``params.yaml``.

    A bad override (an unknown key or group option, a syntax error) is a :class:`ConfigError`
    that names it and what would be valid.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()),
                                   version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides or [])
    except HydraException as err:
        raise composition_error(err, Path(config_dir)) from None


def composition_error(err: Exception, config_dir: Path = CONF_DIR) -> ConfigError:
    """One line for what Hydra reports over several: the override, and what would be valid."""
    text = str(err)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        return ConfigError(f"config group '{group}' has no option '{option}': use one of "
                           f"{options}")
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown:
        key = unknown.group(1)
        return ConfigError(f"config key '{key}' does not exist: check its spelling in conf/, "
                           f"or add a new key with +{key}=<value>")
    return ConfigError(f"cannot read the overrides: {_first_line(err)} (see "
                       "https://hydra.cc/docs/advanced/override_grammar/basic/)")


def write_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Path:
    """Write the composed ``conf/`` to ``params.yaml`` (what ``dvc exp run`` does itself)."""
    from pipeline.io import atomic_write_text

    cfg = compose(overrides)
    OmegaConf.resolve(cfg)
    validate(cfg)  # a bad value fails here, before params.yaml is touched
    return atomic_write_text(Path(path), OmegaConf.to_yaml(cfg))


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """End the process with one line and status 2 on a problem the user can fix: a
    :class:`~pipeline.errors.PipelineError` (bad config, data or input) or a full disk.
    Anything else is a bug and keeps its traceback."""
    from pipeline.io import free_bytes, is_disk_full

    try:
        yield
    except PipelineError as err:
        _report(str(err))
    except OSError as err:
        if not is_disk_full(err):
            raise
        where = Path(err.filename or ".")
        _report(f"{where}: no space left on the device ({free_bytes(where.parent):,} bytes free "
                "there); free some space or point the output at a larger disk")


def _report(message: str) -> None:
    if logging.getLogger().handlers:
        log.error("%s", message)
    else:  # before Hydra has set up logging
        print(f"ERROR {message}", file=sys.stderr)
    sys.exit(2)


def check_command_line(argv: list[str], default_dir: Path = CONF_DIR,
                       default_name: str = "config") -> None:
    """Compose what ``argv`` asks Hydra for, so that a bad override ends in one line and status
    2 before Hydra reports it over several. Flags such as ``--help`` and multiruns (a sweep's
    comma lists) are left to Hydra."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)  # argparse reports bad flags itself
    if args.multirun or args.help or args.hydra_help or args.cfg or args.info \
            or args.shell_completion or args.experimental_rerun:
        return
    with user_errors():
        compose(args.overrides, args.config_dir or default_dir,
                args.config_name or default_name)


def stage_main(run: Callable[[DictConfig], Any], objective: str | None = None,
               config_name: str = "config", validator: Callable[[DictConfig], DictConfig]
               | None = None) -> Callable[[], Any]:
    """Wrap a stage's ``run(cfg)`` as a Hydra entry point that validates first.

    Problems the user can fix end the process with one clear line and status 2 instead of a
    traceback (:func:`user_errors`), composition errors included.
    ``objective`` names the key of the result returned to Hydra, which sweepers such as Optuna
    minimise.
    """
    import hydra

    check = validator or validate

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    @functools.wraps(run)
    def entry(cfg: DictConfig) -> Any:
        with user_errors():
            result = run(check(cfg))
        return result[objective] if objective else None

    def main() -> Any:
        check_command_line(sys.argv[1:], CONF_DIR, config_name)
        return entry()

    return main


if __name__ == "__main__":
    log = logging.getLogger("pipeline.config")  # not "__main__" in what users read
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with user_errors():
        out = write_params("params.yaml", sys.argv[1:])
    log.info("wrote %s from conf/ %s", out, " ".join(sys.argv[1:]))
