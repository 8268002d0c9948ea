"""A user's labelled image folder: a catalog CSV plus images (JPEG, PNG or FITS; any size).

The catalog names each image (relative paths resolve against the catalog's folder) and its raw
label; ``data.folder.label_map`` maps raw labels onto the model's classes (several raw labels
may share a class). Rows with unmapped labels are dropped and counted in the log. Images are
checked and copied into ``paths.raw/images`` under names derived from a sanitised id, so the
later stages see the same contract as from any other source.
"""

from __future__ import annotations

import codecs
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import MISSING, DictConfig
from tqdm import tqdm

from pipeline.catalog import CatalogError, image_paths, numeric_column, read_csv_catalog
from pipeline.errors import require
from pipeline.io import ImageError, ensure_free_space, image_kind, is_within, read_image
from pipeline.sources import SourceKind

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(value: object) -> str:
    """A file-name stem from a catalog value that cannot leave the folder it is written to."""
    name = _UNSAFE.sub("_", str(value)).strip("._")
    return name[:120] or "unnamed"


# The columns fetch writes for every galaxy; data.folder.keep_columns adds the user's own.
RAW_COLUMNS = ("objid", "ra", "dec", "label", "file", "raw_label", "source_file")


def read_user_catalog(fc: DictConfig) -> tuple[pd.DataFrame, Path]:
    path = Path(str(fc.catalog)).expanduser()
    catalog = read_csv_catalog(path, "data.folder.catalog", str(fc.encoding))
    needed = [c for c in (fc.image_column, fc.label_column, fc.id_column, fc.ra_column,
                          fc.dec_column, *fc.keep_columns) if c]
    missing = [c for c in needed if c not in catalog.columns]
    if missing:
        raise CatalogError(f"{path}: missing column(s) {missing} named in data.folder; the "
                           f"catalog has {list(catalog.columns)}")
    root = Path(str(fc.image_root)).expanduser() if fc.image_root else path.parent
    return catalog, root


def fetch_folder(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    """Check, map and copy the user's labelled images into ``out_dir``."""
    fc = cfg.data.folder
    catalog, root = read_user_catalog(fc)
    # Coordinates are checked on the catalog as the user wrote it, so errors name its rows.
    path = Path(str(fc.catalog))
    catalog["_ra"] = (numeric_column(catalog, fc.ra_column, path, 0, 360, "degrees")
                      if fc.ra_column else float("nan"))
    catalog["_dec"] = (numeric_column(catalog, fc.dec_column, path, -90, 90, "degrees")
                       if fc.dec_column else float("nan"))
    classes = list(cfg.data.classes)
    label_map = {str(k): str(v) for k, v in fc.label_map.items()} if fc.label_map else {
        c: c for c in classes}
    bad_targets = sorted(set(label_map.values()) - set(classes))
    if bad_targets:
        raise CatalogError(f"data.folder.label_map maps onto {bad_targets}, which are not in "
                           f"data.classes {classes}")
    raw_labels = catalog[fc.label_column].str.strip()  # "spiral " from a spreadsheet is spiral
    mapped = raw_labels.map(label_map)
    dropped = raw_labels[mapped.isna()].value_counts()
    if len(dropped):
        known = {k.lower(): k for k in label_map}
        near = {d: known[d.lower()] for d in dropped.index if d.lower() in known}
        log.warning("dropped %d galaxies whose label is not in data.folder.label_map: %s%s",
                    int(dropped.sum()), dropped.to_dict(),
                    f"; {near} differ from the map's labels only by case: add them to "
                    "data.folder.label_map if they are the same class" if near else "")
    catalog = catalog[mapped.notna()].assign(label=mapped[mapped.notna()])
    if catalog.empty:
        raise CatalogError(f"no galaxy left after mapping labels: data.folder.label_map covers "
                           f"none of the labels {sorted(raw_labels.unique())[:20]}")

    sources = image_paths(catalog[fc.image_column], root)
    raw = Path(cfg.paths.raw)
    inside = next((s for s in sources if is_within(s, raw)), None)
    if inside is not None:
        raise CatalogError(f"{fc.catalog}: image {str(inside)!r} lies inside paths.raw = "
                           f"{str(raw)!r}, which fetch replaces; move the images out of it")
    ensure_free_space(out_dir, sum(s.stat().st_size for s in sources if s.is_file()),
                      f"copying {len(sources)} images")

    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows, failures, names = [], [], set()
    # Extra columns travel into data/raw/catalog.csv as written, e.g. a radius for prepare.
    kept = [c for c in fc.keep_columns if c not in RAW_COLUMNS]
    records = catalog.to_dict("records")
    for i, (row, source) in enumerate(tqdm(list(zip(records, sources, strict=True)),
                                           desc="check images", unit="img")):
        given = row[fc.image_column]
        # The catalog's own id; repeated ids stay equal so that fetch finds the duplicates.
        objid = str(row[fc.id_column]).strip() if fc.id_column else f"row{i:07d}"
        try:
            suffix = "".join(source.suffixes[-2:]) if image_kind(source) == "flux" and \
                source.name.lower().endswith(".gz") else source.suffix.lower()
            read_image(source, max_pixels=int(cfg.data.max_image_pixels))
        except ImageError as err:
            failures.append({"objid": objid, "file": given, "reason": str(err)})
            continue
        stem = safe_name(objid)
        name = f"{stem}{suffix}" if f"{stem}{suffix}" not in names else f"{stem}_{i}{suffix}"
        names.add(name)
        shutil.copyfile(source, images_dir / name)
        rows.append({
            "objid": objid,
            "ra": row["_ra"],
            "dec": row["_dec"],
            "label": row["label"],
            "file": f"images/{name}",
            "raw_label": row[fc.label_column],
            "source_file": given,
            **{column: row[column] for column in kept},
        })
    pd.DataFrame(failures, columns=["objid", "file", "reason"]).to_csv(
        out_dir / "failures.csv", index=False)
    if failures:
        log.warning("%d of %d images could not be used; listed in failures.csv. First: %s",
                    len(failures), len(catalog), failures[0]["reason"])
    return pd.DataFrame(rows, columns=[*RAW_COLUMNS, *kept])


# --------------------------------------------------------------------------- the source
@dataclass
class FolderConfig:
    """``data.folder`` (values and their reasons: ``conf/data/folder.yaml``)."""

    catalog: str | None = MISSING
    image_column: str = MISSING
    label_column: str = MISSING
    id_column: str | None = MISSING
    ra_column: str | None = MISSING
    dec_column: str | None = MISSING
    image_root: str | None = MISSING
    encoding: str = MISSING
    label_map: dict[str, str] | None = MISSING
    credit: str | None = MISSING
    keep_columns: list[str] = field(default_factory=list)


def validate(data: DictConfig) -> None:
    fc = data.folder
    require(bool(fc.catalog), "data.folder.catalog", fc.catalog,
            "the path to a catalog CSV (image path and label columns)")
    require(bool(fc.image_column) and bool(fc.label_column), "data.folder.image_column",
            fc.image_column, "the names of the catalog's image and label columns")
    try:
        codecs.lookup(str(fc.encoding))
    except LookupError:
        require(False, "data.folder.encoding", fc.encoding,
                "a Python text encoding such as utf-8, latin-1 or cp1252")


def describe(data: DictConfig) -> str:
    text = f"labelled image folder, catalog `{data.folder.catalog}`"
    return text + (f"; credit: {data.folder.credit}" if data.folder.credit else "")


def inputs(data: DictConfig) -> dict[str, str | None]:
    return {"data.folder.catalog": data.folder.catalog,
            "data.folder.image_root": data.folder.image_root}


SOURCE = SourceKind("folder", FolderConfig, fetch_folder, validate, describe, inputs)
