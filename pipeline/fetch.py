"""Stage 1, fetch: fill ``paths.raw`` with cutouts and a catalog from the configured source."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from pipeline.config import stage_main
from pipeline.io import atomic_path, atomic_write_json
from pipeline.sources import CATALOG_COLUMNS, CATALOG_NAME, get_source

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> pd.DataFrame:
    """Fetch into a temporary folder and move it onto ``paths.raw`` only when complete."""
    raw = Path(cfg.paths.raw)
    source = get_source(cfg.data.source)
    with atomic_path(raw) as tmp:
        tmp.mkdir(parents=True)
        catalog = source(cfg, tmp)
        missing = [c for c in CATALOG_COLUMNS if c not in catalog.columns]
        if missing:
            raise ValueError(f"source {cfg.data.source!r} returned a catalog without {missing}")
        catalog.to_csv(tmp / CATALOG_NAME, index=False)
        counts = catalog["label"].value_counts().reindex(list(cfg.data.classes), fill_value=0)
        atomic_write_json(tmp / "fetch_summary.json", {
            "source": cfg.data.source,
            "n_galaxies": len(catalog),
            "per_class": {k: int(v) for k, v in counts.items()},
        })
    log.info("fetched %d galaxies from %s into %s: %s", len(catalog), cfg.data.source, raw,
             {k: int(v) for k, v in counts.items()})
    return catalog


main = stage_main(run)

if __name__ == "__main__":
    main()
