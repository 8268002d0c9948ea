"""Hydra multiruns: one folder per run, prepared data reused, and a ranked summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO


def sweep(cfg, sweep_dir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline.train", "-m", "debug=tiny",
               f"paths.raw={cfg.paths.raw}", f"paths.prepared={cfg.paths.prepared}",
               f"hydra.sweep.dir={sweep_dir}", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_run_sweep_writes_each_run_apart_and_ranks_them(prepared_tiny, tmp_path):
    prepared = Path(prepared_tiny.paths.prepared) / "train" / "images.npy"
    stamp = prepared.stat().st_mtime_ns
    result = sweep(prepared_tiny, tmp_path / "sweep", "model=cnn",
                   "train.learning_rate=1e-3,3e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "models" / "cnn" / "model.keras").is_file()
    assert prepared.stat().st_mtime_ns == stamp  # prepared data read, not recomputed
    summary = pd.read_csv(tmp_path / "sweep" / "sweep_summary.csv")
    assert summary["rank"].tolist() == [1, 2]
    assert sorted(summary["overrides"]) == ["train.learning_rate=0.0003",
                                            "train.learning_rate=0.001"]
    assert summary["best_val_loss"].is_monotonic_increasing
    table = (tmp_path / "sweep" / "sweep_summary.md").read_text()
    assert "runs ranked by best_val_loss" in table and table.count("| cnn |") == 2
    assert (tmp_path / "sweep" / "sweep_summary.png").stat().st_size > 2000


@pytest.mark.slow
def test_optuna_sweeper_runs_trials_on_the_validation_loss(prepared_tiny, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = sweep(prepared_tiny, tmp_path / "tune", "hydra/sweeper=tune",
                   "hydra.sweeper.n_trials=2", "model=cnn")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(pd.read_csv(tmp_path / "tune" / "sweep_summary.csv")) == 2
    assert "best_value" in (tmp_path / "tune" / "optimization_results.yaml").read_text()


@pytest.mark.slow
def test_a_sweep_job_that_fails_ends_only_itself_and_is_listed(prepared_tiny, tmp_path):
    result = sweep(prepared_tiny, tmp_path / "sweep", "model=cnn",
                   "train.learning_rate=-0.5,1e-3")
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    assert "1 of 2 sweep runs failed" in out
    assert (tmp_path / "sweep" / "1" / "models" / "cnn" / "model.keras").is_file()  # went on
    summary = pd.read_csv(tmp_path / "sweep" / "sweep_summary.csv").set_index("job")
    assert summary.loc[1, "rank"] == 1 and summary.loc[1, "status"] == "ok"
    assert pd.isna(summary.loc[0, "rank"]) and pd.isna(summary.loc[0, "best_val_loss"])
    assert summary.loc[0, "status"].startswith(
        "failed: config key 'train.learning_rate' = -0.5 is invalid")
    assert "| failed: config key" in (tmp_path / "sweep" / "sweep_summary.md").read_text()


def test_a_diverged_trial_is_ranked_last_and_the_sweep_still_succeeds(trained_tiny, tmp_path,
                                                                     caplog):
    """A rate a sweep tries may diverge (train raises TrainingDiverged, recorded like the failed
    job above): a losing trial, listed last, and no error status for the sweep."""
    import shutil

    from omegaconf import OmegaConf

    from pipeline.io import atomic_write_json
    from pipeline.sweep import FAILED_NAME, SweepSummary

    cfg, _ = trained_tiny
    for job, rate in (("0", "3"), ("1", "0.001")):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(
            f"- model=cnn\n- train.learning_rate={rate}\n")
    shutil.copytree(Path(cfg.paths.models) / "cnn", tmp_path / "1" / "models" / "cnn")
    atomic_write_json(tmp_path / "0" / FAILED_NAME,
                      {"error": "training cnn diverged: the validation loss was NaN",
                       "diverged": True})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    SweepSummary().on_multirun_end(config)  # no SystemExit
    summary = pd.read_csv(tmp_path / "sweep_summary.csv")
    assert summary["overrides"].tolist() == ["train.learning_rate=0.001", "train.learning_rate=3"]
    assert summary["status"].tolist() == [
        "ok", "diverged: training cnn diverged: the validation loss was NaN"]
    assert summary["rank"].iloc[0] == 1 and pd.isna(summary["rank"].iloc[1])
    assert "1 of 2 sweep runs diverged" in caplog.text

    atomic_write_json(tmp_path / "0" / FAILED_NAME, {"error": "x.csv: not found",
                                                     "diverged": False})
    with pytest.raises(SystemExit) as ended:
        SweepSummary().on_multirun_end(config)
    assert ended.value.code == 2
    assert "1 of 2 sweep runs failed" in caplog.text and "run 0: x.csv: not found" in caplog.text
