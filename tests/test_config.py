"""Config composition, the params.yaml that DVC reads, and validation of bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.config import ConfigError, compose, validate

REPO = Path(__file__).resolve().parent.parent


def test_default_config_composes_both_models():
    cfg = validate(compose())
    assert set(cfg.models) == {"cnn", "transfer"}
    assert cfg.models.cnn.kind == "cnn"
    assert cfg.models.transfer.kind == "transfer"
    assert cfg.data.source == "mock"
    assert list(cfg.data.classes) == ["elliptical", "spiral", "edge_on"]


def test_params_yaml_equals_the_composed_conf():
    """DVC stages read params.yaml; it must be conf/ composed (`python -m pipeline.config`)."""
    composed = OmegaConf.to_container(compose(), resolve=True)
    tracked = yaml.safe_load((REPO / "params.yaml").read_text())
    assert tracked == composed, "params.yaml is stale: run `python -m pipeline.config`"


def test_writing_params_refuses_a_bad_value_and_keeps_the_old_file(tmp_path):
    from pipeline.config import ConfigError, write_params

    params = tmp_path / "params.yaml"
    params.write_text("kept: true\n")
    with pytest.raises(ConfigError, match=r"'models.transfer.train.ema_momentum' = 2.0 is invalid"):
        write_params(params, ["experiment=gz1", "models.transfer.train.ema_momentum=2"])
    assert params.read_text() == "kept: true\n"
    write_params(params, ["experiment=gz1"])
    assert yaml.safe_load(params.read_text())["models"]["transfer"]["train"]["ema_momentum"] == 0.99


@pytest.mark.parametrize("group,option", [
    (g.name, f.stem) for g in sorted((REPO / "conf").iterdir()) if g.is_dir()
    for f in sorted(g.glob("*.yaml"))
])
def test_every_config_option_composes_and_validates(group, option):
    key = {"models": "models@models.cnn"}.get(group, group)
    # A folder source is only complete with the user's catalog.
    extra = ["data.folder.catalog=my/catalog.csv"] if (group, option) == ("data", "folder") else []
    cfg = validate(compose([f"{key}={option}", *extra]))
    if group == "data":
        assert cfg.data.source == option


@pytest.mark.parametrize("override,plugin,target", [
    ("hydra/sweeper=tune", "hydra_plugins.hydra_optuna_sweeper", "OptunaSweeper"),
    ("hydra/launcher=parallel", "hydra_plugins.hydra_joblib_launcher", "JoblibLauncher"),
    ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "SlurmLauncher"),
])
def test_sweeper_and_launcher_configs_compose(override, plugin, target):
    pytest.importorskip(plugin)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[override], return_hydra_config=True)
    group = override.split("/")[1].split("=")[0]
    assert cfg.hydra[group]._target_.endswith(target)


def test_folder_source_without_a_catalog_is_refused():
    with pytest.raises(ConfigError, match=r"'data.folder.catalog' = None is invalid: the path"):
        validate(compose(["data=folder"]))


def test_augment_none_turns_every_transform_off():
    a = validate(compose(["augment=none"])).augment
    assert a.copies == 0 and a.rotation_degrees == 0 and a.blur_sigma == 0 and not a.flip


def test_dot_overrides_reach_one_model_only():
    cfg = validate(compose(["models.cnn.dropout=0.5"]))
    assert cfg.models.cnn.dropout == 0.5
    assert cfg.models.transfer.dropout == 0.3


@pytest.mark.parametrize("override,message", [
    ("train.learning_rate=-0.01", r"'train.learning_rate' = -0.01 is invalid: a positive number"),
    ("models.transfer.backbone=resnet9000",
     r"'models.transfer.backbone' = 'resnet9000' is invalid: one of \['mobilenet_v2', "),
    ("models.cnn.padding=full", r"'models.cnn.padding' = 'full' is invalid: one of \['valid'"),
    ("models.cnn.activation=relux", r"'models.cnn.activation' = 'relux' is invalid"),
    ("prepare.split.test=0.3", r"'prepare.split' = .* three positive fractions that sum to 1"),
    ("model=resnet", r"'model' = 'resnet' is invalid: one of \['cnn', 'transfer'\]"),
    ("augment.zoom=1.5", r"'augment.zoom' = 1.5 is invalid"),
    ("augment.colour=-0.1", r"'augment.colour' = -0.1 is invalid: the sigma of a log-normal"),
    ("+models.cnn.train.learnig_rate=0.1", r"'models.cnn.train.learnig_rate'"),
    ("+models.cnn.train.epochs=0",
     r"'models.cnn.train.epochs' = 0 is invalid: an integer in \[1, 10000\]"),
    ("+models.transfer.train.lr_schedule=step",
     r"'models.transfer.train.lr_schedule' = 'step' is invalid: one of \['plateau', 'cosine'\]"),
    ("evaluate.prior_correction=1.5",
     r"'evaluate.prior_correction' = '1.5' is invalid: 'fit' .*'none', or a fixed alpha in "
     r"\[0, 1\]"),
    ("evaluate.tta=flips", r"'evaluate.tta' = 'flips' is invalid: one of \['none', 'rot4'"),
    ("evaluate.tta_zoom=3",
     r"'evaluate.tta_zoom' = 3.0 is invalid: a magnification in \[0.5, 2.0\]"),
    ("models.transfer.layer_lr_decay=1.5",
     r"'models.transfer.layer_lr_decay' = 1.5 is invalid: a number in \(0, 1\]"),
    ("train.class_weight=oversample",
     r"'train.class_weight' = 'oversample' is invalid: 'balanced' .*'resample' .*'none'"),
])
def test_bad_values_are_refused_with_key_value_and_choices(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose([override]))


def test_xla_is_refused_for_a_model_that_resizes_with_antialiasing_inside():
    """TensorFlow's XLA has no kernel for the antialiased resize (seen failing at the first
    step of gz1's CNN); both gz1 models shrink their input, and the message names the way out."""
    for model, side in (("cnn", 64), ("transfer", 112)):
        with pytest.raises(ConfigError, match=rf"'train.jit_compile' = True is invalid: false for "
                                              rf"models.{model}: it resizes 144-px images to "
                                              rf"{side} px.*models.{model}.input_size=null"):
            validate(compose(["experiment=gz1", f"model={model}", "train.jit_compile=true"]))
    validate(compose(["experiment=gz1", "model=transfer", "train.jit_compile=true",
                      "models.transfer.input_size=null"]))


def test_unknown_key_is_refused_by_name():
    cfg = compose()
    OmegaConf.set_struct(cfg, False)
    cfg.train.learnig_rate = 0.1  # a typo
    with pytest.raises(ConfigError, match=r"'train.learnig_rate'"):
        validate(cfg)


def test_wrong_type_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"'train.epochs'"):
        validate(compose(["train.epochs=many"]))


def test_a_model_may_override_any_train_key_for_itself():
    from pipeline.config import model_train_config

    cfg = validate(compose(["+models.cnn.train.learning_rate=3e-4", "train.epochs=7"]))
    cnn, transfer = model_train_config(cfg, "cnn"), model_train_config(cfg, "transfer")
    assert (cnn.learning_rate, cnn.epochs) == (3e-4, 7)
    assert (transfer.learning_rate, transfer.epochs) == (1e-3, 7)


def test_a_config_saved_before_a_key_existed_still_validates_as_it_trained():
    """A model's config.yaml from before ``layer_lr_decay`` (the released gz1-cnn-v2's) reads
    as every layer at one rate; a user's model file that leaves out an older key is still
    refused by name."""
    cfg = OmegaConf.to_container(compose(), resolve=True)
    del cfg["models"]["transfer"]["layer_lr_decay"]
    assert validate(cfg).models.transfer.layer_lr_decay == 1.0
    del cfg["models"]["transfer"]["fine_tune_epochs"]
    with pytest.raises(ConfigError, match=r"'models.transfer.fine_tune_epochs' has no value"):
        validate(cfg)
