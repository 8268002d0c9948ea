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


def test_unreachable_imagenet_without_permission_fails_loudly(tiny_cfg, monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure (offline)")

    # What Keras meets with no network, without waiting for DNS to time out.
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    tiny_cfg.models.transfer.weights = "imagenet"
    tiny_cfg.models.transfer.allow_random_init = False
    with pytest.raises(ConfigError, match=r"allow_random_init=true"):
        build(tiny_cfg, "transfer")


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
