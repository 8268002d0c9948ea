"""The package as users install it: a wheel, with its configuration, outside any checkout."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_an_installed_wheel_predicts_from_a_folder_outside_the_checkout(trained_tiny, tmp_path):
    cfg, _ = trained_tiny
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist),
                    str(REPO)], check=True, timeout=600)
    wheel = next(dist.glob("galaxy_morphology_pipeline-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    target = next(venv.glob("lib/python*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True, timeout=300)
    # The dependencies come from the tested environment; its editable checkout does not (a
    # .pth file's folders are put on the path, their own .pth files are not run).
    (target / "tested_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = venv / "bin" / "python"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIPELINE_CONF_DIR")}

    where = subprocess.run(
        [str(python), "-c", "import pipeline.config as c; print(c.__file__); print(c.CONF_DIR)"],
        cwd=outside, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where == [str(target / "pipeline" / "config.py"), str(target / "pipeline" / "conf")]

    def predict_installed(model: str, output: str) -> None:
        result = subprocess.run(
            [str(python), "-m", "pipeline.predict", model,
             f"input={Path(cfg.paths.raw) / 'images'}", f"output={output}",
             "mc_dropout_samples=0"], cwd=outside, env=env, capture_output=True, text=True,
            timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]

    predict_installed(f"model_dir={Path(cfg.paths.models) / 'cnn'}", "predictions.csv")
    predictions = pd.read_csv(outside / "predictions.csv")
    assert len(predictions) == 24
    np.testing.assert_allclose(predictions.filter(like="p_").sum(axis=1), 1.0, atol=1e-5)

    # A released model ships inside the wheel: classify by name, with no checkout.
    from pipeline.release import available

    if "gz1-cnn-v2" in available():
        predict_installed("model=gz1-cnn-v2", "released.fits")
        from astropy.table import Table

        table = Table.read(outside / "released.fits")
        assert len(table) == 24
        assert str(table.meta["MODEL"]).startswith(str(target / "pipeline" / "released"))
