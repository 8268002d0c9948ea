"""Where galaxies come from. Each source is one module of this package that defines ``SOURCE``,
a :class:`SourceKind`: its ``data.<name>`` schema, its checks, its fetch function and the
sentence the model card says about it. Adding a source is one module here and one
``conf/data/<name>.yaml``.

Every source writes the same contract into ``paths.raw``:

* one cutout file per galaxy (FITS with g, r, i extensions, or JPEG/PNG/TIFF), and
* ``catalog.csv`` with at least the columns in :data:`pipeline.artifacts.CATALOG_COLUMNS`
  (``file`` is relative to the raw folder).

The stages after ``fetch`` read only that contract, never the source.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from pipeline import discover
from pipeline.artifacts import CATALOG_COLUMNS, CATALOG_NAME

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CATALOG_COLUMNS", "CATALOG_NAME", "SourceKind", "get_source", "registry"]


def _no_inputs(data: DictConfig) -> dict[str, str | None]:
    return {}


@dataclass(frozen=True)
class SourceKind:
    """One galaxy source, as the rest of the pipeline sees it."""

    name: str
    schema: type  # the dataclass of data.<name>
    # Takes the validated config and an empty folder, fills the folder with cutouts and returns
    # the catalog (fetch writes it).
    fetch: Callable[[DictConfig, Path], pd.DataFrame]
    validate: Callable[[DictConfig], None]  # checks cfg.data; raises ConfigError
    describe: Callable[[DictConfig], str]  # where galaxies and labels came from, with credit
    # Files and folders of the user's that it reads, by config key: fetch refuses an output
    # that holds one of them.
    inputs: Callable[[DictConfig], dict[str, str | None]] = field(default=_no_inputs)


@functools.cache
def registry() -> dict[str, SourceKind]:
    """Every source module of this package, by name."""
    return discover(__name__, "SOURCE", SourceKind)


def get_source(name: str) -> SourceKind:
    return registry()[name]
