"""The README's runnable shell blocks work as written, in a copy switched to the tiny config."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_project

FILES = ("pipeline", "conf", "notebooks", "dvc.yaml", "params.yaml", "pyproject.toml",
         ".dvcignore", ".gitignore", "README.md")


def runnable_blocks(readme: str) -> list[str]:
    return re.findall(r"```bash runnable\n(.*?)```", readme, flags=re.S)


def test_readme_marks_its_quick_start_runnable():
    blocks = runnable_blocks((REPO / "README.md").read_text())
    assert blocks[0].split() == ["pip", "install", "-e", '".[dev]"', "dvc", "repro"]
    assert len(blocks) >= 6


@pytest.mark.slow
def test_runnable_readme_commands_succeed_on_the_tiny_config(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is needed for DVC experiments")
    project = copy_project(tmp_path / "project", FILES)
    config = project / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("- debug: null", "- debug: tiny"))
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(script: str) -> None:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=project,
                                env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{script}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"

    sh("python -m pipeline.config && git init -q && dvc init -q")
    shutil.copy(REPO / ".dvc" / "config", project / ".dvc" / "config")  # Hydra composition on
    sh("git add -A && git commit -qm tiny")
    for block in runnable_blocks((project / "README.md").read_text()):
        # The environment is installed already; the rest runs as written.
        script = "\n".join(line for line in block.splitlines()
                           if not line.startswith("pip install"))
        sh(script)
    assert (project / "reports" / "cards" / "comparison.html").is_file()
    assert (project / "preds.csv").read_text().startswith("image,predicted,")
    assert list((project / "multirun").glob("*/*/sweep_summary.csv"))
