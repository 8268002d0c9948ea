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
import dataclasses
import errno
import functools
import logging
import math
import os
import re
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError, PipelineError, require, within
from pipeline.inference import TTA_MODES
from pipeline.models import ModelCommon
from pipeline.models import registry as model_kinds
from pipeline.sources import registry as source_kinds
from pipeline.sources.sdss import ArchiveConfig, validate_archive

log = logging.getLogger(__name__)



def find_conf_dir() -> Path:
    """Where ``conf/`` is: ``$PIPELINE_CONF_DIR`` if set, else the checkout's ``conf/`` beside
    this package, else the copy an installed wheel ships as ``pipeline/conf``."""
    env = os.environ.get("PIPELINE_CONF_DIR")
    if env:
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    return Path(__file__).resolve().parent / "conf"


CONF_DIR = find_conf_dir()

ACTIVATIONS = ("relu", "elu", "selu", "gelu", "silu", "swish", "tanh", "sigmoid",
               "leaky_relu", "mish", "softplus", "linear")
STRATEGIES = ("default", "mirrored")
# Keras 3's model.fit under tf.distribute.MultiWorkerMirroredStrategy fails with "Attempt to
# convert a value (PerReplica...)" (keras-team/keras#20585; seen with Keras 3.15, TF 2.21, two
# workers on 127.0.0.1: tests/test_train_options.py keeps watching for a fix).
MULTI_WORKER = ("'multi_worker' cannot train here: Keras 3's model.fit fails under "
                "MultiWorkerMirroredStrategy (keras-team/keras#20585); use 'mirrored' for the GPUs "
                "of one machine, or a Hydra multirun to train separate models on a cluster")
LR_SCHEDULES = ("plateau", "cosine")
CLASS_BALANCE = ("balanced", "resample", "none")
TTA_ZOOM_RANGE = (0.5, 2.0)
SEED_MAX = 2**32 - 1  # numpy and TensorFlow both take seeds in [0, 2**32)
NAME = re.compile(r"[A-Za-z0-9_-]+")  # model and class names: they name folders and columns


# --------------------------------------------------------------------------- schemas
# The schemas give types, never values: every default lives once, in conf/ (with the reason
# for it beside it), and a key conf/ does not set is an error that names it.
@dataclass
class PathsConfig:
    raw: str = MISSING
    prepared: str = MISSING
    models: str = MISSING
    reports: str = MISSING
    backup: str = MISSING


@dataclass
class SplitConfig:
    train: float = MISSING
    val: float = MISSING
    test: float = MISSING
    seed: int = MISSING


@dataclass
class PrepareConfig:
    image_size: int = MISSING
    center_crop: float = MISSING
    framing: str = MISSING
    galaxy_radius_fraction: float = MISSING
    unmeasured: str = MISSING
    softening_sigmas: float = MISSING
    white_percentile: float = MISSING
    split: SplitConfig = field(default_factory=SplitConfig)
    grid_examples: int = MISSING
    # defaults: bundles trained before catalog_radius existed stay valid
    radius_column: str | None = None
    radius_unit: str = "arcsec"
    pixel_scale: float | None = None


@dataclass
class AugmentConfig:
    mode: str = MISSING
    copies: int = MISSING
    rotation_degrees: float = MISSING
    zoom: float = MISSING
    blur_sigma: float = MISSING
    blur_probability: float = MISSING
    flip: bool = MISSING
    crop_fraction: float = MISSING
    batch_size: int = MISSING
    brightness: float = 0.0  # defaults: bundles trained before these keys existed stay valid
    colour: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    learning_rate: float = MISSING
    early_stopping_patience: int = MISSING
    early_stopping_min_delta: float = MISSING
    reduce_lr_patience: int = MISSING
    reduce_lr_factor: float = MISSING
    lr_schedule: str = MISSING
    warmup_epochs: int = MISSING
    class_weight: str = MISSING
    min_epochs: int = MISSING
    ema_momentum: float = MISSING
    label_smoothing: float = 0.0  # a default: bundles trained before the key existed stay valid
    mixup: float = 0.0
    seed: int = MISSING
    deterministic: bool = MISSING
    mixed_precision: bool = MISSING
    jit_compile: bool = MISSING
    strategy: str = MISSING
    verbose: int = MISSING


@dataclass
class CrossCheckConfig:
    """One labelled sample from elsewhere, scored by evaluate but never trained or tuned on."""

    catalog: str = MISSING
    image_column: str = MISSING
    label_column: str = MISSING
    positive: list[str] = MISSING
    score: list[str] = MISSING
    tta_zoom: float | None = None
    encoding: str = "utf-8"


@dataclass
class EvaluateConfig:
    tta: str = MISSING
    tta_zoom: float = MISSING
    prior_correction: str = MISSING
    calibration: str = MISSING
    conformal_level: float = MISSING
    framing_zooms: list[float] = MISSING
    framing_pixel_scales: list[float] = MISSING
    cross_checks: dict[str, CrossCheckConfig] = field(default_factory=dict)


@dataclass
class RegionConfig:
    ra: float | None = MISSING
    dec: float | None = MISSING
    radius_arcmin: float = MISSING
    mag_limit: float = MISSING
    max_galaxies: int = MISSING
    sdss: ArchiveConfig = field(default_factory=ArchiveConfig)


@dataclass
class PredictConfig:
    """``conf/predict.yaml``: applying a trained model to new images."""

    model: str | None = MISSING
    model_dir: str = MISSING
    input: str = MISSING
    image_column: str = MISSING
    encoding: str = MISSING
    output: str = MISSING
    batch_size: int = MISSING
    chunk_size: int = MISSING
    workers: int = MISSING
    shard: int = MISSING
    num_shards: int = MISSING
    max_bad_fraction: float = MISSING
    tta: str | None = MISSING
    tta_zoom: float | None = MISSING
    mc_dropout_samples: int = MISSING
    seed: int = MISSING
    max_image_pixels: int | None = MISSING
    region: RegionConfig = field(default_factory=RegionConfig)


def _optional_fields(schema: type) -> list[tuple[str, Any, Any]]:
    """``schema``'s fields, each optional: they are set only where that kind is used."""
    hints = typing.get_type_hints(schema)
    return [(f.name, hints[f.name] | None, field(default=None))
            for f in dataclasses.fields(schema)]


# data: the keys every source has, then one optional section per source (pipeline.sources)
DataConfig = dataclasses.make_dataclass("DataConfig", [
    ("source", str, field(default=MISSING)),
    ("classes", list[str], field(default=MISSING)),
    ("max_bad_fraction", float, field(default=MISSING)),
    ("max_image_pixels", int, field(default=MISSING)),
    *[(name, kind.schema | None, field(default=None)) for name, kind in source_kinds().items()],
])

# models.<name>: the keys every model has, then those of each kind (pipeline.models)
ModelConfig = dataclasses.make_dataclass("ModelConfig", [
    *[(f.name, t, field(default=MISSING))
      for f, t in zip(dataclasses.fields(ModelCommon),
                      typing.get_type_hints(ModelCommon).values(), strict=True)],
    *[item for kind in model_kinds().values() for item in _optional_fields(kind.fields)],
])


@dataclass
class Config:
    seed: int = MISSING
    model: str = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)  # type: ignore[valid-type]
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)  # type: ignore[valid-type]
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# --------------------------------------------------------------------------- validation
_require = require
_in = within


def _merge(schema: type, cfg: DictConfig | dict) -> DictConfig:
    """``cfg`` merged onto ``schema``: unknown keys and wrong types are named."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': {_first_line(err)}") from None


def _no_missing(cfg: DictConfig, prefix: str = "") -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config key '{prefix}{missing[0]}' has no value: set it in conf/ or "
                          "on the command line")


def validate(cfg: DictConfig | dict) -> DictConfig:
    """Return ``cfg`` merged onto the typed schema, or raise :class:`ConfigError`.

    The merge catches unknown keys and wrong types; the checks below catch values that type
    checks cannot (ranges, choices, fractions that must sum to 1). Each data source and model
    kind checks its own keys.
    """
    given = {name: set(model) for name, model in (OmegaConf.create(cfg).get("models") or
                                                   {}).items()}
    merged = _merge(Config, cfg)
    sources = source_kinds()
    source = merged.data.source
    _require(source in sources, "data.source", source, f"one of {sorted(sources)}")
    _require(merged.data[source] is not None, f"data.{source}", None,
             f"the settings of the {source} source (conf/data/{source}.yaml)")
    for other in sources:  # only the chosen source's section counts
        if other != source:
            merged.data[other] = None
    kinds = model_kinds()
    for name, mc in merged.models.items():
        _require(bool(NAME.fullmatch(name)) and name != "cards", "models", name,
                 "model names of letters, digits, '_' and '-' (they name folders), not 'cards'")
        _require(mc.kind in kinds, f"models.{name}.kind", mc.kind, f"one of {sorted(kinds)}")
        for other, kind in kinds.items():  # only the model's own kind's keys count
            if other != mc.kind:
                for f in dataclasses.fields(kind.fields):
                    mc[f.name] = None
        unset = []
        for f in dataclasses.fields(kinds[mc.kind].fields):
            if f.name in given[name]:
                continue
            if f.default == MISSING:
                unset.append(f.name)
            else:  # a key added after models were saved: its default does what came before
                mc[f.name] = f.default
        if unset:
            raise ConfigError(f"config key 'models.{name}.{unset[0]}' has no value: every "
                              f"{mc.kind} model sets it (see conf/models/{mc.kind}.yaml)")
    _no_missing(merged)

    _require(0 <= merged.seed <= SEED_MAX, "seed", merged.seed, f"an integer in [0, {SEED_MAX}]")
    _validate_paths(merged.paths)
    _validate_data(merged.data)
    sources[source].validate(merged.data)
    _validate_prepare(merged.prepare)
    _validate_augment(merged.augment)
    _validate_evaluate(merged.evaluate, list(merged.data.classes))
    _validate_train(merged.train, "train")
    _require(len(merged.models) >= 1, "models", {}, "at least one model entry")
    _require(merged.model in merged.models, "model", merged.model,
             f"one of {list(merged.models)} (the keys of 'models')")
    for name, mc in merged.models.items():
        _validate_model(merged, name, mc)
        kinds[mc.kind].validate(merged, name, mc)
    return merged


def validate_predict(cfg: DictConfig | dict) -> DictConfig:
    """``conf/predict.yaml`` merged onto :class:`PredictConfig`, or a :class:`ConfigError`."""
    merged = _merge(PredictConfig, cfg)
    _require(not OmegaConf.is_missing(merged, "input"), "input", "???",
             "a catalog CSV, a folder of images or one image (input=path)")
    _no_missing(merged)
    for key in ("model_dir", "input", "output", "image_column"):
        _require(bool(str(merged[key]).strip()), key, merged[key], "a non-empty value")
    _require(1 <= merged.batch_size <= 65536, "batch_size", merged.batch_size,
             "an integer in [1, 65536]")
    _require(1 <= merged.chunk_size <= 1_000_000, "chunk_size", merged.chunk_size,
             "images per chunk in [1, 1000000] (memory grows with it)")
    _require(1 <= merged.workers <= 256, "workers", merged.workers,
             "decoding threads in [1, 256]")
    _require(1 <= merged.num_shards <= 100_000, "num_shards", merged.num_shards,
             "an integer >= 1")
    _require(0 <= merged.shard < merged.num_shards, "shard", merged.shard,
             f"an integer in [0, num_shards - 1 = {merged.num_shards - 1}]")
    _require(_in(merged.max_bad_fraction, 0, 1), "max_bad_fraction", merged.max_bad_fraction,
             "a fraction in [0, 1]")
    if str(merged.input) == "region":
        _validate_region(merged.region)
    _require(0 <= merged.mc_dropout_samples <= 10_000, "mc_dropout_samples",
             merged.mc_dropout_samples, "an integer in [0, 10000] (0 = off)")
    _require(0 <= merged.seed <= SEED_MAX, "seed", merged.seed, f"an integer in [0, {SEED_MAX}]")
    _require(merged.tta is None or merged.tta in TTA_MODES, "tta", merged.tta,
             f"one of {list(TTA_MODES)}, or null for the model's own views")
    low, high = TTA_ZOOM_RANGE
    _require(merged.tta_zoom is None or _in(merged.tta_zoom, low, high), "tta_zoom",
             merged.tta_zoom, f"a magnification in [{low}, {high}] (1.0 = as is), or null for "
             "the model's own")
    _require(merged.max_image_pixels is None or 256 <= merged.max_image_pixels <= 10**9,
             "max_image_pixels", merged.max_image_pixels,
             "pixels per image in [256, 1e9], or null for the model's own limit")
    _require_encoding(merged.encoding, "encoding")
    return merged


def _validate_region(r: DictConfig) -> None:
    """A cone on the sky, and how SkyServer is asked for it: every number reaches SQL or a
    URL, so every one is checked."""
    _require(r.ra is not None and _in(r.ra, 0, 360), "region.ra", r.ra,
             "degrees in [0, 360] (input=region asks for the galaxies around it)")
    _require(r.dec is not None and _in(r.dec, -90, 90), "region.dec", r.dec,
             "degrees in [-90, 90]")
    _require(_in(r.radius_arcmin, 0.01, 600), "region.radius_arcmin", r.radius_arcmin,
             "arcminutes in [0.01, 600]")
    _require(_in(r.mag_limit, 5, 30), "region.mag_limit", r.mag_limit,
             "an r-band Petrosian magnitude in [5, 30]")
    _require(1 <= r.max_galaxies <= 500_000, "region.max_galaxies", r.max_galaxies,
             "an integer in [1, 500000]")
    validate_archive(r.sdss, "region.sdss")


def _require_encoding(encoding: str, key: str) -> None:
    try:
        codecs.lookup(str(encoding))
    except LookupError:
        _require(False, key, encoding, "a Python text encoding such as utf-8, latin-1 or cp1252")


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
    _require(len(d.classes) >= 2 and len(set(d.classes)) == len(d.classes), "data.classes",
             list(d.classes), "at least two distinct class names")
    _require(all(NAME.fullmatch(str(c)) for c in d.classes), "data.classes",
             list(d.classes), "names of letters, digits, '_' and '-'")
    _require(_in(d.max_bad_fraction, 0, 1), "data.max_bad_fraction", d.max_bad_fraction,
             "a fraction in [0, 1]")
    _require(256 <= d.max_image_pixels <= 10**9, "data.max_image_pixels", d.max_image_pixels,
             "pixels per image in [256, 1e9] (about 12 bytes each while decoding)")


def _validate_prepare(p: DictConfig) -> None:
    _require(16 <= p.image_size <= 1024, "prepare.image_size", p.image_size,
             "an integer in [16, 1024] pixels")
    _require(_in(p.center_crop, 0, 1) and p.center_crop > 0, "prepare.center_crop",
             p.center_crop, "a fraction in (0, 1]")
    _require(p.framing in ("fixed", "galaxy_size", "catalog_radius"), "prepare.framing",
             p.framing, "fixed (prepare.center_crop of every frame), galaxy_size (each galaxy "
             "cropped to its measured half-light radius) or catalog_radius (to the radius in "
             "the catalog column prepare.radius_column)")
    _require(_in(p.galaxy_radius_fraction, 0.05, 1) and p.galaxy_radius_fraction > 0.05,
             "prepare.galaxy_radius_fraction", p.galaxy_radius_fraction,
             "the share of the view's half-width the galaxy's radius spans, in (0.05, 1]")
    if p.framing == "catalog_radius":
        _require(bool(p.radius_column), "prepare.radius_column", p.radius_column,
                 "the catalog column with each galaxy's radius (e.g. petroR90_r), which "
                 "prepare.framing = catalog_radius reads")
        _require(p.radius_unit in ("arcsec", "pixels"), "prepare.radius_unit", p.radius_unit,
                 "arcsec (with prepare.pixel_scale) or pixels")
        if p.radius_unit == "arcsec":
            _require(p.pixel_scale is not None and _in(p.pixel_scale, 1e-4, 3600)
                     and p.pixel_scale > 1e-4, "prepare.pixel_scale", p.pixel_scale,
                     "the cutouts' arcsec per pixel (e.g. 0.396 for SDSS frames), which turns "
                     "prepare.radius_column's arcsec into pixels")
    _require(p.unmeasured in ("skip", "fixed"), "prepare.unmeasured", p.unmeasured,
             "skip (listed like an unreadable cutout) or fixed (prepare.center_crop)")
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
    for key in ("brightness", "colour"):
        _require(_in(a[key], 0, 1), f"augment.{key}", a[key],
                 "the sigma of a log-normal factor in [0, 1] (0 = off; 0.1 = about 10%)")


def _validate_evaluate(ev: DictConfig, classes: list[str]) -> None:
    _require(ev.tta in TTA_MODES, "evaluate.tta", ev.tta,
             f"one of {list(TTA_MODES)} (test-time views averaged per image)")
    _require(_in(ev.tta_zoom, *TTA_ZOOM_RANGE), "evaluate.tta_zoom", ev.tta_zoom,
             f"a magnification in [{TTA_ZOOM_RANGE[0]}, {TTA_ZOOM_RANGE[1]}] (1.0 = as is)")
    _require(ev.prior_correction in ("fit", "none") or _fraction(ev.prior_correction)
             is not None, "evaluate.prior_correction", ev.prior_correction,
             "'fit' (undo part of the class weights, alpha chosen on validation macro-F1), "
             "'none', or a fixed alpha in [0, 1]")
    _require(ev.calibration in ("temperature", "none"), "evaluate.calibration", ev.calibration,
             "'temperature' (one temperature fitted on validation) or 'none'")
    _require(ev.conformal_level == 0 or _in(ev.conformal_level, 0.5, 0.999),
             "evaluate.conformal_level", ev.conformal_level,
             "a coverage in [0.5, 0.999], or 0 for no prediction sets")
    for key, low, high, what in (("framing_zooms", 0.1, 10, "framings zoomed by"),
                                 ("framing_pixel_scales", 0.1, 10, "pixels larger by")):
        values = ev[key]
        _require(all(isinstance(v, int | float) and _in(v, low, high) for v in values),
                 f"evaluate.{key}", list(values),
                 f"a list of factors in [{low}, {high}] ({what}; [] for none)")
    for name, check in ev.cross_checks.items():
        k = f"evaluate.cross_checks.{name}"
        _require(len(check.score) > 0 and all(c in classes for c in check.score),
                 f"{k}.score", list(check.score),
                 f"a list of the model's classes {classes}, whose probabilities are summed")
        _require(len(check.positive) > 0, f"{k}.positive", list(check.positive),
                 f"the values of {k}.label_column that count as positive")
        _require(check.tta_zoom is None or _in(check.tta_zoom, *TTA_ZOOM_RANGE),
                 f"{k}.tta_zoom", check.tta_zoom,
                 f"null (the model's own) or a magnification in {list(TTA_ZOOM_RANGE)}")
        _require_encoding(check.encoding, f"{k}.encoding")


def _validate_model(cfg: DictConfig, name: str, mc: DictConfig) -> None:
    """The keys every model has; its kind checks the rest."""
    k = f"models.{name}"
    _require(mc.activation in ACTIVATIONS, f"{k}.activation", mc.activation,
             f"one of {list(ACTIVATIONS)}")
    _require(_in(mc.dropout, 0, 1) and mc.dropout < 1, f"{k}.dropout", mc.dropout,
             "a fraction in [0, 1)")
    _require(_in(mc.l2, 0, 1), f"{k}.l2", mc.l2, "a weight in [0, 1]")
    _require(0 <= mc.dense_units <= 65536, f"{k}.dense_units", mc.dense_units,
             "an integer in [0, 65536]")
    _require(mc.input_size is None or 32 <= mc.input_size <= 1024, f"{k}.input_size",
             mc.input_size, "null (use prepare.image_size) or an integer in [32, 1024]")
    train = model_train_config(cfg, name)
    _validate_train(train, f"{k}.train")
    shrinks = mc.input_size is not None and mc.input_size < cfg.prepare.image_size
    _require(not (name == cfg.model and train.jit_compile and shrinks), "train.jit_compile",
             True, f"false for models.{name}: it resizes {cfg.prepare.image_size}-px images to "
             f"{mc.input_size} px with antialiasing, which TensorFlow's XLA cannot compile "
             f"(or set models.{name}.input_size=null)")


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
    _require(t.strategy != "multi_worker", f"{key}.strategy", t.strategy, MULTI_WORKER)
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
    _require(_in(t.label_smoothing, 0, 0.5) and t.label_smoothing < 0.5,
             f"{key}.label_smoothing", t.label_smoothing,
             "a fraction in [0, 0.5): 0 = hard labels, 0.1 = 10% of each target spread evenly")
    _require(_in(t.mixup, 0, 10), f"{key}.mixup", t.mixup,
             "a Beta(alpha, alpha) parameter in [0, 10]: 0 = no blending, 0.2 = mostly light ones")
    _require(0 <= t.seed <= SEED_MAX, f"{key}.seed", t.seed, f"an integer in [0, {SEED_MAX}]")
    _require(t.verbose in (0, 1, 2), f"{key}.verbose", t.verbose,
             "0 (silent), 1 (progress bar) or 2 (one line per epoch)")


def schedule_description(t: DictConfig) -> str:
    """``train.lr_schedule`` in words, for the training log and the model card."""
    if t.lr_schedule == "plateau":
        return (f"learning rate cut by {t.reduce_lr_factor} after {t.reduce_lr_patience} "
                "epochs without improvement")
    return (f"{t.warmup_epochs} warm-up epochs, then a cosine decay of the learning rate to "
            "zero over each phase")


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
        where = Path(err.filename or ".")
        if is_disk_full(err):
            _report(f"{where}: no space left on the device ({free_bytes(where.parent):,} bytes "
                    "free there); free some space or point the output at a larger disk")
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            # Nothing was replaced: outputs are written beside their place, then moved in.
            _report(f"{where}: {err.strerror.lower()}; point the output (or input) at a folder "
                    "this user can write (or read), or change its permissions")
        raise


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
    traceback (:func:`user_errors`), composition errors included; in a multirun they end only
    that job, and the sweep goes on (:func:`pipeline.sweep.record_failed_job`).
    ``objective`` names the key of the result returned to Hydra, which sweepers such as Optuna
    minimise.
    """
    import hydra

    check = validator or validate

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    @functools.wraps(run)
    def entry(cfg: DictConfig) -> Any:
        from pipeline.sweep import record_failed_job

        with user_errors():
            try:
                result = run(check(cfg))
            except PipelineError as err:
                if not record_failed_job(err):  # not a multirun: the error ends the process
                    raise
                # A sweep goes on; the worst objective keeps Optuna away from what failed.
                return math.inf if objective is not None else None
        if objective is None:
            return None
        return result[objective] if isinstance(result, dict) else getattr(result, objective)

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
