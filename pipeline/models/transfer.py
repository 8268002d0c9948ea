"""Transfer learning: an ImageNet backbone (``keras.applications``) as feature extractor under
a new head, then fine-tuned on top (the Keras transfer-learning guide)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING, DictConfig

from pipeline.errors import ConfigError, require, within
from pipeline.models import BN_MOMENTUM, BuiltModel, ModelKind, Phase, head, model_input

log = logging.getLogger(__name__)


@dataclass
class Backbone:
    """A keras.applications backbone, the input range its weights were trained on, and the
    width multipliers it has ImageNet weights for."""

    constructor: str
    input_range: tuple[float, float]
    pretrained_alphas: tuple[float, ...]


# MobileNet v1/v2 were trained on inputs scaled to [-1, 1], exactly what prepare writes, so
# their preprocess_input is the identity here: scaling again would be scaling twice.
BACKBONES = {
    "mobilenet_v2": Backbone("MobileNetV2", (-1.0, 1.0), (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)),
    "mobilenet": Backbone("MobileNet", (-1.0, 1.0), (0.25, 0.5, 0.75, 1.0)),
}


@dataclass
class TransferFields:
    """The keys only a transfer model reads (values and reasons: ``conf/models/transfer.yaml``)."""

    backbone: str = MISSING
    alpha: float = MISSING
    weights: str | None = MISSING
    allow_random_init: bool = MISSING
    fine_tune_layers: int = MISSING
    fine_tune_epochs: int = MISSING
    fine_tune_learning_rate: float = MISSING
    # Added after models were released: a saved config.yaml without it (gz1-cnn-v2's) still
    # validates, at the value that does what the code did before it: every layer alike.
    layer_lr_decay: float = 1.0


def layerwise_lr_scales(backbone, decay: float) -> dict[str, float] | None:
    """Discriminative fine-tuning (Howard & Ruder 2018; Zoobot's ``lr_decay``): each backbone
    stage learns at ``decay`` times the rate of the stage above it, so the general,
    high-resolution features move least. A stage is one feature-map resolution, which needs no
    per-backbone table of block names; the top stage and the head learn at the full rate."""
    if decay == 1.0:
        return None
    layers = [layer for layer in backbone.layers if layer.weights]
    sides = sorted({int(layer.output.shape[1]) for layer in layers})  # smallest = top stage
    return {w.path: float(decay ** sides.index(int(layer.output.shape[1])))
            for layer in layers for w in layer.weights}


def backbone_weights(mc: DictConfig, name: str) -> str | None:
    """``models.<name>.weights`` as Keras takes it; a missing file is a config error."""
    w = mc.weights
    if w is None or str(w).lower() in ("null", "none", ""):
        return None
    if str(w) == "imagenet":
        return "imagenet"
    path = Path(str(w)).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key 'models.{name}.weights' = {w!r}: no such file; use "
                          "'imagenet', null, or the path to a Keras .h5 weights file")
    return str(path)


def build_transfer(mc: DictConfig, input_shape: tuple[int, int, int], n_classes: int,
                   train: DictConfig, name: str = "transfer") -> BuiltModel:
    """An ImageNet backbone as feature extractor under a new head, then fine-tuned on top.

    Phase 1 trains the head on the frozen backbone; phase 2 unfreezes the top
    ``fine_tune_layers`` at ``fine_tune_learning_rate``. The backbone runs in inference mode
    (``training=False``) throughout, so fine-tuning does not wreck its batch-norm statistics.
    If no pretrained weights can be had and ``allow_random_init`` is true, the backbone starts
    from random weights and, there being nothing to preserve, trains whole in one phase.
    """
    import keras

    spec = BACKBONES[mc.backbone]
    size = int(mc.input_size or input_shape[0])
    weights = backbone_weights(mc, name)
    constructor = getattr(keras.applications, spec.constructor)
    kwargs = {"include_top": False, "input_shape": (size, size, 3), "alpha": mc.alpha}
    pretrained = weights is not None
    try:
        backbone = constructor(weights=weights, **kwargs)
    except Exception as err:
        if weights is None or not mc.allow_random_init:
            hint = ("" if weights is None else
                    f"; set models.{name}.weights to a local .h5 file, or "
                    f"models.{name}.allow_random_init=true to train from random weights")
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise ConfigError(f"cannot build backbone {mc.backbone} with weights={weights!r}: "
                              f"{type(err).__name__}: {first}{hint}") from err
        log.warning("NO PRETRAINED WEIGHTS: could not load %r for %s (%s: %s). Training the "
                    "backbone from random initialisation because models.%s.allow_random_init "
                    "is true; expect lower accuracy than a pretrained model.",
                    weights, mc.backbone, type(err).__name__, err, name)
        backbone = constructor(weights=None, **kwargs)
        pretrained = False
    if weights is None:
        log.warning("models.%s.weights is null: the %s backbone is randomly initialised",
                    name, mc.backbone)
    if not pretrained:
        # keras.applications' batch norms use momentum 0.999, tuned for ImageNet-length runs:
        # from random weights their moving statistics would lag the training ones for tens of
        # epochs, and validation would score at chance while training accuracy climbs.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = BN_MOMENTUM
    backbone.trainable = not pretrained  # frozen for feature extraction if pretrained

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    lo, hi = spec.input_range
    if (lo, hi) != (-1.0, 1.0):
        x = keras.layers.Rescaling((hi - lo) / 2, offset=(hi + lo) / 2, name="to_backbone")(x)
    if size != input_shape[0]:
        x = keras.layers.Resizing(size, size, interpolation="bilinear",  # float32: see cnn.py
                                  antialias=size < input_shape[0], dtype="float32",
                                  name="resize")(x)
    x = backbone(x, training=False if pretrained else None)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = head(x, mc, n_classes)
    model = keras.Model(inputs, outputs, name=name)

    if pretrained:
        n_layers = len(backbone.layers)
        phases = [Phase("feature_extraction", train.epochs, train.learning_rate, None)]
        if mc.fine_tune_epochs > 0 and mc.fine_tune_layers > 0:
            phases.append(Phase("fine_tuning", mc.fine_tune_epochs, mc.fine_tune_learning_rate,
                                max(0, n_layers - int(mc.fine_tune_layers)),
                                layerwise_lr_scales(backbone, float(mc.layer_lr_decay))))
    else:
        phases = [Phase("train_all", train.epochs + mc.fine_tune_epochs, train.learning_rate)]
    return BuiltModel(model, phases, pretrained, backbone.name)


def validate(cfg: DictConfig, name: str, mc: DictConfig) -> None:
    k = f"models.{name}"
    require(mc.backbone in BACKBONES, f"{k}.backbone", mc.backbone, f"one of {list(BACKBONES)}")
    size = int(mc.input_size or cfg.prepare.image_size)
    require(size >= 32, f"{k}.input_size", mc.input_size,
            f"a side of at least 32 pixels for {mc.backbone} (set {k}.input_size, or "
            f"prepare.image_size >= 32; it is {cfg.prepare.image_size})")
    pretrained = mc.weights is not None and str(mc.weights).lower() not in ("null", "none", "")
    alphas = BACKBONES[mc.backbone].pretrained_alphas
    require(within(mc.alpha, 0.01, 4) and (not pretrained or mc.alpha in alphas), f"{k}.alpha",
            mc.alpha, f"one of {list(alphas)} for pretrained {mc.backbone} weights "
            "(any width in (0, 4] with weights null)")
    require(0 <= mc.fine_tune_layers <= 10_000, f"{k}.fine_tune_layers", mc.fine_tune_layers,
            "an integer in [0, 10000]")
    require(0 <= mc.fine_tune_epochs <= 10_000, f"{k}.fine_tune_epochs", mc.fine_tune_epochs,
            "an integer in [0, 10000]")
    require(within(mc.fine_tune_learning_rate, 0, 10) and mc.fine_tune_learning_rate > 0,
            f"{k}.fine_tune_learning_rate", mc.fine_tune_learning_rate,
            "a positive number up to 10")
    require(within(mc.layer_lr_decay, 0, 1) and mc.layer_lr_decay > 0, f"{k}.layer_lr_decay",
            mc.layer_lr_decay, "a number in (0, 1]: 1 = every layer at the same rate")


def describe(cfg: DictConfig, mc: DictConfig, pretrained: bool | None) -> tuple[str, str]:
    label = ("transfer-learned CNN" if pretrained
             else "CNN on a randomly initialised backbone, NOT pretrained")
    return label, (f"{mc.backbone} (alpha {mc.alpha}) backbone, {model_input(cfg, mc)}, "
                   f"global average pooling, dropout {mc.dropout}, dense {mc.dense_units}, "
                   f"softmax; L2 {mc.l2} on the head.")


KIND = ModelKind("transfer", TransferFields, validate, build_transfer, describe)
