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

import functools
import logging
import math
import sys
from collections.abc import Callable
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

    d, p, a, t = merged.data, merged.prepare, merged.augment, merged.train
    _require(d.source in SOURCES, "data.source", d.source, f"one of {list(SOURCES)}")
    _require(len(d.classes) >= 2 and len(set(d.classes)) == len(d.classes), "data.classes",
             list(d.classes), "at least two distinct class names")
    _require(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction", d.max_bad_fraction,
             "a fraction in [0, 1]")
    if d.source == "folder":
        _require(bool(d.folder.catalog), "data.folder.catalog", d.folder.catalog,
                 "the path to a catalog CSV (image path and label columns)")
    if d.source == "sdss":
        _validate_sdss(d)
    m = d.mock
    _require(m.n_per_class >= 1, "data.mock.n_per_class", m.n_per_class, "an integer >= 1")
    _require(m.size >= 16, "data.mock.size", m.size, "a cutout side >= 16 pixels")
    _require(m.pixel_scale > 0, "data.mock.pixel_scale", m.pixel_scale, "> 0 arcsec/pixel")
    _require(m.psf_fwhm > 0, "data.mock.psf_fwhm", m.psf_fwhm, "> 0 arcsec")
    _require(len(m.flux_range) == 2 and 0 < m.flux_range[0] <= m.flux_range[1],
             "data.mock.flux_range", list(m.flux_range), "[low, high] with 0 < low <= high")
    _require(0 <= m.star_probability <= 1, "data.mock.star_probability", m.star_probability,
             "a probability in [0, 1]")

    _require(p.image_size >= 16, "prepare.image_size", p.image_size, "an integer >= 16")
    _require(0 < p.center_crop <= 1, "prepare.center_crop", p.center_crop, "a fraction in (0, 1]")
    _require(0 < p.white_percentile <= 100, "prepare.white_percentile", p.white_percentile,
             "a percentile in (0, 100]")
    fractions = (p.split.train, p.split.val, p.split.test)
    _require(all(f > 0 for f in fractions) and math.isclose(sum(fractions), 1.0, abs_tol=1e-6),
             "prepare.split", dict(zip(("train", "val", "test"), fractions, strict=True)),
             "three positive fractions that sum to 1")

    _require(a.mode in ("stored", "on_the_fly"), "augment.mode", a.mode,
             "'stored' (copies written by prepare) or 'on_the_fly' (drawn in the tf.data "
             "pipeline every epoch)")
    _require(a.copies >= 0, "augment.copies", a.copies, "an integer >= 0")
    _require(0 <= a.rotation_degrees <= 180, "augment.rotation_degrees", a.rotation_degrees,
             "degrees in [0, 180]")
    _require(0 <= a.zoom < 1, "augment.zoom", a.zoom, "a fraction in [0, 1)")
    _require(a.blur_sigma >= 0, "augment.blur_sigma", a.blur_sigma, "pixels >= 0")
    _require(0 <= a.blur_probability <= 1, "augment.blur_probability", a.blur_probability,
             "a probability in [0, 1]")
    _require(0 < a.crop_fraction <= 1, "augment.crop_fraction", a.crop_fraction,
             "a fraction in (0, 1]")

    _require(merged.evaluate.tta in TTA_MODES, "evaluate.tta", merged.evaluate.tta,
             f"one of {list(TTA_MODES)} (test-time views averaged per image)")
    _require(TTA_ZOOM_RANGE[0] <= merged.evaluate.tta_zoom <= TTA_ZOOM_RANGE[1],
             "evaluate.tta_zoom", merged.evaluate.tta_zoom,
             f"a magnification in [{TTA_ZOOM_RANGE[0]}, {TTA_ZOOM_RANGE[1]}] (1.0 = as is)")

    _validate_train(t, "train")
    _require(len(merged.models) >= 1, "models", {}, "at least one model entry")
    _require(merged.model in merged.models, "model", merged.model,
             f"one of {list(merged.models)} (the keys of 'models')")
    for name, mc in merged.models.items():
        k = f"models.{name}"
        _require(mc.kind in ("cnn", "transfer"), f"{k}.kind", mc.kind, "'cnn' or 'transfer'")
        _require(mc.activation in ACTIVATIONS, f"{k}.activation", mc.activation,
                 f"one of {list(ACTIVATIONS)}")
        _require(0 <= mc.dropout < 1, f"{k}.dropout", mc.dropout, "a fraction in [0, 1)")
        _require(mc.l2 >= 0, f"{k}.l2", mc.l2, "a weight >= 0")
        _require(mc.dense_units >= 0, f"{k}.dense_units", mc.dense_units, "an integer >= 0")
        _require(mc.padding in PADDINGS, f"{k}.padding", mc.padding, f"one of {list(PADDINGS)}")
        _require(len(mc.filters) >= 1 and all(f >= 1 for f in mc.filters), f"{k}.filters",
                 list(mc.filters), "a non-empty list of positive integers")
        _require(mc.kernel_size >= 1, f"{k}.kernel_size", mc.kernel_size, "an integer >= 1")
        _require(mc.pool_size >= 1, f"{k}.pool_size", mc.pool_size, "an integer >= 1")
        _require(mc.backbone in BACKBONES, f"{k}.backbone", mc.backbone,
                 f"one of {list(BACKBONES)}")
        _validate_train(model_train_config(merged, name), f"{k}.train")
        _require(mc.input_size is None or mc.input_size >= 32, f"{k}.input_size", mc.input_size,
                 "null (use prepare.image_size) or an integer >= 32")
        _require(mc.fine_tune_layers >= 0, f"{k}.fine_tune_layers", mc.fine_tune_layers,
                 "an integer >= 0")
        _require(mc.fine_tune_epochs >= 0, f"{k}.fine_tune_epochs", mc.fine_tune_epochs,
                 "an integer >= 0")
        _require(mc.fine_tune_learning_rate > 0, f"{k}.fine_tune_learning_rate",
                 mc.fine_tune_learning_rate, "a positive number")

    return merged


def _fraction(value) -> float | None:
    """``value`` as a number in [0, 1], or None if it is not one."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if 0.0 <= number <= 1.0 else None


def _validate_train(t: DictConfig, key: str) -> None:
    """Range checks of a train config: the shared one, or a model's merged one."""
    _require(t.epochs >= 1, f"{key}.epochs", t.epochs, "an integer >= 1")
    _require(t.batch_size >= 1, f"{key}.batch_size", t.batch_size, "an integer >= 1")
    _require(t.learning_rate > 0, f"{key}.learning_rate", t.learning_rate, "a positive number")
    _require(t.early_stopping_patience >= 1, f"{key}.early_stopping_patience",
             t.early_stopping_patience, "an integer >= 1")
    _require(t.early_stopping_min_delta >= 0, f"{key}.early_stopping_min_delta",
             t.early_stopping_min_delta, "a loss change >= 0")
    _require(0 < t.reduce_lr_factor < 1, f"{key}.reduce_lr_factor", t.reduce_lr_factor,
             "a factor in (0, 1)")
    _require(t.strategy in STRATEGIES, f"{key}.strategy", t.strategy, f"one of {list(STRATEGIES)}")
    _require(t.class_weight in CLASS_BALANCE, f"{key}.class_weight", t.class_weight,
             "'balanced' (inverse-frequency loss weights), 'resample' (every class drawn "
             "equally often each epoch) or 'none'")
    _require(t.lr_schedule in LR_SCHEDULES, f"{key}.lr_schedule", t.lr_schedule,
             f"one of {list(LR_SCHEDULES)}")
    _require(t.warmup_epochs >= 0, f"{key}.warmup_epochs", t.warmup_epochs, "an integer >= 0")
    _require(t.min_epochs >= 0, f"{key}.min_epochs", t.min_epochs, "an integer >= 0")
    _require(0 <= t.ema_momentum < 1, f"{key}.ema_momentum", t.ema_momentum,
             "a momentum in [0, 1): 0 = no weight averaging, 0.99 = average over ~100 steps")
    _require(t.prior_correction in ("fit", "none") or _fraction(t.prior_correction) is not None,
             f"{key}.prior_correction", t.prior_correction,
             "'fit' (undo part of the class weights, alpha chosen on validation macro-F1), "
             "'none', or a fixed alpha in [0, 1]")


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
    _require(s.n_per_class >= 1, "data.sdss.n_per_class", s.n_per_class, "an integer >= 1")
    _require(s.candidates_per_class >= s.n_per_class, "data.sdss.candidates_per_class",
             s.candidates_per_class, f">= data.sdss.n_per_class ({s.n_per_class})")
    _require(s.image_type in ("jpeg", "fits"), "data.sdss.image_type", s.image_type,
             "'jpeg' or 'fits'")
    for key in ("skyserver_url", "sas_url"):
        url = str(s[key])
        _require(url.startswith(("http://", "https://")) and " " not in url,
                 f"data.sdss.{key}", url, "an http(s) URL")
    _require(s.timeout_s > 0, "data.sdss.timeout_s", s.timeout_s, "seconds > 0")
    _require(s.retries >= 0, "data.sdss.retries", s.retries, "an integer >= 0")
    _require(s.backoff_s >= 0, "data.sdss.backoff_s", s.backoff_s, "seconds >= 0")
    _require(1 <= s.concurrency <= 64, "data.sdss.concurrency", s.concurrency,
             "1 to 64 requests at once (be polite to the archive)")
    _require(s.max_bytes > 0, "data.sdss.max_bytes", s.max_bytes, "bytes > 0")
    j = s.jpeg
    _require(16 <= j.size <= 2048, "data.sdss.jpeg.size", j.size, "16 to 2048 pixels")
    _require(j.scale_mode in ("fixed", "petrosian"), "data.sdss.jpeg.scale_mode",
             j.scale_mode, "'fixed' or 'petrosian'")
    _require(0 < j.min_scale <= j.scale <= j.max_scale or j.scale_mode == "petrosian",
             "data.sdss.jpeg.scale", j.scale, "arcsec/pixel within [min_scale, max_scale]")
    _require(0 < j.min_scale <= j.max_scale, "data.sdss.jpeg.min_scale", j.min_scale,
             "0 < min_scale <= max_scale")
    _require(j.petrosian_factor > 0, "data.sdss.jpeg.petrosian_factor", j.petrosian_factor,
             "> 0 (cutout width in Petrosian R90 radii)")
    _require(8 <= s.fits.size <= 1024, "data.sdss.fits.size", s.fits.size, "8 to 1024 pixels")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]


# --------------------------------------------------------------------------- composition
def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/`` exactly as DVC's Hydra integration does for ``params.yaml``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [])


def write_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Path:
    """Write the composed ``conf/`` to ``params.yaml`` (what ``dvc exp run`` does itself)."""
    from pipeline.io import atomic_write_text

    cfg = compose(overrides)
    OmegaConf.resolve(cfg)
    validate(cfg)  # a bad value fails here, before params.yaml is touched
    return atomic_write_text(Path(path), OmegaConf.to_yaml(cfg))


def stage_main(run: Callable[[DictConfig], Any], objective: str | None = None
               ) -> Callable[[], Any]:
    """Wrap a stage's ``run(cfg)`` as a Hydra entry point that validates first.

    A :class:`~pipeline.errors.PipelineError` (bad config, data or input) ends the process
    with one clear line and status 2 instead of a traceback.
    ``objective`` names the key of the result returned to Hydra, which sweepers such as Optuna
    minimise.
    """
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    @functools.wraps(run)
    def entry(cfg: DictConfig) -> Any:
        try:
            result = run(validate(cfg))
        except PipelineError as err:
            log.error("%s", err)
            sys.exit(2)
        return result[objective] if objective else None

    return entry


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = write_params("params.yaml", sys.argv[1:])
    except PipelineError as err:
        log.error("%s", err)
        sys.exit(2)
    log.info("wrote %s from conf/ %s", out, " ".join(sys.argv[1:]))
