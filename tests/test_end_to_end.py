"""The whole pipeline on the tiny config, through run() and the CLI.

Through DVC it runs in tests/test_readme.py, as the README's own commands.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import report
from tests.conftest import REPO


@pytest.mark.slow
def test_tiny_pipeline_trains_evaluates_and_reports_both_models(trained_tiny):
    cfg, summaries = trained_tiny
    for name in ("cnn", "transfer"):
        summary = summaries[name]
        model_dir = Path(cfg.paths.models) / name
        assert (model_dir / "model.keras").is_file()
        history = pd.read_csv(model_dir / "history.csv")
        for column in ("epoch", "loss", "accuracy", "val_loss", "val_accuracy",
                       "learning_rate", "epoch_time_s", "images_per_s", "phase"):
            assert column in history.columns
        resolved = yaml.safe_load((model_dir / "config.yaml").read_text())
        assert resolved["models"][name] == dict(cfg.models[name])
        metrics = json.loads((Path(cfg.paths.reports) / name / "metrics.json").read_text())
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert set(metrics["per_class"]) == {"elliptical", "spiral", "edge_on"}
        assert metrics["pretrained"] == summary.pretrained
        inference = json.loads((model_dir / "inference.json").read_text())  # the bundle's views
        assert (inference["tta"], inference["tta_zoom"]) == (metrics["tta"], metrics["tta_zoom"])
        assert metrics["n_test"] == len(pd.read_csv(Path(cfg.paths.reports) / name /
                                                    "predictions.csv"))
    assert json.loads((Path(cfg.paths.reports) / "transfer" / "metrics.json").read_text())[
        "pretrained"] is False
    assert len(pd.read_csv(Path(cfg.paths.models) / "transfer" / "history.csv")) == 2

    report.run(cfg)
    cards = Path(cfg.paths.reports) / "cards"
    transfer_card = (cards / "transfer.md").read_text()
    # A model without pretrained weights says so in its first lines.
    assert "WITHOUT pretrained weights" in "\n".join(transfer_card.splitlines()[:4])
    assert "mobilenet (alpha 0.25) backbone, 32x32 px input, global average" in transfer_card
    # Each class against the rest, e.g. elliptical against disc galaxies (issue #4's ROC AUC).
    row = next(line for line in transfer_card.splitlines() if line.startswith("| elliptical |"))
    auc = json.loads((Path(cfg.paths.reports) / "transfer" / "metrics.json").read_text())[
        "roc_auc_one_vs_rest"]["elliptical"]
    assert row.split("|")[5].strip() == f"{auc:.3f}"
    # How it was trained, in the terms of its config (train.lr_schedule=plateau by default).
    assert ("learning rate cut by 0.3 after 3 epochs without improvement; early stopping on "
            "validation loss (patience 5) with the best weights restored") in transfer_card
    for section in ("Model details", "Intended use", "Factors", "Metrics", "Evaluation data",
                    "Training data", "Quantitative analyses", "Ethical considerations",
                    "Caveats and recommendations"):
        assert f"## {section}" in transfer_card
    html = (cards / "cnn.html").read_text()
    # The augmentation grid and eight figures: learning curves, confusion matrix, ROC, PR,
    # reliability, examples, kernels, saliency.
    assert html.count('src="data:image/png;base64,') == 9
    card = json.loads((cards / "transfer.json").read_text())
    for section in ("model_details", "intended_use", "factors", "metrics", "evaluation_data",
                    "training_data", "quantitative_analyses", "ethical_considerations",
                    "caveats_and_recommendations", "environment"):
        assert card[section], section
    assert card["model_details"]["pretrained"] is False
    # Trained on the mock's FITS: the card says JPEGs were never seen.
    assert card["training_data"]["cutouts_per_kind"] == {"flux": meta_train_galaxies(cfg)}
    assert ("Input kind: trained on flux images (FITS or float TIFF, given an asinh stretch); "
            "it never saw display images (JPEG, PNG or integer TIFF") in transfer_card
    assert set(card["metrics"]["confidence_intervals_95"]) == {
        "accuracy", "balanced_accuracy", "macro_f1"}
    assert 0 <= card["metrics"]["test"]["ece"] <= 1
    assert "WITHOUT pretrained" not in html
    comparison = (cards / "comparison.md").read_text()
    assert "| accuracy |" in comparison and "cnn" in comparison and "transfer" in comparison


def test_stage_cli_refuses_a_bad_value_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "train.learning_rate=-0.5",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    out = result.stdout + result.stderr
    assert "config key 'train.learning_rate' = -0.5 is invalid: a positive number" in out
    assert "Traceback" not in out


def test_stage_cli_reports_bad_data_in_one_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "catalog.csv").write_text("objid,ra,dec,file\n1,0,0,images/1.fits\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.prepare", f"paths.raw={raw}",
         f"paths.prepared={tmp_path / 'prepared'}", f"hydra.run.dir={tmp_path / 'h'}"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    out = result.stdout + result.stderr
    assert "catalog.csv: missing column(s) ['label']; a catalog needs" in out
    assert "Traceback" not in out
    assert not (tmp_path / "prepared").exists()


def meta_train_galaxies(cfg) -> int:
    meta = json.loads((Path(cfg.paths.prepared) / "meta.json").read_text())
    return meta["splits"]["train"]["galaxies"]
