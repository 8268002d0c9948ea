"""Where galaxies come from. Every source writes the same contract into ``paths.raw``:

* one cutout file per galaxy (FITS with g, r, i extensions, or JPEG/PNG), and
* ``catalog.csv`` with at least the columns in :data:`CATALOG_COLUMNS` (``file`` is relative
  to the raw folder).

The stages after ``fetch`` read only that contract, never the source.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from pipeline.catalog import CATALOG_COLUMNS, CATALOG_NAME

__all__ = ["CATALOG_COLUMNS", "CATALOG_NAME", "Source", "get_source"]

# A source takes the validated config and an empty folder, fills the folder with cutouts and
# returns the catalog (fetch writes it).
Source = Callable[[DictConfig, Path], pd.DataFrame]


def get_source(name: str) -> Source:
    if name == "mock":
        from pipeline.sources.mock import fetch_mock

        return fetch_mock
    if name == "folder":
        from pipeline.sources.folder import fetch_folder

        return fetch_folder
    if name == "sdss":
        from pipeline.sources.sdss import fetch_sdss

        return fetch_sdss
    raise KeyError(f"unknown data.source {name!r}")
