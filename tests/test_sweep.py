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
