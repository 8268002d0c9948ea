"""Real SDSS galaxies with Galaxy Zoo labels, fetched as an astronomer would, at scale.

1. Labels: one SQL query per class through astroquery (``SDSS.query_sql``) against the CAS
   table of Galaxy Zoo 1 (``zooSpec``: debiased elliptical / combined-spiral vote fractions and
   the edge-on fraction) or Galaxy Zoo 2 (``zoo2MainSpecz``: ``gz2_class`` and debiased task
   fractions), joined to ``PhotoObj`` for the Petrosian radius and the frame identifiers. The
   SQL is assembled only from validated numbers and from table and column names this module
   knows; no config text reaches it. A seeded random sample of the candidates is kept.
2. Images, downloaded with bounded concurrency, a per-request timeout, retries with backoff,
   a size cap, validation before a file counts, and atomic writes into a persistent cache, so a
   re-run fetches only what is missing:

   * ``jpeg``: colour cutouts from the SkyServer ImgCutout service (what volunteers saw), at a
     fixed arcsec/pixel or scaled to each galaxy's Petrosian radius;
   * ``fits``: calibrated g, r, i frames from the SAS (the URLs astroquery's ``get_images``
     uses), cut around each galaxy with astropy ``Cutout2D`` and the frame's WCS; one frame
     download serves every galaxy on it.

Galaxies that still fail go to ``failures.csv`` with the reason; none is dropped silently.
"""

from __future__ import annotations

import bz2
import contextlib
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import requests
from omegaconf import MISSING, DictConfig
from tqdm import tqdm

from pipeline.errors import PipelineError, require, within
from pipeline.io import ImageError, remove_stale_temps
from pipeline.sources import SourceKind

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
BANDS = ("g", "r", "i")
PART_PREFIX = ".part."  # downloads in progress: .part.<pid>.<name>
FRAME_URL = ("{base}/dr{dr}/{instrument}/photoObj/frames/{rerun}/{run}/{camcol}/"
             "frame-{band}-{run:06d}-{camcol}-{field:04d}.fits.bz2")


class SdssError(PipelineError, RuntimeError):
    """The archive could not give what was asked; the message says which request and why."""


# --------------------------------------------------------------------------- labels (SQL)
@dataclass(frozen=True)
class LabelTable:
    """A Galaxy Zoo table in the CAS and how each class is selected from it."""

    table: str
    id_column: str
    vote_columns: tuple[str, ...]
    class_conditions: dict[str, str]  # class -> SQL condition with a {threshold} slot


GALAXY_ZOO = {
    "gz1": LabelTable(
        table="zooSpec",
        id_column="objid",
        vote_columns=("p_el_debiased", "p_cs_debiased", "p_cw", "p_acw", "p_edge", "p_mg",
                      "p_dk", "nvote"),
        class_conditions={
            "elliptical": "z.p_el_debiased >= {threshold}",
            "spiral": "(z.p_cw + z.p_acw) >= {threshold}",
            "edge_on": "z.p_edge >= {threshold}",
            "merger": "z.p_mg >= {threshold}",
        }),
    "gz2": LabelTable(
        table="zoo2MainSpecz",
        id_column="dr7objid",
        vote_columns=("gz2_class", "total_votes",
                      "t01_smooth_or_features_a01_smooth_debiased",
                      "t01_smooth_or_features_a02_features_or_disk_debiased",
                      "t02_edgeon_a04_yes_debiased", "t04_spiral_a08_spiral_debiased"),
        class_conditions={
            "elliptical": "z.gz2_class LIKE 'E%' AND "
                          "z.t01_smooth_or_features_a01_smooth_debiased >= {threshold}",
            "spiral": "z.gz2_class LIKE 'S%' AND z.gz2_class NOT LIKE 'Se%' AND "
                      "z.t04_spiral_a08_spiral_debiased >= {threshold}",
            "edge_on": "z.gz2_class LIKE 'Se%' AND "
                       "z.t02_edgeon_a04_yes_debiased >= {threshold}",
        }),
}


def label_query(catalog: str, label: str, threshold: float, limit: int) -> str:
    """The SQL for one class; every interpolated value is a validated number or a known name."""
    if catalog not in GALAXY_ZOO:
        raise ValueError(f"data.sdss.catalog = {catalog!r}: one of {sorted(GALAXY_ZOO)}")
    spec = GALAXY_ZOO[catalog]
    if label not in spec.class_conditions:
        raise ValueError(f"class {label!r} cannot be selected from {spec.table}; it knows "
                         f"{sorted(spec.class_conditions)}")
    threshold, limit = float(threshold), int(limit)
    if not (0.0 <= threshold <= 1.0) or limit < 1:
        raise ValueError(f"threshold {threshold} must lie in [0, 1] and limit {limit} be >= 1")
    votes = ", ".join(f"z.{c}" for c in spec.vote_columns)
    condition = spec.class_conditions[label].format(threshold=repr(threshold))
    return (f"SELECT TOP {limit} z.{spec.id_column} AS objid, p.ra, p.dec, {votes}, "
            "p.petroR90_r, p.run, p.rerun, p.camcol, p.field "
            f"FROM {spec.table} AS z JOIN PhotoObj AS p ON p.objid = z.{spec.id_column} "
            f"WHERE {condition} ORDER BY z.{spec.id_column}")


@contextlib.contextmanager
def astroquery_pointed_at(sc: DictConfig) -> Iterator[None]:
    """Point astroquery at the configured services (a mirror, or a server on 127.0.0.1), with
    ``data.sdss.timeout_s`` as a deadline for each whole reply."""
    from astroquery.sdss import SDSS, conf

    session = SDSS._session  # astroquery's requests.Session: its replies get our deadline
    saved = dict(session.adapters)
    adapter = DeadlineAdapter(float(sc.timeout_s), int(sc.max_bytes))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    try:
        with conf.set_temp("skyserver_baseurl", str(sc.skyserver_url).rstrip("/")), \
                conf.set_temp("sas_baseurl", str(sc.sas_url).rstrip("/")), \
                conf.set_temp("timeout", max(1, math.ceil(float(sc.timeout_s)))):
            yield
    finally:
        session.adapters.clear()
        session.adapters.update(saved)


@dataclass(frozen=True)
class CasColumns:
    """What a CAS query asks for: every column, the integer ones, the text ones."""

    names: tuple[str, ...]
    integers: tuple[str, ...] = ("objid", "run", "rerun", "camcol", "field")
    texts: tuple[str, ...] = ()


def label_columns(spec: LabelTable) -> CasColumns:
    """The columns :func:`label_query` asks for."""
    return CasColumns(("objid", "ra", "dec", *spec.vote_columns, "petroR90_r", "run", "rerun",
                       "camcol", "field"), texts=("gz2_class",))


def parse_cas_reply(text: str, asked: CasColumns, limit: int, what: str) -> pd.DataFrame:
    """The CSV the CAS sent for a query, checked against what the query asked for:
    its columns, integer ids and frame numbers, numeric votes, finite ra/dec in range.

    A reply that is not what it claims (an HTML page with status 200, an error text, a CSV
    missing columns or with text where numbers belong) is an error that names the row and
    shows what came back.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SdssError(f"{what}: SkyServer sent an empty reply")
    first = lines[0].strip()[:160]
    head = text[:2000].lower()
    if first.startswith("<") or "<html" in head or "error_message" in head:
        raise SdssError(f"{what}: SkyServer sent an HTML page or an error instead of CSV; it "
                        f"begins {first!r}")
    try:
        df = pd.read_csv(io.StringIO(text), comment="#", dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as err:
        raise SdssError(f"{what}: the reply is not valid CSV ({str(err).strip()}); it begins "
                        f"{first!r}") from None
    df.columns = [str(c).strip() for c in df.columns]
    columns, integers, texts = asked.names, asked.integers, asked.texts
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SdssError(f"{what}: the reply lacks column(s) {missing} that the query asked for; "
                        f"it has {list(df.columns)[:20]} and begins {first!r}")
    if len(df) > limit:
        raise SdssError(f"{what}: the reply has {len(df)} rows, more than the TOP {limit} asked")

    sent = df.copy()  # the text as it came, for messages

    def refuse_rows(bad: pd.Series, column: str, valid: str) -> None:
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise SdssError(f"{what}: row {row + 1}, column {column!r} = "
                            f"{sent[column].iloc[row]!r} is not {valid}")

    for column in columns:
        if column in texts:
            continue
        cells = df[column].str.strip()
        if column in integers:
            refuse_rows(~cells.str.fullmatch(r"-?\d+"), column, "an integer")
            df[column] = [int(v) for v in cells]
            continue
        values = pd.to_numeric(cells, errors="coerce")
        refuse_rows(values.isna(), column, "a number")
        df[column] = values.astype(float)
    refuse_rows(df["objid"] <= 0, "objid", "a positive integer")
    refuse_rows(~df["ra"].between(0, 360), "ra", "a right ascension in [0, 360] degrees")
    refuse_rows(~df["dec"].between(-90, 90), "dec", "a declination in [-90, 90] degrees")
    df["objid"] = df["objid"].astype(str)
    return df


def run_sql(sc: DictConfig, sql: str, what: str) -> str:
    """The CAS's raw reply to ``sql``: ``SDSS.query_sql_async`` (what astroquery's
    ``query_sql`` wraps) with our deadline and retries, to be checked by the caller."""
    from astroquery.sdss import SDSS

    def ask() -> str:
        response = SDSS.query_sql_async(sql, data_release=int(sc.data_release),
                                        timeout=float(sc.timeout_s), cache=False)
        response.raise_for_status()
        return response.text

    with astroquery_pointed_at(sc):
        return with_retries(ask, sc, what)


def query_labels(cfg: DictConfig) -> tuple[pd.DataFrame, list[str]]:
    """Candidates of every class from the CAS, then a seeded sample of ``n_per_class`` each.

    The raw reply (:func:`run_sql`) is checked (:func:`parse_cas_reply`) instead of trusted.
    """
    sc = cfg.data.sdss
    spec = GALAXY_ZOO[sc.catalog]
    rng = np.random.default_rng(int(cfg.seed))
    frames, queries = [], []
    for label in cfg.data.classes:
        sql = label_query(sc.catalog, label, sc.vote_threshold, sc.candidates_per_class)
        queries.append(sql)
        what = f"the {sc.catalog} SQL query for class {label!r}"
        df = parse_cas_reply(run_sql(sc, sql, what), label_columns(spec),
                             int(sc.candidates_per_class), what)
        if df.empty:
            raise SdssError(f"{what} returned no galaxies; lower data.sdss.vote_threshold "
                            f"({sc.vote_threshold}) or drop the class from data.classes")
        keep = min(len(df), int(sc.n_per_class))
        if keep < sc.n_per_class:
            log.warning("class %s: only %d candidates for n_per_class=%d", label, len(df),
                        sc.n_per_class)
        df = df.iloc[np.sort(rng.choice(len(df), size=keep, replace=False))]
        frames.append(df.assign(label=label))
    catalog = pd.concat(frames, ignore_index=True)
    dupes = catalog["objid"].duplicated(keep=False)
    if dupes.any():  # a galaxy voted into two classes at a low threshold is ambiguous: drop it
        log.warning("dropping %d galaxies selected for more than one class",
                    int(dupes.sum()))
        catalog = catalog[~dupes].reset_index(drop=True)
    return catalog, queries


CONE_COLUMNS = CasColumns(("objid", "ra", "dec", "petroR90_r", "petroMag_r", "run", "rerun",
                           "camcol", "field"))


def cone_query(ra: float, dec: float, radius_arcmin: float, mag_limit: float, limit: int) -> str:
    """The SQL for the galaxies (``Galaxy``, SDSS's photometric galaxy view) within
    ``radius_arcmin`` of (ra, dec) brighter than ``mag_limit`` in r (Petrosian), nearest first.
    Every interpolated value is a checked number."""
    ra, dec, radius, mag, limit = (float(ra), float(dec), float(radius_arcmin),
                                   float(mag_limit), int(limit))
    if not (0 <= ra <= 360 and -90 <= dec <= 90 and 0 < radius <= 600 and 5 <= mag <= 30
            and limit >= 1) or not all(map(math.isfinite, (ra, dec, radius, mag))):
        raise ValueError(f"cone ({ra}, {dec}, {radius}, {mag}, {limit}) is out of range")
    return (f"SELECT TOP {limit} p.objid, p.ra, p.dec, p.petroR90_r, p.petroMag_r, p.run, "
            f"p.rerun, p.camcol, p.field FROM dbo.fGetNearbyObjEq({ra!r}, {dec!r}, {radius!r}) "
            f"AS n JOIN Galaxy AS p ON p.objid = n.objid WHERE p.petroMag_r < {mag!r} "
            "ORDER BY n.distance")


def query_cone(sc: DictConfig, ra: float, dec: float, radius_arcmin: float, mag_limit: float,
               limit: int) -> pd.DataFrame:
    """The galaxies of a cone on the sky, from the CAS through astroquery, checked."""
    sql = cone_query(ra, dec, radius_arcmin, mag_limit, limit)
    what = f"the SQL query for galaxies within {radius_arcmin}' of ({ra}, {dec})"

    return parse_cas_reply(run_sql(sc, sql, what), CONE_COLUMNS, limit, what)


# --------------------------------------------------------------------------- HTTP
def with_retries(call: Callable, sc: DictConfig, what: str):
    """Run ``call``; retry timeouts, connection errors and retryable HTTP codes with backoff."""
    delay = float(sc.backoff_s)
    for attempt in range(int(sc.retries) + 1):
        try:
            return call()
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else None
            if status not in RETRY_STATUS or attempt == sc.retries:
                raise SdssError(f"{what}: HTTP {status} after {attempt + 1} attempt(s)") from err
        except (requests.Timeout, requests.ConnectionError,
                requests.exceptions.ChunkedEncodingError) as err:  # the last: a truncated body
            if attempt == sc.retries:
                raise SdssError(f"{what}: {type(err).__name__} after {attempt + 1} "
                                f"attempt(s){_unreachable_hint(err, sc)}") from err
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


def _unreachable_hint(err: requests.RequestException, sc: DictConfig) -> str:
    """Where the request went and what the user can change: a timeout asks for patience,
    anything else for the network or a mirror."""
    url = getattr(err.request, "url", None) or ""
    host = requests.utils.urlparse(url).netloc or "the archive"
    if isinstance(err, requests.Timeout):
        return (f" from {host} (timeout_s = {sc.timeout_s:g}); the archive may be busy: raise "
                "timeout_s or retries, or try later")
    return (f" to {host}; check this machine's network, or set skyserver_url / sas_url (under "
            "data.sdss, or region.sdss for predict) to a mirror that answers")


class DeadlineAdapter(requests.adapters.HTTPAdapter):
    """Reads each reply whole within ``deadline_s`` of sending the request, and refuses one
    larger than ``max_bytes``.

    requests' own timeout bounds each read, so a server that trickles a byte at a time could
    hold a request for ever; this bounds the whole request, for our downloads and
    astroquery's queries alike.
    """

    def __init__(self, deadline_s: float, max_bytes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.deadline_s, self.max_bytes = deadline_s, max_bytes

    def send(self, request, stream=False, timeout=None, **kwargs):
        start = time.monotonic()
        response = super().send(request, stream=True, timeout=timeout, **kwargs)
        if stream:
            return response
        try:
            body = self._read_body(response.raw, start, request)
        finally:
            response.close()
        # The body, read: what requests' own non-streaming send stores (as requests-cache and
        # betamax do for replies they replay).
        response._content = body
        return response

    def _read_body(self, raw, start: float, request: requests.PreparedRequest) -> bytes:
        """Read as bytes arrive (``read1``: a trickle cannot hold one read open), checking the
        deadline and the size cap after each piece."""
        import urllib3

        read = getattr(raw, "read1", raw.read)  # read1: urllib3 >= 2.3
        url = request.url
        chunks, size = [], 0
        try:
            while chunk := read(65536, decode_content=True):
                size += len(chunk)
                if size > self.max_bytes:
                    raise SdssError(f"{url}: reply larger than data.sdss.max_bytes = "
                                    f"{self.max_bytes}")
                if time.monotonic() - start > self.deadline_s:
                    raise requests.Timeout(f"{url}: no complete reply within "
                                           f"data.sdss.timeout_s = {self.deadline_s} s",
                                           request=request)
                chunks.append(chunk)
        except urllib3.exceptions.ReadTimeoutError as err:
            raise requests.Timeout(str(err), request=request) from err
        except urllib3.exceptions.ProtocolError as err:  # a truncated body, as requests says it
            raise requests.exceptions.ChunkedEncodingError(str(err), request=request) from err
        return b"".join(chunks)


def http_session(sc: DictConfig) -> requests.Session:
    """A requests session for ``concurrency`` parallel downloads, each within the deadline."""
    session = requests.Session()
    adapter = DeadlineAdapter(float(sc.timeout_s), int(sc.max_bytes),
                               pool_maxsize=int(sc.concurrency))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def download(session, url: str, sc: DictConfig, what: str) -> bytes:
    """GET ``url`` with the configured deadline, retries and size cap."""
    def get() -> bytes:
        response = session.get(url, timeout=float(sc.timeout_s))
        response.raise_for_status()
        return response.content

    return with_retries(get, sc, what)


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside ``path``, then rename; the temporary carries the pid so that a killed
    run's leftovers are recognised and removed (:func:`pipeline.io.remove_stale_temps`)."""
    tmp = path.with_name(f"{PART_PREFIX}{os.getpid()}.{path.name}")
    tmp.write_bytes(data)
    tmp.replace(path)


# --------------------------------------------------------------------------- JPEG cutouts
def cutout_url(sc: DictConfig, ra: float, dec: float, petro_r90: float | None) -> str:
    scale = float(sc.jpeg.scale)
    # SDSS writes -9999 where it has no radius: such a galaxy gets the fixed scale.
    if sc.jpeg.scale_mode == "petrosian" and petro_r90 and np.isfinite(petro_r90) \
            and petro_r90 > 0:
        # The galaxy's Petrosian R90 spans a fixed fraction of the cutout, as in Galaxy Zoo.
        scale = float(np.clip(sc.jpeg.petrosian_factor * petro_r90 / sc.jpeg.size,
                              sc.jpeg.min_scale, sc.jpeg.max_scale))
    base = str(sc.skyserver_url).rstrip("/")
    return (f"{base}/dr{int(sc.data_release)}/SkyServerWS/ImgCutout/getjpeg?"
            f"ra={ra:.6f}&dec={dec:.6f}&scale={scale:.4f}&width={int(sc.jpeg.size)}"
            f"&height={int(sc.jpeg.size)}")


def check_jpeg(data: bytes, size: int, what: str) -> None:
    """The bytes must decode as an RGB JPEG of the requested size."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                raise ImageError(f"{what}: not a JPEG (got {img.format})")
            img.load()
            shape = img.size
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"{what}: corrupt JPEG ({type(err).__name__}: {err})") from None
    if shape != (size, size):
        raise ImageError(f"{what}: JPEG is {shape[0]}x{shape[1]}, expected {size}x{size}")


def fetch_jpegs(catalog: pd.DataFrame, cfg: DictConfig, cache: Path
                ) -> tuple[dict[str, Path], list[dict], dict[str, str]]:
    """Download every galaxy's cutout into ``cache`` (skipping valid ones already there)."""
    sc = cfg.data.sdss
    cache.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(cache, PART_PREFIX)
    done, failures, urls = {}, [], {}
    todo = []
    for row in catalog.itertuples():
        url = cutout_url(sc, row.ra, row.dec, getattr(row, "petroR90_r", None))
        urls[row.objid] = url
        path = cache / f"{row.objid}.jpeg"
        if path.is_file():
            try:
                check_jpeg(path.read_bytes(), int(sc.jpeg.size), str(path))
                done[row.objid] = path
                continue
            except ImageError:
                path.unlink()
        todo.append((row.objid, url, path))
    if len(done):
        log.info("%d cutouts already in %s; fetching the other %d", len(done), cache, len(todo))

    session = http_session(sc)

    def one(objid: str, url: str, path: Path) -> Path:
        what = f"galaxy {objid} ({url})"
        for attempt in range(int(sc.retries) + 1):
            data = download(session, url, sc, what)
            try:
                check_jpeg(data, int(sc.jpeg.size), what)
                break
            except ImageError:
                if attempt == sc.retries:  # a corrupt body may be a broken transfer: retry it
                    raise
        write_atomic(path, data)
        return path

    with ThreadPoolExecutor(max_workers=int(sc.concurrency)) as pool, \
            tqdm(total=len(todo), desc="download cutouts", unit="img") as bar:
        futures = {pool.submit(one, *job): job for job in todo}
        for future in as_completed(futures):
            objid, url, _ = futures[future]
            try:
                done[objid] = future.result()
            except (SdssError, ImageError) as err:
                failures.append({"objid": objid, "url": url, "reason": str(err)})
            bar.update()
    return done, failures, urls


# --------------------------------------------------------------------------- FITS frames
def frame_urls(sc: DictConfig, run: int, rerun: int, camcol: int, field: int) -> dict[str, str]:
    dr = int(sc.data_release)
    instrument = "boss" if dr <= 12 else ("eboss" if dr <= 17 else
                                          "prior-surveys/sdss4-dr17-eboss")
    base = str(sc.sas_url).rstrip("/")
    return {b: FRAME_URL.format(base=base, dr=dr, instrument=instrument, rerun=rerun, run=run,
                                camcol=camcol, field=field, band=b) for b in BANDS}


def read_frame(data: bytes, what: str):
    """A (bz2-compressed) SDSS frame: its image and WCS."""
    from astropy.io import fits
    from astropy.wcs import WCS

    try:
        raw = bz2.decompress(data) if data[:3] == b"BZh" else data
        with fits.open(io.BytesIO(raw), memmap=False) as hdul:
            image = np.asarray(hdul[0].data, dtype=np.float32)
            wcs = WCS(hdul[0].header)
    except Exception as err:
        raise ImageError(f"{what}: corrupt FITS frame ({type(err).__name__}: {err})") from None
    if image.ndim != 2 or not wcs.has_celestial:
        raise ImageError(f"{what}: not a 2-d image with a celestial WCS")
    return image, wcs


def fetch_fits(catalog: pd.DataFrame, cfg: DictConfig, cache: Path, out_images: Path
               ) -> tuple[dict[str, Path], list[dict], dict[str, str]]:
    """Download each field's g, r, i frames once and cut every galaxy on it."""
    from astropy.coordinates import SkyCoord
    from astropy.nddata import Cutout2D

    from pipeline.sources.mock import write_cutout

    sc = cfg.data.sdss
    size = int(sc.fits.size)
    cache.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(cache, PART_PREFIX)
    session = http_session(sc)
    done, failures, urls = {}, [], {}
    fields = catalog.groupby(["run", "rerun", "camcol", "field"])

    def one_field(key) -> dict[str, tuple]:
        frames = {}
        for band, url in frame_urls(sc, *map(int, key)).items():
            path = cache / Path(url).name
            if path.is_file():
                try:
                    frames[band] = read_frame(path.read_bytes(), str(path))
                    continue
                except ImageError:  # damaged in the cache: fetch it again
                    path.unlink()
            write_atomic(path, download(session, url, sc, f"frame {url}"))
            frames[band] = read_frame(path.read_bytes(), str(path))
        return frames

    with ThreadPoolExecutor(max_workers=int(sc.concurrency)) as pool, \
            tqdm(total=len(catalog), desc="cut FITS frames", unit="gal") as bar:
        futures = {pool.submit(one_field, key): (key, rows) for key, rows in fields}
        for future in as_completed(futures):
            key, rows = futures[future]
            url = frame_urls(sc, *map(int, key))["r"]
            try:
                frames = future.result()
            except (SdssError, ImageError) as err:
                failures += [{"objid": o, "url": url, "reason": str(err)} for o in rows.objid]
                bar.update(len(rows))
                continue
            for row in rows.itertuples():
                urls[row.objid] = url
                position = SkyCoord(row.ra, row.dec, unit="deg")
                try:
                    planes = [Cutout2D(frames[b][0], position, size, wcs=frames[b][1],
                                       mode="strict") for b in BANDS]
                except Exception as err:  # off the frame's edge
                    failures.append({"objid": row.objid, "url": url,
                                     "reason": f"cutout off the frame: {err}"})
                    continue
                path = out_images / f"{row.objid}.fits"
                write_cutout(path, np.stack([p.data for p in planes]), planes[1].wcs,
                             {"OBJID": row.objid, "LABEL": row.label, "ORIGIN": "SDSS"})
                done[row.objid] = path
            bar.update(len(rows))
    return done, failures, urls


# --------------------------------------------------------------------------- the source
def fetch_sdss(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    sc = cfg.data.sdss
    catalog, queries = query_labels(cfg)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    cache = Path(sc.cache_dir) / f"dr{int(sc.data_release)}" / sc.image_type
    if sc.image_type == "jpeg":
        done, failures, urls = fetch_jpegs(catalog, cfg, cache)
        for path in done.values():
            (images / path.name).write_bytes(path.read_bytes())
        suffix = ".jpeg"
    else:
        done, failures, urls = fetch_fits(catalog, cfg, cache, images)
        suffix = ".fits"
    pd.DataFrame(failures, columns=["objid", "url", "reason"]).to_csv(
        out_dir / "failures.csv", index=False)
    (out_dir / "queries.sql").write_text(";\n\n".join(queries) + ";\n")
    if failures:
        log.warning("%d of %d galaxies failed; listed in failures.csv. First: %s",
                    len(failures), len(catalog), failures[0]["reason"])
    catalog = catalog[catalog["objid"].isin(done)].copy()
    catalog["file"] = [f"images/{o}{suffix}" for o in catalog["objid"]]
    catalog["url"] = catalog["objid"].map(urls)
    catalog["data_release"] = int(sc.data_release)
    first = ["objid", "ra", "dec", "label", "file", "url"]
    return catalog[first + [c for c in catalog.columns if c not in first]].reset_index(drop=True)


# --------------------------------------------------------------------------- the source
@dataclass
class SdssJpegConfig:
    size: int = MISSING
    scale_mode: str = MISSING
    scale: float = MISSING
    petrosian_factor: float = MISSING
    min_scale: float = MISSING
    max_scale: float = MISSING


@dataclass
class SdssFitsConfig:
    size: int = MISSING


@dataclass
class ArchiveConfig:
    """How SkyServer is asked and its cutouts framed: ``data.sdss`` for fetch, and
    ``region.sdss`` for predict's patches of sky."""

    data_release: int = MISSING
    skyserver_url: str = MISSING
    sas_url: str = MISSING
    timeout_s: float = MISSING
    retries: int = MISSING
    backoff_s: float = MISSING
    concurrency: int = MISSING
    max_bytes: int = MISSING
    cache_dir: str = MISSING
    jpeg: SdssJpegConfig = field(default_factory=SdssJpegConfig)


@dataclass
class SdssConfig(ArchiveConfig):
    """``data.sdss`` (values and their reasons: ``conf/data/sdss.yaml``)."""

    catalog: str = MISSING
    vote_threshold: float = MISSING
    n_per_class: int = MISSING
    candidates_per_class: int = MISSING
    image_type: str = MISSING
    fits: SdssFitsConfig = field(default_factory=SdssFitsConfig)


def validate_archive(s: DictConfig, key: str) -> None:
    """The keys every SkyServer request is built from; ``key`` is where they are set."""
    require(8 <= s.data_release <= 19, f"{key}.data_release", s.data_release,
            "an SDSS data release from 8 to 19")
    for name in ("skyserver_url", "sas_url"):
        url = str(s[name])
        require(url.startswith(("http://", "https://")) and " " not in url,
                f"{key}.{name}", url, "an http(s) URL")
    require(within(s.timeout_s, 0.01, 3600), f"{key}.timeout_s", s.timeout_s,
            "seconds in (0, 3600] for each whole request")
    require(0 <= s.retries <= 20, f"{key}.retries", s.retries, "an integer in [0, 20]")
    require(within(s.backoff_s, 0, 600), f"{key}.backoff_s", s.backoff_s,
            "seconds in [0, 600]")
    require(1 <= s.concurrency <= 64, f"{key}.concurrency", s.concurrency,
            "1 to 64 requests at once (be polite to the archive)")
    require(1024 <= s.max_bytes <= 2**31, f"{key}.max_bytes", s.max_bytes,
            "bytes in [1024, 2**31]")
    require(bool(str(s.cache_dir).strip()), f"{key}.cache_dir", s.cache_dir,
            "a folder for downloads")
    j = s.jpeg
    require(16 <= j.size <= 2048, f"{key}.jpeg.size", j.size, "16 to 2048 pixels")
    require(j.scale_mode in ("fixed", "petrosian"), f"{key}.jpeg.scale_mode",
            j.scale_mode, "'fixed' or 'petrosian'")
    require(within(j.min_scale, 0.01, 100) and within(j.max_scale, j.min_scale, 100),
            f"{key}.jpeg.min_scale", j.min_scale,
            "arcsec/pixel with 0.01 <= min_scale <= max_scale <= 100")
    require(within(j.scale, j.min_scale, j.max_scale) or j.scale_mode == "petrosian",
            f"{key}.jpeg.scale", j.scale, "arcsec/pixel within [min_scale, max_scale]")
    require(within(j.petrosian_factor, 0.1, 100), f"{key}.jpeg.petrosian_factor",
            j.petrosian_factor, "cutout widths in Petrosian R90 radii, in [0.1, 100]")


def validate(d: DictConfig) -> None:
    """Everything that reaches SQL or a URL is a checked number or a known name."""
    s = d.sdss
    require(s.catalog in GALAXY_ZOO, "data.sdss.catalog", s.catalog,
            f"one of {sorted(GALAXY_ZOO)}")
    known = sorted(GALAXY_ZOO[s.catalog].class_conditions)
    unknown = [c for c in d.classes if c not in known]
    require(not unknown, "data.classes", list(d.classes),
            f"classes that {s.catalog} can select: {known}")
    require(0 <= s.vote_threshold <= 1, "data.sdss.vote_threshold", s.vote_threshold,
            "a vote fraction in [0, 1]")
    require(1 <= s.n_per_class <= 500_000, "data.sdss.n_per_class", s.n_per_class,
            "an integer in [1, 500000]")
    require(s.n_per_class <= s.candidates_per_class <= 500_000,
            "data.sdss.candidates_per_class", s.candidates_per_class,
            f"an integer from data.sdss.n_per_class ({s.n_per_class}) to 500000 (the CAS "
            "returns at most 500,000 rows)")
    require(s.image_type in ("jpeg", "fits"), "data.sdss.image_type", s.image_type,
            "'jpeg' or 'fits'")
    validate_archive(s, "data.sdss")
    require(8 <= s.fits.size <= 1024, "data.sdss.fits.size", s.fits.size, "8 to 1024 pixels")


LABEL_CREDITS = {"gz1": "Galaxy Zoo 1 (Lintott et al. 2008, 2011)",
                 "gz2": "Galaxy Zoo 2 (Willett et al. 2013)"}


def describe(data: DictConfig) -> str:
    sd = data.sdss
    return (f"SDSS DR{sd.data_release} {sd.image_type} cutouts fetched with astroquery, "
            f"labels from {LABEL_CREDITS.get(sd.catalog, sd.catalog)} at vote fraction >= "
            f"{sd.vote_threshold}; imaging credit: the Sloan Digital Sky Survey")


def inputs(data: DictConfig) -> dict[str, str | None]:
    return {"data.sdss.cache_dir": data.sdss.cache_dir}


SOURCE = SourceKind("sdss", SdssConfig, fetch_sdss, validate, describe, inputs)
