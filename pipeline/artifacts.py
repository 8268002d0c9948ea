"""What stages hand each other: file names, typed records, and the trained-model bundle.

Data flows one way, ``paths.raw -> paths.prepared -> paths.models/<name> ->
paths.reports/<name> -> paths.reports/cards``, and each arrow is a set of files whose names and
fields are defined here and nowhere else. Stages import this module, never each other.

A trained model is one folder, :class:`TrainedModel`: the Keras network (``model.keras``, from
train), the resolved config it was trained with (its preprocessing and label scheme), its
training record, and ``inference.json`` (from evaluate): the test-time views and the prior
correction fitted for exactly those views on the validation split. ``evaluate`` and
``predict`` both apply a model through that bundle, so they give the same probabilities.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.errors import MissingInputError, PipelineError
from pipeline.io import atomic_write_json, read_json
from pipeline.labels import LabelScheme

# --------------------------------------------------------------------------- names
# paths.raw (fetch): one cutout per galaxy and a catalog with at least these columns
CATALOG_COLUMNS = ("objid", "ra", "dec", "label", "file")  # file: relative to paths.raw
CATALOG_NAME = "catalog.csv"
FAILURES_NAME = "failures.csv"
DUPLICATES_NAME = "duplicates.csv"
FETCH_SUMMARY_NAME = "fetch_summary.json"
# paths.prepared (prepare)
META_NAME = "meta.json"
SPLITS = ("train", "val", "test")
AUGMENTATIONS_NAME = "augmentations.png"
SKIPPED_NAME = "skipped.csv"
# paths.models/<name> (train, then evaluate adds inference.json)
MODEL_NAME = "model.keras"
HISTORY_NAME = "history.csv"
CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "train_summary.json"
INFERENCE_NAME = "inference.json"
# paths.reports/<name> (evaluate) and paths.reports/cards (report)
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.csv"
FIGURES_DIR = "figures"
FIGURES = ("learning_curves", "confusion_matrix", "roc", "pr", "reliability", "examples",
           "kernels", "saliency")
# Figures drawn from the galaxy images themselves: a card marks them (CUTOUT_MARK on the <img>)
# so that a released card, which ships in the package, can leave out images of other people's
# data (SDSS and Galaxy Zoo cutouts carry their providers' terms, not the package's).
CUTOUT_FIGURES = ("examples.png", "saliency.png", AUGMENTATIONS_NAME)
CUTOUT_MARK = 'data-shows="galaxy-cutouts"'
CROSS_CHECK_FIGURE_PREFIX = "cross_check_"  # one figure per evaluate.cross_checks sample
CARDS_DIR = "cards"
COMPARISON_NAME = "comparison.md"


def cross_check_figure(check: str) -> str:
    """The file name of the figure of the galaxies that ``evaluate.cross_checks.<check>``'s
    labels and the model disagree about most (cutouts too)."""
    return f"{CROSS_CHECK_FIGURE_PREFIX}{check}.png"


def shows_cutouts(figure: str) -> bool:
    """Whether the figure file of this name is made of galaxy cutouts."""
    return figure in CUTOUT_FIGURES or figure.startswith(CROSS_CHECK_FIGURE_PREFIX)


@dataclass(frozen=True)
class Layout:
    """Where every artifact lives, from ``cfg.paths``."""

    raw: Path
    prepared: Path
    models: Path
    reports: Path
    backup: Path

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Layout:
        p = cfg.paths
        return cls(Path(p.raw), Path(p.prepared), Path(p.models), Path(p.reports),
                   Path(p.backup))

    def model_dir(self, name: str) -> Path:
        return self.models / name

    def report_dir(self, name: str) -> Path:
        return self.reports / name

    def figures(self, name: str) -> Path:
        return self.reports / name / FIGURES_DIR

    @property
    def cards(self) -> Path:
        return self.reports / CARDS_DIR


# --------------------------------------------------------------------------- records
def _convert(value: Any, hint: Any) -> Any:
    """A JSON value as the field type ``hint`` says (nested records, lists and dicts of them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _record_from(hint, value)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return [_record_from(args[0], v) for v in value]
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return {k: _record_from(args[1], v) for k, v in value.items()}
    return value


def _record_from(cls: type, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _convert(v, hints[k]) for k, v in data.items() if k in names})


class Record:
    """A JSON artifact as a dataclass: ``save`` writes it atomically, ``load`` reads it back
    and names the stage to run when it is missing or incomplete."""

    FILE: typing.ClassVar[str]
    STAGE: typing.ClassVar[str]

    @classmethod
    def load(cls, folder: Path):
        path = Path(folder) / cls.FILE
        data = read_json(path, cls.STAGE)
        try:
            return _record_from(cls, data)
        except (TypeError, KeyError, AttributeError, StopIteration) as err:
            raise PipelineError(f"{path}: not the {cls.FILE} this version writes ({err}); run "
                                f"the {cls.STAGE} stage again") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, folder: Path) -> Path:
        return atomic_write_json(Path(folder) / self.FILE, self.to_dict())


@dataclass
class SplitCounts:
    galaxies: int
    per_class: dict[str, int]


@dataclass
class PreparedMeta(Record):
    """``meta.json`` of the prepared data: the label scheme, the image format, the splits."""

    FILE: typing.ClassVar[str] = META_NAME
    STAGE: typing.ClassVar[str] = "prepare"

    classes: list[str]
    image_size: int
    center_crop: float
    normalization: str
    source: str
    splits: dict[str, SplitCounts]
    augmented_copies_per_galaxy: int
    augment_mode: str
    n_skipped: int = 0
    n_duplicates_dropped: int = 0
    framing: str = "fixed"
    galaxy_radius_fraction: float | None = None
    # Training cutouts per kind (io.FLUX: FITS, asinh-stretched; io.DISPLAY: JPEG/PNG).
    train_image_kinds: dict[str, int] | None = None

    @property
    def scheme(self) -> LabelScheme:
        return LabelScheme.from_names(self.classes)


@dataclass
class PhaseRecord:
    phase: str
    learning_rate: float
    epochs_run: int
    last_epoch: int
    best_val_loss_so_far: float | None  # None while no epoch has counted


@dataclass
class TrainSummary(Record):
    """``train_summary.json``: what was trained, how, and where it ended."""

    FILE: typing.ClassVar[str] = SUMMARY_NAME
    STAGE: typing.ClassVar[str] = "train"

    model: str
    kind: str
    pretrained: bool | None  # None for models trained from scratch
    backbone: str | None
    weights: str | None
    classes: list[str]
    input_shape: list[int]
    parameters: int
    strategy: str
    replicas: int
    mixed_precision: bool
    jit_compile: bool
    train_images: int
    val_images: int
    class_balance: str  # train.class_weight: balanced, resample or none
    # Inverse-frequency weight of each class on the training split (None with 'none'): the
    # loss weights (balanced) or the prior shift of balanced sampling (resample), which the
    # prior correction partly undoes.
    class_balance_weights: list[float] | None
    phases: list[PhaseRecord]
    epochs: int
    best_epoch: int
    best_val_loss: float
    train_loss_at_best: float
    wall_time_s: float
    resumed: bool = False
    # Training cutouts per kind (io.FLUX, io.DISPLAY), from prepare; None: not recorded.
    # predict warns when it is given a kind the model never saw.
    train_image_kinds: dict[str, int] | None = None


@dataclass
class PriorCorrection:
    """Probabilities times ``class_factors`` (w ** -alpha), renormalised; see
    :func:`pipeline.inference.fit_prior_correction`."""

    how: str  # fit, none, or the fixed alpha as text
    alpha: float = 0.0
    class_factors: list[float] | None = None
    validation_macro_f1: dict[str, float] = field(default_factory=dict)


@dataclass
class ConformalSets:
    """Class-conditional split-conformal prediction sets (:mod:`pipeline.calibration`): a class
    is in a galaxy's set when its probability reaches that class's threshold."""

    level: float  # the coverage each class's galaxies get, at least
    thresholds: list[float]
    method: str = "class-conditional least-ambiguous sets"


@dataclass
class InferenceSettings(Record):
    """``inference.json``: how the model is applied, one decision chosen on validation.

    The test-time views, the prior correction fitted for exactly those views, the temperature
    that calibrates the corrected probabilities and the conformal thresholds on top of them;
    the model's digest ties them to the network they were fitted for.
    """

    FILE: typing.ClassVar[str] = INFERENCE_NAME
    STAGE: typing.ClassVar[str] = "evaluate"

    tta: str
    tta_zoom: float
    prior_correction: PriorCorrection
    model_sha256: str
    fitted_on: str = "validation"
    temperature: float = 1.0
    conformal: ConformalSets | None = None


@dataclass
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Metrics(Record):
    """``metrics.json`` (read by ``dvc metrics show``): the test-split scores of one model."""

    FILE: typing.ClassVar[str] = METRICS_NAME
    STAGE: typing.ClassVar[str] = "evaluate"

    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    roc_auc_ovr: float | None
    roc_auc_one_vs_rest: dict[str, float]
    log_loss: float
    per_class: dict[str, ClassScores]
    confusion_matrix: list[list[int]]
    n_test: int
    model: str
    kind: str
    pretrained: bool | None
    best_epoch: int
    epochs_run: int
    train_loss_at_best: float
    val_loss_at_best: float
    generalization_gap: float  # positive and growing: training fits better than unseen data
    train_wall_time_s: float
    tta: str
    tta_views: int
    tta_zoom: float
    prior_correction_alpha: float
    prior_correction: str
    ece: float | None = None  # after calibration: what predict's probabilities carry
    ece_before_calibration: float | None = None
    temperature: float = 1.0
    # Test coverage and mean set size of the conformal sets, overall ("all") and by true class.
    conformal_level: float | None = None
    conformal: dict[str, dict[str, float]] | None = None
    # The framing stress test: test galaxies reframed (zoomed, pixels resampled), as named.
    framing_stress: dict[str, dict[str, float]] | None = None
    # Labelled samples from elsewhere (evaluate.cross_checks): ROC AUC and what was scored.
    cross_checks: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.per_class = {c: v if isinstance(v, ClassScores) else ClassScores(**v)
                          for c, v in self.per_class.items()}


# --------------------------------------------------------------------------- prepared data
def load_split(prepared: Path, name: str, stream: bool = False) -> dict:
    """One split's arrays (images, labels, objid, augmented).

    With ``stream`` the images stay on disk (:class:`pipeline.io.NpyRows`, read a batch at a
    time); the small per-galaxy arrays are loaded.
    """
    from pipeline.io import NpyRows, load_arrays

    folder = Path(prepared) / name
    if not (folder / "images.npy").is_file():
        raise MissingInputError(f"{folder}: no prepared split; run the prepare stage first")
    arrays = load_arrays(folder, mmap=stream)
    if stream:
        arrays["images"] = NpyRows(folder / "images.npy")
        arrays["labels"] = np.asarray(arrays["labels"])
    return arrays


# --------------------------------------------------------------------------- the bundle
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_keras_model(folder: Path):
    """The network in ``folder``, loaded with Keras ``safe_mode`` (no code from the file runs).

    Not compiled: inference needs no optimizer, and one saved under mixed precision would not
    match a float32 one. A file that is not a Keras model, or one that ``safe_mode`` refuses,
    is an error that names it.
    """
    import zipfile

    import keras

    path = Path(folder) / MODEL_NAME
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


def load_trained_config(folder: Path) -> DictConfig:
    """The resolved config a model was trained with (``config.yaml`` beside it)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise MissingInputError(f"{path}: not found; point at a folder written by the train "
                                "stage, or run it first")
    try:
        config = OmegaConf.load(path)
        list(config.data.classes)
        config.prepare.image_size  # noqa: B018 (the keys predict needs must be there)
    except Exception as err:  # any YAML or structure problem: not a config train wrote
        raise PipelineError(f"{path}: not a config the train stage wrote ({type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0][:160]})") from None
    return config


@dataclass
class TrainedModel:
    """One trained model and everything needed to apply it as it was evaluated."""

    folder: Path
    model: Any  # keras.Model
    config: DictConfig  # the resolved config it was trained with
    summary: TrainSummary
    inference: InferenceSettings | None  # None until evaluate has fitted it

    @classmethod
    def load(cls, folder: Path, with_inference: bool = True) -> TrainedModel:
        """Load the bundle in ``folder``. With ``with_inference``, its ``inference.json`` must be
        there and fitted for this very ``model.keras``."""
        folder = Path(folder)
        config = load_trained_config(folder)
        summary = TrainSummary.load(folder)
        inference = None
        if with_inference:
            inference = InferenceSettings.load(folder)
            if inference.model_sha256 != file_sha256(folder / MODEL_NAME):
                raise PipelineError(
                    f"{folder / INFERENCE_NAME} was fitted for another {MODEL_NAME} (the model "
                    "was trained again since); run the evaluate stage to fit it anew")
        return cls(folder, load_keras_model(folder), config, summary, inference)

    @property
    def scheme(self) -> LabelScheme:
        return LabelScheme.from_names(self.summary.classes)

    @property
    def preprocessing(self) -> DictConfig:
        """The ``prepare`` settings new images must get: those of the training data."""
        return self.config.prepare

    @property
    def max_image_pixels(self) -> int | None:
        return OmegaConf.select(self.config, "data.max_image_pixels", default=None)

    def with_inference(self, inference: InferenceSettings) -> TrainedModel:
        return dataclasses.replace(self, inference=inference)

    def calibrate(self, proba: np.ndarray) -> np.ndarray:
        """The fitted temperature applied to prior-corrected probabilities."""
        from pipeline.calibration import apply_temperature

        return apply_temperature(proba, self.inference.temperature)

    def prediction_sets(self, proba: np.ndarray) -> np.ndarray | None:
        """The conformal set of each galaxy as a boolean (N, classes) mask, or None."""
        from pipeline.calibration import prediction_sets

        sets = self.inference.conformal
        return None if sets is None else prediction_sets(proba, sets.thresholds)

    def _settings(self, tta: str | None, zoom: float | None) -> tuple[str, float, Any]:
        if self.inference is None:
            raise MissingInputError(f"{self.folder / INFERENCE_NAME}: not found; run the "
                                    "evaluate stage first")
        return (tta or self.inference.tta,
                float(zoom if zoom is not None else self.inference.tta_zoom),
                self.inference.prior_correction.class_factors)

    def predict_proba(self, images: np.ndarray, batch_size: int = 256, tta: str | None = None,
                      zoom: float | None = None) -> np.ndarray:
        """Class probabilities over the bundle's test-time views, prior-corrected as fitted."""
        from pipeline.inference import predict_proba

        tta, zoom, factors = self._settings(tta, zoom)
        return self.calibrate(predict_proba(self.model, images, tta, batch_size, factors,
                                            zoom=zoom))

    def mc_dropout(self, images: np.ndarray, samples: int, batch_size: int, seed: int,
                   tta: str | None = None, zoom: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict_proba` (N, K) and ``samples`` Monte Carlo dropout draws of it
        (samples, N, K), from one pass of the network's trunk."""
        from pipeline.inference import mc_dropout_probabilities

        tta, zoom, factors = self._settings(tta, zoom)
        proba, draws = mc_dropout_probabilities(self.model, images, samples, batch_size, seed,
                                                tta, factors, zoom=zoom)
        return self.calibrate(proba), self.calibrate(draws)


def save_config(cfg: DictConfig, folder: Path) -> None:
    OmegaConf.save(cfg, Path(folder) / CONFIG_NAME, resolve=True)
