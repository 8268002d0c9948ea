"""A CNN trained from scratch: conv -> (batch norm) -> activation -> max-pool blocks, then a
dropout-regularised dense head (the lecture's building blocks, Dieleman et al. 2015)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING, DictConfig

from pipeline.errors import ConfigError, require
from pipeline.models import BN_MOMENTUM, BuiltModel, ModelKind, Phase, head, model_input

PADDINGS = ("valid", "same")


@dataclass
class CnnFields:
    """The keys only a CNN reads (values and reasons: ``conf/models/cnn.yaml``)."""

    filters: list[int] = MISSING
    kernel_size: int = MISSING
    padding: str = MISSING
    pool_size: int = MISSING
    batch_norm: bool = MISSING


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
        # float32 under mixed precision too: TensorFlow's antialiased resize has no
        # half-precision gradient, which saliency maps need.
        x = keras.layers.Resizing(size, size, interpolation="bilinear", antialias=True,
                                  dtype="float32", name="resize")(x)
    for i, filters in enumerate(mc.filters, start=1):
        x = keras.layers.Conv2D(filters, mc.kernel_size, padding=mc.padding,
                                use_bias=not mc.batch_norm, kernel_regularizer=reg,
                                name=f"conv{i}")(x)
        if mc.batch_norm:
            x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{i}")(x)
        x = keras.layers.Activation(mc.activation, name=f"act{i}")(x)
        x = keras.layers.MaxPooling2D(mc.pool_size, name=f"pool{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = head(x, mc, n_classes)
    model = keras.Model(inputs, outputs, name=name)
    return BuiltModel(model, [Phase("train", train.epochs, train.learning_rate)], None)


def validate(cfg: DictConfig, name: str, mc: DictConfig) -> None:
    k = f"models.{name}"
    require(mc.padding in PADDINGS, f"{k}.padding", mc.padding, f"one of {list(PADDINGS)}")
    require(1 <= len(mc.filters) <= 32 and all(1 <= f <= 4096 for f in mc.filters),
            f"{k}.filters", list(mc.filters), "1 to 32 integers in [1, 4096]")
    require(1 <= mc.kernel_size <= 31, f"{k}.kernel_size", mc.kernel_size,
            "an integer in [1, 31]")
    require(1 <= mc.pool_size <= 8, f"{k}.pool_size", mc.pool_size, "an integer in [1, 8]")
    size = int(mc.input_size or cfg.prepare.image_size)
    require(conv_output_size(size, mc) >= 1, f"{k}.filters", list(mc.filters),
            f"few enough blocks that a {size}-pixel image (padding '{mc.padding}', kernel "
            f"{mc.kernel_size}, pool {mc.pool_size}) keeps at least 1 pixel: use fewer "
            f"blocks, padding 'same', or a larger {k}.input_size / prepare.image_size")


def describe(cfg: DictConfig, mc: DictConfig, pretrained: bool | None) -> tuple[str, str]:
    return "CNN trained from scratch", (
        f"{model_input(cfg, mc)}, {len(mc.filters)} conv blocks (filters {list(mc.filters)}, "
        f"kernel {mc.kernel_size}, padding '{mc.padding}', {mc.activation}"
        f"{', batch norm' if mc.batch_norm else ''}, max-pool {mc.pool_size}), global average "
        f"pooling, dropout {mc.dropout}, dense {mc.dense_units}, softmax; L2 {mc.l2}.")


KIND = ModelKind("cnn", CnnFields, validate, build_cnn, describe)
