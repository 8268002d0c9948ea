"""Catalogs: reading users' CSVs with errors that name the line, and one galaxy, one row.

Every source writes ``catalog.csv`` into ``paths.raw`` with at least
:data:`pipeline.artifacts.CATALOG_COLUMNS` (``file`` relative to the raw folder). Users'
catalogs (the folder source, predict) are read by :func:`read_csv_catalog`, which turns an
empty file, a wrong encoding or a ragged row into one line naming the file, the line and what
would work, instead of a parser traceback.

The same galaxy twice (a repeated row, two rows whose images are the same bytes, or two
cutouts of one position on the sky) would land on both sides of the train/test split and
inflate every test metric, so :func:`drop_duplicate_galaxies` keeps one copy, or none when the
copies disagree on the label.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# Rows whose positions lie this close are one galaxy: SDSS positions repeat to ~0.1", and two
# galaxies closer than the ~1.4" seeing are one blend in its images anyway.
SAME_GALAXY_ARCSEC = 1.0
PLACEHOLDER_REPEATS = 3


class CatalogError(PipelineError, ValueError):
    """A catalog that cannot be used as configured; the message names file, line or column."""


def read_csv_catalog(path: Path, key: str, encoding: str = "utf-8",
                     encoding_key: str = "data.folder.encoding") -> pd.DataFrame:
    """A user's CSV as strings, every row checked to have the header's number of fields.

    ``key`` is the config key that named the file and ``encoding_key`` the one that sets its
    text encoding; errors name them. A UTF-8 byte-order mark (Excel) is allowed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CatalogError(f"{key} = {str(path)!r}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise CatalogError(f"{path}: the file is empty; a catalog needs a header row and one "
                           "row per galaxy")
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise CatalogError(
            f"{path}: byte 0x{raw[err.start]:02x} on line {line} is not valid {encoding}; if the "
            f"file was saved as Latin-1 or Windows-1252, set {encoding_key}=latin-1 (or "
            "cp1252), or save it as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        rows = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if len(row) != len(header):
                raise CatalogError(
                    f"{path}: line {reader.line_num} has {len(row)} fields but the header has "
                    f"{len(header)} {header[:8]}{' ...' if len(header) > 8 else ''}; quote "
                    "fields that contain commas, or fix the line")
            rows.append(row)
    except csv.Error as err:
        raise CatalogError(f"{path}: line {reader.line_num} is not valid CSV ({err})") from None
    header = [h.strip() for h in header]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise CatalogError(f"{path}: column name(s) {repeated} appear more than once in the "
                           "header")
    if not rows:
        raise CatalogError(f"{path}: the catalog has a header but no rows")
    return pd.DataFrame(rows, columns=header, dtype=str)


def image_paths(names, root: Path) -> list[Path]:
    """The image files a catalog column names: absolute paths as written, relative ones read
    from ``root`` (the catalog's own folder unless the config says otherwise)."""
    return [Path(n) if Path(n).is_absolute() else Path(root) / n for n in names]


def numeric_column(catalog: pd.DataFrame, column: str, path: Path, low: float, high: float,
                   unit: str) -> pd.Series:
    """``column`` as floats in [low, high]; an empty cell is NaN, anything else is an error
    that names the row (1-based, as a spreadsheet shows it, header excluded) and the value."""
    text = catalog[column].astype(str).str.strip()
    values = pd.to_numeric(text.where(text != ""), errors="coerce")
    bad = values.isna() & (text != "") | ~(values.isna() | values.between(low, high))
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise CatalogError(f"{path}: column {column!r}, row {row + 1}: {text.iloc[row]!r} is not "
                           f"a number in [{low:g}, {high:g}] {unit}")
    return values.astype(float)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: two rows with the same digest are the same image."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def drop_duplicate_galaxies(catalog: pd.DataFrame, root: Path) -> tuple[pd.DataFrame,
                                                                        pd.DataFrame]:
    """Keep one row per galaxy. Rows that share an ``objid``, whose files (under ``root``)
    have the same bytes, or whose ``ra``/``dec`` lie within :data:`SAME_GALAXY_ARCSEC` are one
    galaxy, and so is any chain of such links (rows without a position link by the others).

    A galaxy whose rows agree on the label keeps its first row; one whose rows disagree loses
    them all (the label is ambiguous). Returns the kept catalog and the dropped rows, each with
    the reason.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    root = Path(root)
    digests = [file_digest(root / f) if (root / f).is_file() else f"missing:{f}"
               for f in catalog["file"]]
    work = catalog.reset_index(drop=True)
    n = len(work)
    ids, n_ids = pd.factorize(work["objid"])[0], work["objid"].nunique()
    same_bytes = pd.factorize(pd.Series(digests))[0]
    # Rows, ids and digests as nodes of one graph; a galaxy is a connected component.
    near_a, near_b = same_position(work)
    edges = (np.r_[np.arange(n), np.arange(n), near_a],
             np.r_[n + ids, n + n_ids + same_bytes, near_b])
    size = n + n_ids + int(same_bytes.max(initial=-1)) + 1
    graph = coo_matrix((np.ones(len(edges[0])), edges), shape=(size, size))
    galaxy = connected_components(graph, directed=False)[1][:n]
    work = work.assign(_galaxy=galaxy)
    labels_per_galaxy = work.groupby("_galaxy")["label"].transform("nunique")
    first = ~work["_galaxy"].duplicated(keep="first")
    first_row = work.index.to_series().groupby(work["_galaxy"]).transform("first")
    conflict = labels_per_galaxy > 1
    repeat = ~first & ~conflict
    reason = pd.Series("", index=work.index)
    reason[conflict] = "the same galaxy (objid, image bytes or position) as another row " \
        "with a different label"
    reason[repeat] = [f"a copy of row {int(k) + 1} (same objid, image bytes or position within "
                      f'{SAME_GALAXY_ARCSEC:g}")' for k in first_row[repeat]]
    drop = conflict | repeat
    removed = work[drop].assign(reason=reason[drop])
    if len(removed):
        log.warning("dropped %d duplicate row(s) so that no galaxy sits on two sides of the "
                    "split: %d copies, %d rows of galaxies labelled two ways", len(removed),
                    int(repeat.sum()), int(conflict.sum()))
    columns = [*catalog.columns]
    return (work[~drop][columns].reset_index(drop=True),
            removed[[*columns, "reason"]].reset_index(drop=True))


def same_position(catalog: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows (indices into ``catalog``) whose ``ra``/``dec`` (degrees) lie within
    :data:`SAME_GALAXY_ARCSEC`; none where the catalog has no positions."""
    none = (np.zeros(0, dtype=int), np.zeros(0, dtype=int))
    if not {"ra", "dec"} <= set(catalog.columns):
        return none
    ra = pd.to_numeric(catalog["ra"], errors="coerce").to_numpy(dtype=float)
    dec = pd.to_numeric(catalog["dec"], errors="coerce").to_numpy(dtype=float)
    known = np.isfinite(ra) & np.isfinite(dec)
    # One position written verbatim on three rows or more is a placeholder (0, 0 for "not
    # known"), not one galaxy: such rows are matched by id and bytes only.
    positions = pd.DataFrame({"ra": ra, "dec": dec})
    repeats = positions.groupby(["ra", "dec"], dropna=False)["ra"].transform("size").to_numpy()
    placeholder = known & (repeats >= PLACEHOLDER_REPEATS)
    if placeholder.any():
        first = int(np.flatnonzero(placeholder)[0])
        log.warning("%d rows share a position written the same way (first: ra, dec = %s, %s on "
                    "row %d): taken as placeholders, not matched by position", placeholder.sum(),
                    catalog["ra"].iloc[first], catalog["dec"].iloc[first], first + 1)
    rows = np.flatnonzero(known & ~placeholder)
    if len(rows) < 2:
        return none
    import astropy.units as u
    from astropy.coordinates import SkyCoord, search_around_sky

    sky = SkyCoord(ra[rows] * u.deg, dec[rows] * u.deg)
    a, b, _, _ = search_around_sky(sky, sky, SAME_GALAXY_ARCSEC * u.arcsec)
    pair = a < b
    return rows[a[pair]], rows[b[pair]]


def galaxies_needed_per_class(val: float, test: float) -> int:
    """The fewest galaxies of a class that a stratified split with these held-out fractions can
    take: at least one for validation and one for test."""
    return max(3, math.ceil(2 / (val + test)))


def check_class_counts(catalog: pd.DataFrame, classes: list[str], val: float, test: float,
                       where: str, after: str = "") -> None:
    """A catalog with no galaxies, or a class too small to split, is an error that says so
    (``after`` ends the message, for example with what was left untouched)."""
    if catalog.empty:
        raise CatalogError(f"{where}: no galaxies left; nothing to prepare{after}")
    needed = galaxies_needed_per_class(val, test)
    counts = catalog["label"].value_counts().reindex(classes, fill_value=0)
    short = {c: int(n) for c, n in counts.items() if n < needed}
    if short:
        raise CatalogError(
            f"{where}: class count(s) {short} are below {needed}, the fewest a stratified "
            f"split with val + test = {val + test:.2f} can take (one galaxy each for "
            f"validation and test); get more galaxies, or drop the class from data.classes{after}")
