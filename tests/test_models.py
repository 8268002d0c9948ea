"""Model builders: shapes under valid/same padding, head, and the transfer-learning phases."""

from __future__ import annotations

import logging

import pytest

from pipeline.config import ConfigError
from tests.conftest import shared_path


def build(cfg, name, size=32):
    from pipeline.models import build_model

    return build_model(cfg.models[name], (size, size, 3), 3, cfg.train, name=name)


@pytest.mark.parametrize("padding,expected",
                         [("same", [32, 16, 16, 8]), ("valid", [30, 15, 13, 6])])
def test_cnn_padding_sets_the_feature_map_sizes(tiny_cfg, padding, expected):
    tiny_cfg.models.cnn.padding = padding
    model = build(tiny_cfg, "cnn").model
    sizes = [model.get_layer(n).output.shape[1] for n in ("conv1", "pool1", "conv2", "pool2")]
    assert sizes == expected
    assert model.output.shape[-1] == 3


def test_cnn_with_too_many_valid_blocks_is_refused_with_the_key(tiny_cfg):
    tiny_cfg.models.cnn.padding = "valid"
    tiny_cfg.models.cnn.filters = [8, 8, 8, 8, 8]
    with pytest.raises(ConfigError, match=r"'models.cnn.filters' .* shrinks a 32-pixel image"):
        build(tiny_cfg, "cnn")


def test_cnn_uses_the_configured_activation_dropout_and_l2(tiny_cfg):
    tiny_cfg.models.cnn.activation = "elu"
    tiny_cfg.models.cnn.dropout = 0.4
    model = build(tiny_cfg, "cnn").model
    assert model.get_layer("act1").get_config()["activation"] == "elu"
    assert model.get_layer("head_dropout").rate == pytest.approx(0.4)
    assert model.get_layer("conv1").kernel_regularizer.l2 == pytest.approx(1e-4)


def test_transfer_without_weights_is_flagged_and_trains_whole(tiny_cfg, caplog):
    with caplog.at_level(logging.WARNING):
        built = build(tiny_cfg, "transfer")
    assert built.pretrained is False
    assert [p.name for p in built.phases] == ["train_all"]
    assert "randomly initialised" in caplog.text


def test_missing_weights_file_is_refused_by_key(tiny_cfg):
    tiny_cfg.models.transfer.weights = "/nowhere/weights.h5"
    with pytest.raises(ConfigError, match=r"'models.transfer.weights' = '/nowhere/weights.h5'"):
        build(tiny_cfg, "transfer")


@pytest.fixture
def offline(monkeypatch):
    """What Keras meets with no network and no cached weights, without waiting for DNS."""
    def unreachable(*args, **kwargs):
        raise Exception("URL fetch failure (offline)")

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", unreachable)


def test_unreachable_imagenet_without_permission_fails_loudly(tiny_cfg, offline):
    tiny_cfg.models.transfer.weights = "imagenet"
    tiny_cfg.models.transfer.allow_random_init = False
    with pytest.raises(ConfigError, match=r"allow_random_init=true"):
        build(tiny_cfg, "transfer")


def test_gz1_without_imagenet_weights_stops_instead_of_training_a_random_backbone(offline):
    """Offline with no cached weights, experiment=gz1 names the key to set at once, rather than
    spending its transfer training on a backbone that has learnt nothing."""
    from pipeline.config import compose, model_train_config, validate
    from pipeline.models import build_model

    cfg = validate(compose(["experiment=gz1"]))
    with pytest.raises(ConfigError, match=r"set models.transfer.weights to a local .h5 file"):
        build_model(cfg.models.transfer, (144, 144, 3), 3, model_train_config(cfg, "transfer"),
                    name="transfer")


@pytest.mark.shared_data
def test_real_imagenet_weights_give_a_frozen_backbone_then_fine_tuning(tiny_cfg):
    path = shared_path("weights", "mobilenet_v1_alpha0.25_224_imagenet_no_top.h5")
    tiny_cfg.models.transfer.weights = str(path)
    tiny_cfg.models.transfer.fine_tune_layers = 10
    built = build(tiny_cfg, "transfer")
    assert built.pretrained is True
    assert [p.name for p in built.phases] == ["feature_extraction", "fine_tuning"]
    backbone = built.model.get_layer(built.backbone_name)
    assert not backbone.trainable
    head_only = len(built.model.trainable_weights)
    from pipeline.models import set_trainable_from

    set_trainable_from(built.model, built.backbone_name, built.phases[1].trainable_from)
    assert len(built.model.trainable_weights) > head_only
    # Batch norms stay frozen while fine-tuning; the top layers learn.
    import keras

    bns = [layer for layer in backbone.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and not any(layer.trainable for layer in bns)
    assert backbone.layers[-2].trainable or backbone.layers[-1].trainable


def test_cnn_input_size_resizes_inside_the_model(tiny_cfg):
    """A small CNN can share a larger prepared split: it downsamples first, then convolves."""
    tiny_cfg.models.cnn.input_size = 16
    model = build(tiny_cfg, "cnn", size=48).model
    assert model.input.shape[1:] == (48, 48, 3)
    assert model.get_layer("conv1").output.shape[1] == 16
    tiny_cfg.models.cnn.padding = "valid"
    tiny_cfg.models.cnn.filters = [8, 8, 8]
    with pytest.raises(ConfigError, match=r"shrinks a 16-pixel image .* models.cnn.input_size"):
        build(tiny_cfg, "cnn", size=48)


@pytest.mark.parametrize("name", ["cnn", "transfer"])
def test_a_mixed_precision_model_that_resizes_gives_saliency_maps(tiny_cfg, name):
    """Under bfloat16 the resize stays float32: TensorFlow has no half-precision gradient of
    the antialiased resize, and evaluate's saliency maps differentiate through it."""
    import keras
    import numpy as np

    from pipeline.evaluate import saliency

    tiny_cfg.models[name].input_size = 32
    if name == "transfer":
        tiny_cfg.models.transfer.weights = None
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build(tiny_cfg, name, size=48).model
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("resize").dtype_policy.compute_dtype == "float32"
    images = np.random.default_rng(0).uniform(-1, 1, (2, 48, 48, 3)).astype(np.float32)
    maps = saliency(model, images, np.array([0, 2]))
    assert maps.shape == (2, 48, 48)
    assert np.isfinite(maps).all() and maps.max() > 0


def test_layerwise_decay_slows_each_lower_stage_of_the_backbone(tiny_cfg, tmp_path):
    """``layer_lr_decay``: one fine-tuning step moves the first convolution ``decay ** 4`` as
    far as the last (MobileNet has five feature-map sizes), and the head at the full rate."""
    import keras
    import numpy as np

    from pipeline.models import set_trainable_from
    from pipeline.train import adam

    # Stands in for ImageNet weights, offline. Fresh batch norms would shrink the signal to
    # 1e-16 by the top, below Adam's epsilon: give them one random batch's statistics.
    backbone = keras.applications.MobileNet(include_top=False, weights=None, alpha=0.25,
                                            input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, 32, 32, 3)).astype("float32")
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    backbone(images, training=True)
    weights = tmp_path / "backbone.weights.h5"
    backbone.save_weights(weights)
    tiny_cfg.models.transfer.update(backbone="mobilenet", alpha=0.25, weights=str(weights),
                                    fine_tune_layers=1000, layer_lr_decay=0.5)
    built = build(tiny_cfg, "transfer")
    fine_tuning = built.phases[1]
    set_trainable_from(built.model, built.backbone_name, fine_tuning.trainable_from)
    rate = 1e-3
    built.model.compile(optimizer=adam(fine_tuning.lr_scales, learning_rate=rate),
                        loss="sparse_categorical_crossentropy")
    first, last = "conv1/kernel", "conv_pw_13/kernel"
    assert fine_tuning.lr_scales[first] == 0.5 ** 4 and fine_tuning.lr_scales[last] == 1.0
    named = {w.path: w for w in built.model.trainable_weights}
    head = next(p for p in named if p.startswith("head"))
    before = {p: keras.ops.convert_to_numpy(named[p]) for p in (first, last, head)}
    built.model.train_on_batch(images, np.arange(8) % 3)
    # Adam's first step moves every weight with a gradient by about the rate it is given.
    moved = {p: np.abs(keras.ops.convert_to_numpy(named[p]) - before[p]).max() for p in before}
    assert moved[first] == pytest.approx(rate * 0.5 ** 4, rel=0.05)
    assert moved[last] == pytest.approx(rate, rel=0.05)
    assert moved[head] == pytest.approx(rate, rel=0.05)
    tiny_cfg.models.transfer.layer_lr_decay = 1.0
    assert build(tiny_cfg, "transfer").phases[1].lr_scales is None
