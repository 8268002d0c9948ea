"""Stage 1, fetch: fill ``paths.raw`` with cutouts and a catalog from the configured source.

The new ``paths.raw`` replaces the old one only when it is complete and usable: a fetch that
fails, keeps too few galaxies of a class to split, or loses more than
``data.max_bad_fraction`` of them leaves the previous ``paths.raw`` as it was. Repeated
galaxies are dropped here (``duplicates.csv`` lists them), so no galaxy reaches two splits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from pipeline.artifacts import (
    CATALOG_COLUMNS,
    CATALOG_NAME,
    DUPLICATES_NAME,
    FAILURES_NAME,
    FETCH_SUMMARY_NAME,
)
from pipeline.catalog import CatalogError, check_class_counts, drop_duplicate_galaxies
from pipeline.config import stage_main
from pipeline.io import atomic_path, atomic_write_json, refuse_overlap
from pipeline.sources import get_source

log = logging.getLogger(__name__)



def kept_failures_path(raw: Path) -> Path:
    """Where the list of failed galaxies goes when a fetch fails: beside ``paths.raw``, which
    is left as it was."""
    return raw.with_name(f"{raw.name}-{FAILURES_NAME}")


def check_failures(failures: pd.DataFrame, n_kept: int, cfg: DictConfig, raw: Path) -> None:
    """More than ``data.max_bad_fraction`` failed: keep the list beside ``paths.raw`` and stop."""
    attempted = n_kept + len(failures)
    if not len(failures) or len(failures) <= cfg.data.max_bad_fraction * attempted:
        return
    kept = kept_failures_path(raw)
    failures.to_csv(kept, index=False)
    raise CatalogError(
        f"{len(failures)} of {attempted} galaxies ({len(failures) / attempted:.1%}) could not "
        f"be used, more than data.max_bad_fraction = {cfg.data.max_bad_fraction}; all are "
        f"listed in {kept}; first: {failures.iloc[0]['reason']}. {raw} was left as it was")


def run(cfg: DictConfig) -> pd.DataFrame:
    """Fetch into a temporary folder and move it onto ``paths.raw`` only when complete."""
    raw = Path(cfg.paths.raw)
    source = get_source(cfg.data.source)
    refuse_overlap({"paths.raw": raw}, source.inputs(cfg.data))
    split = cfg.prepare.split
    with atomic_path(raw, signature=FETCH_SUMMARY_NAME, key="paths.raw") as tmp:
        tmp.mkdir(parents=True)
        catalog = source.fetch(cfg, tmp)
        missing = [c for c in CATALOG_COLUMNS if c not in catalog.columns]
        if missing:
            raise ValueError(f"source {cfg.data.source!r} returned a catalog without {missing}")
        failures_file = tmp / FAILURES_NAME
        failures = (pd.read_csv(failures_file, dtype=str) if failures_file.is_file()
                    else pd.DataFrame(columns=["objid", "reason"]))
        check_failures(failures, len(catalog), cfg, raw)
        catalog, duplicates = drop_duplicate_galaxies(catalog, tmp)
        for name in set(duplicates["file"]) - set(catalog["file"]):
            (tmp / name).unlink(missing_ok=True)
        duplicates.to_csv(tmp / DUPLICATES_NAME, index=False)
        check_class_counts(catalog, list(cfg.data.classes), split.val, split.test,
                           f"fetch from data.source = {cfg.data.source!r}",
                           f"; {raw} was left as it was")
        catalog.to_csv(tmp / CATALOG_NAME, index=False)
        counts = catalog["label"].value_counts().reindex(list(cfg.data.classes), fill_value=0)
        atomic_write_json(tmp / FETCH_SUMMARY_NAME, {
            "source": cfg.data.source,
            "n_galaxies": len(catalog),
            "per_class": {k: int(v) for k, v in counts.items()},
            "n_failed": len(failures),
            "n_duplicates_dropped": len(duplicates),
        })
    kept_failures_path(raw).unlink(missing_ok=True)  # a failed run's list is stale now
    log.info("fetched %d galaxies from %s into %s: %s", len(catalog), cfg.data.source, raw,
             {k: int(v) for k, v in counts.items()})
    return catalog


main = stage_main(run)

if __name__ == "__main__":
    main()
