"""predict: new images get the trained model's own preprocessing and a row each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipeline import predict
from pipeline.artifacts import InferenceSettings, TrainedModel, load_split
from pipeline.config import ConfigError
from tests.conftest import REPO


def predict_cfg(**values):
    base = OmegaConf.load(REPO / "conf" / "predict.yaml")
    return OmegaConf.merge(base, values)


@pytest.mark.slow
def test_predict_on_a_catalog_reproduces_evaluate(trained_tiny, tmp_path):
    cfg, _ = trained_tiny
    evaluated = pd.read_csv(Path(cfg.paths.reports) / "cnn" / "predictions.csv", dtype=str)
    catalog = pd.read_csv(Path(cfg.paths.raw) / "catalog.csv", dtype=str)
    test_rows = catalog.set_index("objid").loc[evaluated["objid"]].reset_index()
    user_catalog = tmp_path / "new.csv"
    test_rows.assign(path=[str(Path(cfg.paths.raw) / f) for f in test_rows["file"]]).to_csv(
        user_catalog, index=False)
    out = predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                                  input=str(user_catalog), image_column="path",
                                  output=str(tmp_path / "preds.csv"), mc_dropout_samples=0))
    on_disk = pd.read_csv(tmp_path / "preds.csv")
    assert list(on_disk.columns) == ["image", "predicted", "p_elliptical", "p_spiral",
                                     "p_edge_on", "entropy", "mc_dropout_std"]
    assert on_disk["image"].tolist() == test_rows.assign(
        path=[str(Path(cfg.paths.raw) / f) for f in test_rows["file"]])["path"].tolist()
    # Same preprocessing as training: the same probabilities evaluate found (float16 storage aside).
    np.testing.assert_allclose(out[["p_elliptical", "p_spiral", "p_edge_on"]].to_numpy(),
                               evaluated[["p_elliptical", "p_spiral", "p_edge_on"]].astype(float),
                               atol=0.02)
    np.testing.assert_allclose(on_disk.filter(like="p_").sum(axis=1), 1.0, atol=1e-5)
    # The model's own evaluate.tta is the default; asking for no views changes the numbers.
    metrics = pd.read_json(Path(cfg.paths.reports) / "cnn" / "metrics.json", typ="series")
    assert metrics["tta"] == "dihedral" and metrics["tta_views"] == 8
    assert metrics["tta_zoom"] == 1.0
    # The views and the prior correction are one decision, stored in the bundle by evaluate.
    inference = InferenceSettings.load(Path(cfg.paths.models) / "cnn")
    assert (inference.tta, inference.tta_zoom) == ("dihedral", 1.0)
    assert metrics["prior_correction_alpha"] == inference.prior_correction.alpha
    assert set(inference.prior_correction.validation_macro_f1) == {
        "0.0", "0.25", "0.5", "0.75", "1.0"}
    # The same bundle on the same pixels: evaluate's probabilities, to float precision.
    bundle = TrainedModel.load(Path(cfg.paths.models) / "cnn")
    test = load_split(Path(cfg.paths.prepared), "test")
    np.testing.assert_allclose(bundle.predict_proba(test["images"].astype(np.float32)),
                               evaluated[["p_elliptical", "p_spiral", "p_edge_on"]].astype(float),
                               atol=1e-6)
    single = predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                                     input=str(user_catalog), image_column="path", tta="none",
                                     output=str(tmp_path / "one.csv"), mc_dropout_samples=0))
    assert not np.allclose(single["p_spiral"], out["p_spiral"], atol=1e-4)
    with pytest.raises(ConfigError, match=r"'tta' = 'flip' is invalid: one of \['none'"):
        predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                                input=str(user_catalog), image_column="path", tta="flip",
                                output=str(tmp_path / "bad.csv"), mc_dropout_samples=0))
    assert not (tmp_path / "bad.csv").exists()
    with pytest.raises(ConfigError,
                       match=r"'tta_zoom' = 5.0 is invalid: a magnification in \[0.5, 2.0\]"):
        predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                                input=str(user_catalog), image_column="path", tta_zoom=5,
                                output=str(tmp_path / "bad.csv"), mc_dropout_samples=0))
    magnified = predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                                        input=str(user_catalog), image_column="path",
                                        tta_zoom=1.3, output=str(tmp_path / "z.csv"),
                                        mc_dropout_samples=0))
    assert not np.allclose(magnified["p_spiral"], out["p_spiral"], atol=1e-4)


@pytest.mark.slow
def test_predict_on_a_folder_with_mc_dropout_gives_a_spread(trained_tiny, tmp_path):
    cfg, _ = trained_tiny
    out = predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                                  input=str(Path(cfg.paths.raw) / "images"),
                                  output=str(tmp_path / "p.csv"), mc_dropout_samples=20))
    assert len(out) == 24
    assert (out["mc_dropout_std"] > 0).all()  # tiny dropout model: masks change the answer
    assert (out["entropy"] >= 0).all() and (out["entropy"] <= np.log(3) + 1e-6).all()


def test_predict_cli_names_a_missing_column(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.yaml").write_text("data: {classes: [a, b]}\nprepare: {image_size: 8}\n")
    (model_dir / "model.keras").write_bytes(b"")
    catalog = tmp_path / "c.csv"
    catalog.write_text("file,label\nx.jpg,a\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", f"model_dir={model_dir}", f"input={catalog}",
         f"output={tmp_path / 'o.csv'}", f"hydra.run.dir={tmp_path / 'h'}"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0
    assert "no column image_column = 'filename'; the catalog has ['file', 'label']" in (
        result.stdout + result.stderr)
    assert not (tmp_path / "o.csv").exists()
