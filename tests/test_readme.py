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


def readme_commands(block: str) -> list[str]:
    """The block's shell commands, a line each (backslash continuations joined)."""
    commands, pending = [], ""
    for line in block.splitlines():
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            commands.append(pending.strip())
        pending = ""
    return commands


def ran_stages(output: str) -> list[str]:
    """The stages DVC ran, in order, from its ``Running stage '...'`` lines."""
    return [line.split("'")[1] for line in output.splitlines()
            if line.startswith("Running stage '")]


ALL_STAGES = {"fetch", "prepare", "train@cnn", "train@transfer", "evaluate@cnn",
              "evaluate@transfer", "report"}


@pytest.mark.slow
def test_runnable_readme_commands_succeed_on_the_tiny_config(tmp_path):
    """Every command works as written, and DVC reruns what the README says it reruns."""
    if shutil.which("git") is None:
        pytest.skip("git is needed for DVC experiments")
    project = copy_project(tmp_path / "project", FILES)
    config = project / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("- debug: null", "- debug: tiny"))
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def sh(script: str) -> str:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=project,
                                env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{script}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        return result.stdout

    sh("python -m pipeline.config && git init -q && dvc init -q")
    shutil.copy(REPO / ".dvc" / "config", project / ".dvc" / "config")  # Hydra composition on
    sh("git add -A && git commit -qm tiny")
    ran: dict[str, list[str]] = {}
    for block in runnable_blocks((project / "README.md").read_text()):
        for command in readme_commands(block):
            if command.startswith("pip install"):
                continue  # the environment is installed already; the rest runs as written
            first_time = command not in ran
            ran.setdefault(command, ran_stages(sh(command)))
            if command == "dvc repro" and first_time:
                # "a second `dvc repro` does nothing" (README, The stages)
                assert ran_stages(sh("dvc repro")) == []

    assert ran["dvc repro"][:2] == ["fetch", "prepare"]
    assert set(ran["dvc repro"]) == ALL_STAGES
    # "changing an `augment` value reruns prepare and what follows it, not fetch"
    changed = ran["dvc exp run -S augment=none"]
    assert changed[0] == "prepare" and "fetch" not in changed and "report" in changed
    assert ran["dvc exp run -S models.cnn.dropout=0.5"][0] == "train@cnn"
    # "a test-time view (`evaluate.*`) ... rescores both models, without retraining either"
    assert set(ran["dvc exp run -S evaluate.tta_zoom=1.2"]) == {
        "evaluate@cnn", "evaluate@transfer", "report"}
    assert (project / "reports" / "cards" / "comparison.html").is_file()
    assert (project / "preds.csv").read_text().startswith("image,predicted,")
    assert list((project / "multirun").glob("*/*/sweep_summary.csv"))
