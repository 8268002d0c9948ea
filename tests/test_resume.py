"""A training run killed with SIGKILL mid-run resumes from its last finished epoch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO


def train_command(cfg, root: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", "debug=tiny", "model=cnn",
            f"paths.raw={cfg.paths.raw}", f"paths.prepared={cfg.paths.prepared}",
            f"paths.models={root / 'models'}", f"paths.backup={root / 'backup'}",
            f"train.epochs={epochs}", "train.early_stopping_patience=1000",
            "train.reduce_lr_patience=1000", f"hydra.run.dir={root / 'hydra'}"]


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_continues_from_the_last_epoch(prepared_tiny, tmp_path):
    epochs = 25
    command = [*train_command(prepared_tiny, tmp_path, epochs), "train.lr_schedule=cosine",
               "train.warmup_epochs=2", "train.learning_rate=0.002"]
    state_csv = tmp_path / "backup" / "cnn" / "history.csv"
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if state_csv.is_file() and len(state_csv.read_text().splitlines()) >= 4:  # 3 epochs
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(pd.read_csv(state_csv))
    assert 3 <= done_before < epochs, "the run finished before it could be killed"
    assert not (tmp_path / "models" / "cnn").exists()  # no half-written model

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming cnn" in rerun.stdout + rerun.stderr
    history = pd.read_csv(tmp_path / "models" / "cnn" / "history.csv")
    assert history["epoch"].tolist() == list(range(1, epochs + 1))  # each epoch exactly once
    # The learning-rate schedule went on where it was killed: warm-up to the peak, then one
    # unbroken decay (a restarted schedule would jump back up at the resumed epoch).
    rate = history["learning_rate"].to_numpy()
    assert rate[0] < rate[1] == pytest.approx(0.002)
    assert (rate[2:] < rate[1:-1]).all()
    assert rate[-1] < 0.002 / 100
    assert not (tmp_path / "backup" / "cnn").exists()  # state cleaned up after success


@pytest.mark.slow
@pytest.mark.shared_data
def test_kill_9_during_fine_tuning_resumes_inside_the_second_phase(prepared_tiny, tmp_path):
    from tests.conftest import shared_path

    weights = shared_path("weights", "mobilenet_v1_alpha0.25_224_imagenet_no_top.h5")
    command = [c for c in train_command(prepared_tiny, tmp_path, 3) if c != "model=cnn"] + [
        "model=transfer", f"models.transfer.weights={weights}",
        "models.transfer.fine_tune_epochs=20", "models.transfer.fine_tune_layers=20"]
    state_csv = tmp_path / "backup" / "transfer" / "history.csv"
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # 3 frozen epochs, then 2 of fine-tuning
        if state_csv.is_file() and len(state_csv.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= len(pd.read_csv(state_csv)) < 23, "killed outside the fine-tuning phase"

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    history = pd.read_csv(tmp_path / "models" / "transfer" / "history.csv")
    assert history["epoch"].tolist() == list(range(1, 24))
    assert history["phase"].tolist() == ["feature_extraction"] * 3 + ["fine_tuning"] * 20
    import json

    summary = json.loads((tmp_path / "models" / "transfer" / "train_summary.json").read_text())
    assert [(p["phase"], p["epochs_run"], p["last_epoch"]) for p in summary["phases"]] == [
        ("feature_extraction", 3, 3), ("fine_tuning", 20, 23)]


def test_a_second_run_on_the_same_state_folder_is_refused(tmp_path):
    """Two trainings sharing paths.backup would resume from, then delete, each other's state."""
    from pipeline.train import TrainingBusyError, exclusive_state

    state = tmp_path / "backup" / "cnn"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from pipeline.train import exclusive_state\n"
         f"with exclusive_state(Path({str(state)!r}), 'cnn'):\n"
         "    print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = r"another process is training 'cnn' .* its own paths.backup"
        with pytest.raises(TrainingBusyError, match=busy), exclusive_state(state, "cnn"):
            pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with exclusive_state(state, "cnn"):  # free again once the holder is gone
        pass


def test_a_backup_folder_holding_the_users_files_is_never_deleted(tmp_path):
    from pipeline.io import OutputError
    from pipeline.train import prepare_state_dir

    state = tmp_path / "backup" / "cnn"
    state.mkdir(parents=True)
    (state / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holds files this stage did not write"):
        prepare_state_dir(state, "f1")
    assert (state / "notes.txt").read_text() == "mine"
    (state / "notes.txt").unlink()
    assert prepare_state_dir(state, "f1") is False  # empty: taken
    (state / "epoch.json").write_text("{}")
    assert prepare_state_dir(state, "f1") is True  # its own state, same config: resumed
    assert prepare_state_dir(state, "f2") is False  # its own state, other config: discarded
    assert not (state / "epoch.json").exists()
