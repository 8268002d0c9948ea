"""Shared fixtures: the real conf/ composed once and shrunk to the tiny debug config."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import DictConfig

from pipeline.config import compose, validate

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def tiny_config(root: Path, *overrides: str) -> DictConfig:
    """The tiny debug config with every output under ``root``."""
    paths = [f"paths.{k}={root / k}" for k in ("raw", "prepared", "models", "reports", "backup")]
    return validate(compose(["debug=tiny", *paths, *overrides]))


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DictConfig:
    return tiny_config(tmp_path)


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory: pytest.TempPathFactory) -> DictConfig:
    """A fetched and prepared tiny mock dataset, made once per test session."""
    from pipeline import fetch, prepare

    cfg = tiny_config(tmp_path_factory.mktemp("prepared"))
    fetch.run(cfg)
    prepare.run(cfg)
    return cfg


@pytest.fixture(scope="session")
def trained_tiny(prepared_tiny: DictConfig) -> tuple[DictConfig, dict]:
    """Both models trained and evaluated on the tiny data, once per session."""
    from pipeline import evaluate, train

    summaries = {}
    for name in ("cnn", "transfer"):
        summaries[name] = train.run(prepared_tiny, name)
        evaluate.run(prepared_tiny, name)
    return prepared_tiny, summaries


def copy_project(dest: Path, names: tuple[str, ...]) -> Path:
    """Copy the named files and folders of this checkout into a fresh project folder."""
    import shutil

    dest.mkdir(parents=True)
    for name in names:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dest / name)
    return dest


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when that folder is not beside the checkout."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is only beside developer checkouts and CI)")
    return path


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--remote-data", action="store_true",
                     help="run tests that reach the live SDSS services")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--remote-data"):
        return
    skip = pytest.mark.skip(reason="needs the live SDSS services; run with --remote-data")
    for item in items:
        if "remote_data" in item.keywords:
            item.add_marker(skip)
