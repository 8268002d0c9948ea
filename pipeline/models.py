"""Model builders: the only thing that differs between the from-scratch and transfer models.

Both take images in [-1, 1] (what ``prepare`` writes) and end in a softmax over the label
scheme's classes. Each builder returns the model and its training *phases*; the one training
path in :mod:`pipeline.train` runs the phases in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from pipeline.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Phase:
    """One ``fit`` call: its name, epoch budget, learning rate and which layers may learn."""

    name: str
    epochs: int
    learning_rate: float
    trainable_from: int | None = None  # backbone layers from this index on are trainable


@dataclass
class Backbone:
    """A keras.applications backbone and the input range its weights were trained on."""

    constructor: str
    input_range: tuple[float, float]


# MobileNet v1/v2 were trained on inputs scaled to [-1, 1], exactly what prepare writes, so
# their preprocess_input is the identity here: scaling again would be scaling twice.
BACKBONES = {
    "mobilenet_v2": Backbone("MobileNetV2", (-1.0, 1.0)),
    "mobilenet": Backbone("MobileNet", (-1.0, 1.0)),
}


# Keras' default batch-norm momentum (0.99) lets the moving statistics that validation uses
# trail the batch statistics by ~100 steps: epochs of a few thousand galaxies are only tens of
# steps, so validation would score a different network from the one training. 0.9 tracks
# within ~10 steps.
BN_MOMENTUM = 0.9


@dataclass
class BuiltModel:
    model: object  # keras.Model
    phases: list[Phase]
    pretrained: bool | None  # None for from-scratch models
    backbone_name: str | None = None


def _head(x, mc: DictConfig, n_classes: int):
    import keras

    reg = keras.regularizers.L2(mc.l2) if mc.l2 > 0 else None
    if mc.dropout > 0:
        x = keras.layers.Dropout(mc.dropout, name="head_dropout")(x)
    if mc.dense_units > 0:
        x = keras.layers.Dense(mc.dense_units, activation=mc.activation, kernel_regularizer=reg,
                               name="head_dense")(x)
        if mc.dropout > 0:
            x = keras.layers.Dropout(mc.dropout, name="head_dropout_2")(x)
    # float32 softmax even under mixed precision, where float16 would round probabilities.
    return keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=reg,
                              dtype="float32", name="probabilities")(x)


def conv_output_size(size: int, mc: DictConfig) -> int:
    """Side of the feature map after all conv/pool blocks (valid padding shrinks it)."""
    for _ in mc.filters:
        if mc.padding == "valid":
            size -= mc.kernel_size - 1
        size //= mc.pool_size
    return size


def build_cnn(mc: DictConfig, input_shape: tuple[int, int, int], n_classes: int,
              train: DictConfig, name: str = "cnn") -> BuiltModel:
    """Conv -> (batch norm) -> activation -> max-pool blocks, then a dropout-regularised head.

    With ``input_size`` set, the image is first resized (antialiased) inside the model, so a
    small CNN can share the prepared split with a larger transfer model and still see the
    whole galaxy within the receptive field of its last block.
    """
    import keras

    size = int(mc.input_size or input_shape[0])
    if conv_output_size(size, mc) < 1:
        raise ConfigError(
            f"config key 'models.{name}.filters' = {list(mc.filters)} with padding "
            f"'{mc.padding}', kernel {mc.kernel_size} and pool {mc.pool_size} shrinks a "
            f"{size}-pixel image below 1 pixel: use fewer blocks, padding 'same', or "
            f"a larger models.{name}.input_size / prepare.image_size")
    reg = keras.regularizers.L2(mc.l2) if mc.l2 > 0 else None
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if size != input_shape[0]:
        x = keras.layers.Resizing(size, size, interpolation="bilinear", antialias=True,
                                  name="resize")(x)
    for i, filters in enumerate(mc.filters, start=1):
        x = keras.layers.Conv2D(filters, mc.kernel_size, padding=mc.padding,
                                use_bias=not mc.batch_norm, kernel_regularizer=reg,
                                name=f"conv{i}")(x)
        if mc.batch_norm:
            x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{i}")(x)
        x = keras.layers.Activation(mc.activation, name=f"act{i}")(x)
        x = keras.layers.MaxPooling2D(mc.pool_size, name=f"pool{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = _head(x, mc, n_classes)
    model = keras.Model(inputs, outputs, name=name)
    return BuiltModel(model, [Phase("train", train.epochs, train.learning_rate)], None)


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
        x = keras.layers.Resizing(size, size, interpolation="bilinear",
                                  antialias=size < input_shape[0], name="resize")(x)
    x = backbone(x, training=False if pretrained else None)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = _head(x, mc, n_classes)
    model = keras.Model(inputs, outputs, name=name)

    if pretrained:
        n_layers = len(backbone.layers)
        phases = [Phase("feature_extraction", train.epochs, train.learning_rate, None)]
        if mc.fine_tune_epochs > 0 and mc.fine_tune_layers > 0:
            phases.append(Phase("fine_tuning", mc.fine_tune_epochs, mc.fine_tune_learning_rate,
                                max(0, n_layers - int(mc.fine_tune_layers))))
    else:
        phases = [Phase("train_all", train.epochs + mc.fine_tune_epochs, train.learning_rate)]
    return BuiltModel(model, phases, pretrained, backbone.name)


def build_model(mc: DictConfig, input_shape: tuple[int, int, int], n_classes: int,
                train: DictConfig, name: str) -> BuiltModel:
    builders = {"cnn": build_cnn, "transfer": build_transfer}
    return builders[mc.kind](mc, input_shape, n_classes, train, name=name)


def set_trainable_from(model, backbone_name: str, start: int) -> None:
    """Unfreeze backbone layers from ``start`` on, keeping batch norms frozen (Keras guide)."""
    import keras

    backbone = model.get_layer(backbone_name)
    backbone.trainable = True
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
