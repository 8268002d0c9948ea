"""Model kinds: the only thing that differs between the from-scratch and transfer models.

Each kind is one module of this package that defines ``KIND``, a :class:`ModelKind`: the config
keys only it reads (its schema), its checks, its builder, and the sentence the model card says
about it. Adding a kind is one module here and one ``conf/models/<name>.yaml``.

Every model takes images in [-1, 1] (what ``prepare`` writes) and ends in a softmax over the
label scheme's classes. A builder returns the model and its training *phases*; the one training
path in :mod:`pipeline.train` runs the phases in order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING, DictConfig

from pipeline import discover


@dataclass
class Phase:
    """One ``fit`` call: its name, epoch budget, learning rate and which layers may learn."""

    name: str
    epochs: int
    learning_rate: float
    trainable_from: int | None = None  # backbone layers from this index on are trainable
    # learning-rate multiplier per weight (``variable.path``); weights not named learn at 1x
    lr_scales: dict[str, float] | None = None


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


@dataclass
class ModelCommon:
    """The keys every model has (values and reasons: ``conf/models/*.yaml``)."""

    kind: str = MISSING
    train: dict[str, Any] = MISSING  # this model's train.* overrides
    input_size: int | None = MISSING  # side the image is resized to inside the model
    dense_units: int = MISSING
    dropout: float = MISSING
    l2: float = MISSING
    activation: str = MISSING


@dataclass(frozen=True)
class ModelKind:
    """One architecture, as the rest of the pipeline sees it."""

    name: str
    fields: type  # dataclass of the keys only this kind reads
    validate: Callable[[DictConfig, str, DictConfig], None]  # (cfg, name, models.<name>)
    build: Callable[..., BuiltModel]  # (mc, input_shape, n_classes, train, name)
    # (cfg, mc, pretrained) -> the card's label and one-sentence architecture
    describe: Callable[[DictConfig, DictConfig, bool | None], tuple[str, str]]


@functools.cache
def registry() -> dict[str, ModelKind]:
    """Every model-kind module of this package, by name."""
    return discover(__name__, "KIND", ModelKind)


def model_input(cfg: DictConfig, mc: DictConfig) -> str:
    """The image size the network sees: the prepared size, or the size it resizes to itself."""
    if mc.input_size:
        return f"images resized to {mc.input_size}x{mc.input_size} px inside the model"
    return f"{cfg.prepare.image_size}x{cfg.prepare.image_size} px input"


def head(x, mc: DictConfig, n_classes: int):
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


def build_model(mc: DictConfig, input_shape: tuple[int, int, int], n_classes: int,
                train: DictConfig, name: str) -> BuiltModel:
    return registry()[mc.kind].build(mc, input_shape, n_classes, train, name=name)


def set_trainable_from(model, backbone_name: str, start: int) -> None:
    """Unfreeze backbone layers from ``start`` on, keeping batch norms frozen (Keras guide)."""
    import keras

    backbone = model.get_layer(backbone_name)
    backbone.trainable = True
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
