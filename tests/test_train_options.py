"""Training switches for accelerators and scale-out, exercised on the CPU."""

from __future__ import annotations

from pathlib import Path

import keras
import pandas as pd
import pytest

from pipeline import train
from tests.conftest import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("options,strategy", [
    (["train.strategy=default"], "_DefaultDistributionStrategy"),
    (["train.strategy=mirrored"], "MirroredStrategy"),
    (["train.mixed_precision=true", "train.jit_compile=true"], "_DefaultDistributionStrategy"),
])
def test_training_runs_under_each_strategy_and_precision(prepared_tiny, tmp_path, options,
                                                         strategy):
    cfg = tiny_config(tmp_path, f"paths.raw={prepared_tiny.paths.raw}",
                      f"paths.prepared={prepared_tiny.paths.prepared}", *options)
    try:
        summary = train.run(cfg, "cnn")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert summary["strategy"] == strategy
    assert summary["replicas"] == 1  # one CPU device
    history = pd.read_csv(Path(cfg.paths.models) / "cnn" / "history.csv")
    assert history["loss"].notna().all()
    from pipeline.evaluate import load_model

    model = load_model(Path(cfg.paths.models) / "cnn")
    assert model.get_layer("probabilities").dtype_policy.compute_dtype == "float32"
