"""Classify a survey: apply a trained model to a catalog, a folder of images or a patch of sky.

    python -m pipeline.predict model_dir=models/transfer input=survey.csv output=morph.fits
    python -m pipeline.predict model=gz1-transfer-v5 input=cutouts/ output=morph.csv
    python -m pipeline.predict model_dir=models/transfer input=region region.ra=185.0 \\
        region.dec=15.8 region.radius_arcmin=10 output=field.vot
    python -m pipeline.predict -m hydra/launcher=parallel shard=0,1,2,3 num_shards=4 ...

The model folder is the whole bundle (:class:`pipeline.artifacts.TrainedModel`): the
preprocessing (centre crop, resize, normalisation) comes from its saved ``config.yaml``, and the
test-time views and prior correction from its ``inference.json``, so the probabilities are those
evaluate scored.

The input is cut into chunks of ``chunk_size`` images in a fixed order. Each chunk is decoded
(``workers`` threads, the next chunk while the model classifies this one), classified and
written as a part file beside the output, so memory does not grow with the survey, and a killed
run started again carries on from its last finished chunk (a changed model, input or setting
discards the parts instead of mixing them). ``shard=K num_shards=N`` classifies chunks K, K+N,
K+2N, ...; whichever shard finishes last writes the one table. The table carries the input
catalog's own columns, then the predicted class, one probability per class, the predictive
entropy and the Monte Carlo dropout spread (Gal & Ghahramani 2016), with units, descriptions and
provenance, as CSV, ECSV, FITS or VOTable by the output's suffix.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline import __version__
from pipeline.artifacts import (
    INFERENCE_NAME,
    TrainedModel,
    file_sha256,
    load_trained_config,
)
from pipeline.calibration import set_labels
from pipeline.catalog import image_paths, read_csv_catalog
from pipeline.config import stage_main, validate_predict
from pipeline.errors import PipelineError
from pipeline.inference import TTA_MODES
from pipeline.io import (
    DEFAULT_MAX_PIXELS,
    DISPLAY,
    DISPLAY_SUFFIXES,
    FITS_SUFFIXES,
    FLUX,
    KIND_WORDS,
    OutputError,
    atomic_path,
    atomic_write_text,
    check_replaceable,
    is_within,
    unseen_kind,
)
from pipeline.preprocess import FIXED, Loaded, catalog_radii, framing_of, load_images
from pipeline.release import release_dir

log = logging.getLogger(__name__)

# Output formats by suffix, written with astropy.table (TOPCAT and Aladin read all of them).
FORMATS = {".csv": "csv", ".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits",
           ".vot": "votable", ".xml": "votable"}
ROW = "_row"  # a galaxy's position in the input, in the part files


class PredictError(PipelineError, ValueError):
    """Bad predict input; the message names the key or file."""


# --------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """The galaxies to classify: the user's own columns, and where each image is."""

    table: pd.DataFrame
    paths: list[Path]
    source: Path | None  # the catalog or folder given (None for a region of sky)
    digest: str  # changes when the input does: old part files are then discarded
    radii: np.ndarray | None = None  # pixels, for a model framed by a catalog radius


def _numeric_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Columns whose every cell is a number become numbers (FITS and VOTable keep the type)."""
    out = table.copy()
    for column in out.columns:
        cells = out[column].astype(str).str.strip()
        values = pd.to_numeric(cells, errors="coerce")
        if len(cells) and values.notna().all():
            whole = cells.str.fullmatch(r"[-+]?\d+").all()
            out[column] = (cells.map(int) if whole and values.abs().max() < 2**63
                           else values.astype(float))
    return out


def list_inputs(input_path: Path, image_column: str, encoding: str = "utf-8") -> Inputs:
    """A folder of images (recursively), one image, or a catalog CSV naming them in
    ``image_column``."""
    is_image = input_path.is_file() and input_path.name.lower().endswith(
        FITS_SUFFIXES + DISPLAY_SUFFIXES)
    if input_path.is_dir() or is_image:
        files = [input_path] if is_image else sorted(
            p for p in input_path.rglob("*")
            if p.is_file() and p.name.lower().endswith(FITS_SUFFIXES + DISPLAY_SUFFIXES))
        if not files:
            raise PredictError(f"input = {str(input_path)!r}: the folder holds no JPEG, PNG, "
                               "TIFF or FITS images")
        listing = "\n".join(f"{p}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}" for p in files)
        return Inputs(pd.DataFrame({"image": [str(p) for p in files]}), files, input_path,
                      hashlib.sha256(listing.encode()).hexdigest())
    if not input_path.is_file():
        raise PredictError(f"input = {str(input_path)!r}: no such file or folder")
    catalog = read_csv_catalog(input_path, "input", encoding, encoding_key="encoding")
    if image_column not in catalog.columns:
        raise PredictError(f"{input_path}: no column image_column = {image_column!r}; the "
                           f"catalog has {list(catalog.columns)}")
    blank = (catalog[image_column].str.strip() == "").to_numpy()
    if blank.any():
        raise PredictError(f"{input_path}: column image_column = {image_column!r} is empty in "
                           f"{int(blank.sum())} row(s) (first: row {int(blank.argmax()) + 1}, "
                           "header excluded); name an image in every row, or drop those rows")
    paths = image_paths(catalog[image_column], input_path.parent)
    return Inputs(_numeric_columns(catalog), paths, input_path, file_sha256(input_path))


def region_inputs(cfg: DictConfig, trained_config: DictConfig) -> Inputs:
    """The galaxies of a cone on the sky (the CAS), with cutouts downloaded as the model's
    training images were framed (its own ``data.sdss.jpeg`` if it was trained on SDSS
    cutouts, else ``region.jpeg``), through the fetch stage's cached, retrying downloader."""
    from pipeline.sources.sdss import fetch_jpegs, query_cone

    r = cfg.region
    if r.ra is None or r.dec is None:
        raise PredictError("input = 'region' needs region.ra and region.dec (degrees), e.g. "
                           "region.ra=185.0 region.dec=15.8")
    sc = OmegaConf.create(OmegaConf.to_container(r.sdss, resolve=True))
    if OmegaConf.select(trained_config, "data.source") == "sdss":
        sc.jpeg = trained_config.data.sdss.jpeg  # the framing the model was trained on
        log.info("framing cutouts as the model's training data: %s",
                 OmegaConf.to_container(sc.jpeg))
    catalog = query_cone(sc, r.ra, r.dec, r.radius_arcmin, r.mag_limit, r.max_galaxies)
    if catalog.empty:
        raise PredictError(f"no galaxy brighter than r = {r.mag_limit} within "
                           f"{r.radius_arcmin}' of ({r.ra}, {r.dec})")
    log.info("%d galaxies within %s' of (%s, %s)", len(catalog), r.radius_arcmin, r.ra, r.dec)
    cache = Path(sc.cache_dir) / f"dr{int(sc.data_release)}" / "jpeg"
    done, failures, urls = fetch_jpegs(catalog, OmegaConf.create({"data": {"sdss": sc}}), cache)
    for failure in failures:
        log.warning("no cutout for %s: %s", failure["objid"], failure["reason"])
    # A galaxy without a cutout stays in the input, so it is listed as skipped.
    paths = [done.get(o, cache / f"{o}.missing.jpeg") for o in catalog["objid"]]
    table = catalog.assign(url=catalog["objid"].map(urls))
    table["objid"] = table["objid"].map(int)
    key = json.dumps({"region": OmegaConf.to_container(r, resolve=True),
                      "objids": catalog["objid"].tolist()}, sort_keys=True)
    return Inputs(table, paths, None, hashlib.sha256(key.encode()).hexdigest())


def check_output(output: Path, source: Path | None, model_dir: Path, images: list[Path]) -> None:
    """The predictions file may replace an old predictions file, never an input: not the
    catalog, an image or the model, nothing inside an input folder, and not a folder."""
    check_replaceable(output, "output", None)
    inputs = {"input": source, "model_dir": model_dir}
    for key, path in inputs.items():
        if path is not None and is_within(output, path) and (path.is_dir() or key == "input"):
            raise OutputError(f"output = {str(output)!r} lies in or is {key} = {str(path)!r}; "
                              "write the predictions somewhere else")
    target = output.expanduser().resolve()
    if any(p.expanduser().resolve() == target for p in images):
        raise OutputError(f"output = {str(output)!r} is one of the input images; write the "
                          "predictions somewhere else")
    if output.suffix.lower() not in FORMATS:
        raise OutputError(f"output = {str(output)!r}: unknown table format; end the name in one "
                          f"of {sorted(FORMATS)}")


def check_fits_text(table: pd.DataFrame, output: Path) -> None:
    """FITS tables hold ASCII text only (the standard says so, and astropy refuses anything
    else): a catalog with other characters is refused before any galaxy is classified."""
    if FORMATS.get(output.suffix.lower()) != "fits":
        return
    instead = "write .vot or .ecsv (UTF-8) instead, or drop that column from the catalog"
    for column in table.columns:
        where = f"output = {str(output)!r}: FITS tables hold ASCII text only, and column"
        if not str(column).isascii():
            raise OutputError(f"{where} name {str(column)!r} is not; {instead}")
        values = table[column]
        if not (values.dtype == object or pd.api.types.is_string_dtype(values.dtype)):
            continue
        bad = ~values.astype(str).map(str.isascii).to_numpy(dtype=bool)
        if bad.any():
            row = int(bad.argmax())
            raise OutputError(f"{where} {str(column)!r} has {values.iloc[row]!r} on row "
                              f"{row + 1}; {instead}")


# --------------------------------------------------------------------------- part files
class Parts:
    """Finished chunks, kept beside the output until the table is written.

    ``.<output name>.parts/`` holds one CSV a chunk (written whole or not at all) and the
    fingerprint of the run that wrote them: a run with another fingerprint discards them.
    Several shards share the folder; a lock serialises their bookkeeping.
    """

    def __init__(self, output: Path, fingerprint: dict) -> None:
        self.folder = output.with_name(f".{output.name}.parts")
        self.fingerprint = fingerprint

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        lock = self.folder.with_name(self.folder.name + ".lock")
        with lock.open("w") as handle:
            try:
                import fcntl
            except ImportError:  # no flock (Windows): shards must not overlap in time there
                yield
                return
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def open(self) -> int:
        """Keep the parts of an earlier run with this fingerprint; returns how many."""
        stamp = self.folder / "fingerprint.json"
        with self.locked():
            if self.folder.is_dir():
                old = json.loads(stamp.read_text()) if stamp.is_file() else None
                if old == self.fingerprint:
                    return len(self.done())
                log.info("discarding %d part file(s) in %s from a run with other settings",
                         len(list(self.folder.glob("chunk-*.csv"))), self.folder)
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)
            atomic_write_text(stamp, json.dumps(self.fingerprint, sort_keys=True))
            return 0

    def path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:07d}.csv"

    def done(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.folder.glob("chunk-*.csv")}

    def save(self, chunk: int, result: pd.DataFrame) -> None:
        with atomic_path(self.path(chunk)) as tmp:
            result.to_csv(tmp, index=False)

    def read(self, chunks: list[int]) -> pd.DataFrame:
        text = {"skipped": str, "predicted": str, "prediction_set": str}
        parts = pd.concat([pd.read_csv(self.path(k), dtype=text) for k in chunks],
                          ignore_index=True)
        return parts.fillna({c: "" for c in text if c in parts.columns})

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.with_name(self.folder.name + ".lock").unlink(missing_ok=True)


# --------------------------------------------------------------------------- classifying
@dataclass
class Settings:
    """How every chunk is classified: one decision for the whole run."""

    tta: str
    zoom: float
    batch_size: int
    mc_samples: int
    seed: int
    max_pixels: int
    workers: int


def classify_chunk(trained: TrainedModel, chunk: int, rows: np.ndarray, loaded: Loaded,
                   s: Settings) -> pd.DataFrame:
    """One chunk's rows: predicted class, probabilities, entropy, dropout spread, how the
    galaxy was framed, or why it was skipped. Monte Carlo draws are seeded by the chunk, so a
    shard or a resumed run draws exactly what one uninterrupted run draws."""
    classes = list(trained.scheme.classes)
    kept = loaded.kept
    result = pd.DataFrame({ROW: rows, "skipped": ""})
    result.loc[~kept, "skipped"] = [s_["reason"] for s_ in loaded.skipped]
    x = loaded.images[kept]
    proba = np.full((len(rows), len(classes)), np.nan)
    spread = np.full(len(rows), np.nan)
    if len(x):
        if s.mc_samples > 0:
            # The draws give the spread; the probabilities are the card's (dropout off).
            p, draws = trained.mc_dropout(x, s.mc_samples, s.batch_size,
                                          s.seed * 1_000_003 + chunk, s.tta, s.zoom)
            spread[kept] = draws[:, np.arange(len(x)), p.argmax(axis=1)].std(axis=0)
        else:
            p = trained.predict_proba(x, s.batch_size, s.tta, s.zoom)
        proba[kept] = p
    result["predicted"] = ""
    result.loc[kept, "predicted"] = np.array(classes)[proba[kept].argmax(axis=1)]
    for k, c in enumerate(classes):
        result[f"p_{c}"] = proba[:, k]
    with np.errstate(invalid="ignore", divide="ignore"):
        result["entropy"] = -(proba * np.log(np.clip(proba, 1e-12, 1))).sum(axis=1)
    result.loc[~kept, "entropy"] = np.nan
    result["mc_dropout_std"] = spread
    if trained.inference.conformal is not None:
        sets = np.zeros(proba.shape, dtype=bool)
        if kept.any():
            sets[kept] = trained.prediction_sets(proba[kept])
        result["prediction_set"] = np.where(kept, set_labels(sets, classes), "")
        result["set_size"] = sets.sum(axis=1)
    if trained.summary.train_image_kinds:
        # Beside TRAINKND in the header: a kind the model never saw was normalised in a way it
        # was not trained on, and the table outlives the log that warned of it.
        result["image_kind"] = np.where(kept, np.where(loaded.flux, FLUX, DISPLAY), "")
    framing = framing_of(trained.preprocessing)
    if framing != FIXED:
        # A galaxy whose size could not be measured was centre-cropped (prepare.unmeasured =
        # fixed): the model saw it at another scale than its training galaxies, so say which.
        result["framing"] = np.where(np.isnan(loaded.radius_px), FIXED, framing)
        result["radius_px"] = loaded.radius_px
    return result


def chunk_rows(n_rows: int, chunk_size: int, chunk: int) -> np.ndarray:
    return np.arange(chunk * chunk_size, min(n_rows, (chunk + 1) * chunk_size))


def run_chunks(trained: TrainedModel, inputs: Inputs, todo: list[int], chunk_size: int,
               parts: Parts, s: Settings) -> None:
    """Classify ``todo`` chunk by chunk; the next chunk is decoded while this one is classified."""
    from tqdm import tqdm

    n = len(inputs.paths)

    def decode(chunk: int):
        rows = chunk_rows(n, chunk_size, chunk)
        paths = [inputs.paths[i] for i in rows]
        return rows, load_images(paths, trained.preprocessing, [str(p) for p in paths],
                                 max_pixels=s.max_pixels, workers=s.workers, progress=False,
                                 radii=None if inputs.radii is None else inputs.radii[rows])

    total = sum(len(chunk_rows(n, chunk_size, k)) for k in todo)
    with ThreadPoolExecutor(1) as reader, tqdm(total=total, desc="classify", unit="img") as bar:
        pending = reader.submit(decode, todo[0]) if todo else None
        grey: list[int] = []
        # Rows of the kind of cutout the model was not trained on, if there is one.
        unseen, odd = unseen_kind(trained.summary.train_image_kinds), []
        for i, chunk in enumerate(todo):
            rows, loaded = pending.result()
            if i + 1 < len(todo):
                pending = reader.submit(decode, todo[i + 1])
            parts.save(chunk, classify_chunk(trained, chunk, rows, loaded, s))
            grey.extend(rows[loaded.one_band & loaded.kept])
            if unseen:
                of_unseen_kind = loaded.flux if unseen == FLUX else ~loaded.flux
                odd.extend(rows[of_unseen_kind & loaded.kept])
            bar.update(len(rows))
    if grey:
        # Colour separates red ellipticals from blue discs; a grey cutout hides it.
        log.warning("%d of the %d cutouts classified here are grey (one band, or three identical "
                    "ones; first: %s): a model trained on colour cutouts, as the gz1 releases "
                    "were, loses what colour told it (README, 'Classifying a survey')",
                    len(grey), total, inputs.paths[grey[0]])
    if odd:
        # A FITS cutout given to a model trained on JPEGs is normalised in a way the model
        # never saw (or the reverse), and nothing else would tell the user.
        seen = " and ".join(f"{n:,} {KIND_WORDS[k]}"
                            for k, n in trained.summary.train_image_kinds.items())
        log.warning("%d of the %d cutouts classified here are %s, a kind that %s never saw "
                    "(first: %s): it was trained on %s. Its card's figures do not hold for "
                    "them; give it cutouts of the kind it was trained on (README, 'Classifying "
                    "a survey')", len(odd), total, KIND_WORDS[unseen], trained.folder,
                    inputs.paths[odd[0]], seen)


# --------------------------------------------------------------------------- the table
COLUMN_TEXT = {
    "predicted": ("", "the class with the highest probability"),
    "entropy": ("", "predictive entropy of the class probabilities, in nats (natural log)"),
    "mc_dropout_std": ("", "spread of the winning class's probability over Monte Carlo "
                           "dropout passes"),
    "prediction_set": ("", "conformal prediction set: the classes it may be, '|'-separated"),
    "set_size": ("", "number of classes in the prediction set"),
    "image_kind": ("", "the cutout's kind: display (JPEG, PNG, integer TIFF; rescaled) or flux "
                       "(FITS, float TIFF; asinh-stretched); TRAINKND names those the model "
                       "was trained on"),
    "framing": ("", "how the cutout was framed: the model's framing, or fixed (the centre crop) "
                    "where the galaxy's size could not be measured"),
    "radius_px": ("pix", "the galaxy's radius that framing scaled it by (half-light radius "
                         "measured on the image, or the catalog's), in pixels of the input"),
}


def write_table(table: pd.DataFrame, path: Path, meta: dict, classes: list[str]) -> None:
    """``table`` in the format of ``path``'s suffix, with units, descriptions and provenance."""
    import astropy.units as u
    from astropy.table import Table

    t = Table.from_pandas(table)
    for name in t.colnames:
        lower = name.lower()
        if lower in ("ra", "dec", "ra_deg", "dec_deg"):
            t[name].unit = u.deg
            t[name].description = "right ascension" if lower.startswith("ra") else "declination"
            t[name].meta["ucd"] = ("pos.eq.ra;meta.main" if lower.startswith("ra")
                                   else "pos.eq.dec;meta.main")
        elif name in COLUMN_TEXT:
            unit, text = COLUMN_TEXT[name]
            t[name].unit = u.Unit(unit) if unit else None
            t[name].description = text
        elif name.startswith("p_") and name[2:] in classes:
            t[name].description = (f"probability of class {name[2:]}, averaged over the "
                                   "test-time views and prior-corrected")
    t.meta.update(meta)
    fmt = FORMATS[path.suffix.lower()]
    with atomic_path(path, key="output") as tmp:
        if fmt == "votable":
            _write_votable(t, tmp, meta)
        else:
            t.write(tmp, format=fmt)


def _write_votable(t, path: Path, meta: dict) -> None:
    """A VOTable whose fields carry units, descriptions and UCDs, and whose provenance is in
    INFO elements (astropy's table writer drops table metadata)."""
    from astropy.io.votable import from_table
    from astropy.io.votable.tree import Info

    votable = from_table(t)
    resource = votable.resources[0]
    for field in resource.tables[0].fields:
        ucd = t[field.name].meta.get("ucd")
        if ucd:
            field.ucd = ucd
    for key, value in meta.items():
        resource.infos.append(Info(name=key, value=str(value)))
    votable.to_xml(str(path))


def provenance(trained: TrainedModel, s: Settings) -> dict:
    correction = trained.inference.prior_correction
    # TrainedModel.load checked this digest against the model file.
    return {"MODEL": str(trained.folder), "MODELSHA": trained.inference.model_sha256[:16],
            "CLASSES": ",".join(trained.scheme.classes), "TTA": s.tta, "TTAZOOM": s.zoom,
            "PRIORALP": correction.alpha, "MCDROP": s.mc_samples,
            "TEMPERAT": trained.inference.temperature,
            "CONFLEV": trained.inference.conformal.level if trained.inference.conformal else 0,
            "FRAMING": framing_of(trained.preprocessing),
            "TRAINKND": ",".join(trained.summary.train_image_kinds or {}) or "unknown",
            "PIPEVER": __version__, "DATE": dt.datetime.now(dt.timezone.utc).isoformat(
                timespec="seconds")}


# --------------------------------------------------------------------------- the stage
def run(cfg: DictConfig) -> pd.DataFrame | None:
    """Classify this shard's chunks; the shard that finishes the last chunk writes the table
    (returned; None from the other shards)."""
    cfg = validate_predict(cfg)
    model_dir = release_dir(cfg.model) if cfg.model else Path(cfg.model_dir)
    trained_config = load_trained_config(model_dir)  # a wrong model_dir fails first
    out = Path(str(cfg.output))
    region = str(cfg.input) == "region"
    if not region:
        inputs = list_inputs(Path(str(cfg.input)), cfg.image_column, cfg.encoding)
        check_output(out, inputs.source, model_dir, inputs.paths)
    else:
        check_output(out, None, model_dir, [])
        inputs = region_inputs(cfg, trained_config)
    check_fits_text(inputs.table, out)
    trained = TrainedModel.load(model_dir)
    # A model framed by a catalog radius needs that column in the input too.
    folder = inputs.source is not None and inputs.source.is_dir()
    inputs.radii = catalog_radii(inputs.table, trained.preprocessing,
                                 f"input = {inputs.source or 'region'}" + (
                                     " (a folder: give a catalog CSV with an image column "
                                     "and this one)" if folder else ""))
    inference = trained.inference
    s = Settings(tta=cfg.tta or inference.tta,
                 zoom=float(cfg.tta_zoom if cfg.tta_zoom is not None else inference.tta_zoom),
                 batch_size=int(cfg.batch_size), mc_samples=int(cfg.mc_dropout_samples),
                 seed=int(cfg.seed), workers=int(cfg.workers),
                 max_pixels=int(cfg.max_image_pixels or trained.max_image_pixels
                                or DEFAULT_MAX_PIXELS))
    if (s.tta, s.zoom) != (inference.tta, inference.tta_zoom) and \
            inference.prior_correction.class_factors is not None:
        log.warning("views %s at %gx differ from the %s at %gx that the prior correction was "
                    "fitted with on validation (%s); it is applied as fitted", s.tta, s.zoom,
                    inference.tta, inference.tta_zoom, INFERENCE_NAME)

    n, size = len(inputs.paths), int(cfg.chunk_size)
    chunks = list(range(-(-n // size)))
    mine = [k for k in chunks if k % cfg.num_shards == cfg.shard]
    fingerprint = {"model": inference.model_sha256,
                   "inference": inference.to_dict(), "input": inputs.digest, "rows": n,
                   "chunk_size": size, **{k: v for k, v in vars(s).items() if k != "workers"}}
    parts = Parts(out, fingerprint)
    if parts.open():
        log.info("resuming: %d of %d chunks are finished in %s", len(parts.done()),
                 len(chunks), parts.folder)
    todo = [k for k in mine if k not in parts.done()]
    log.info("shard %d of %d: %d images in %d chunk(s) to classify (views: %s x%d at %gx)",
             cfg.shard, cfg.num_shards, sum(len(chunk_rows(n, size, k)) for k in todo),
             len(todo), s.tta, TTA_MODES[s.tta], s.zoom)
    run_chunks(trained, inputs, todo, size, parts, s)

    with parts.locked():
        missing = sorted(set(chunks) - parts.done())
        if missing:
            log.info("shard %d is done; %d chunk(s) of other shards are still to come, and "
                     "the shard that finishes last writes %s", cfg.shard, len(missing), out)
            return None
        if not parts.folder.is_dir():  # another shard has written the table already
            return None
        table = merge(parts.read(chunks), inputs, cfg, out)
        write_table(table, out, provenance(trained, s), list(trained.scheme.classes))
        parts.remove()
    log.info("wrote %d classified galaxies to %s", len(table), out)
    return table


def merge(results: pd.DataFrame, inputs: Inputs, cfg: DictConfig, out: Path) -> pd.DataFrame:
    """The user's columns beside the results; skipped galaxies are listed, not kept, and more
    than ``max_bad_fraction`` of them fails the run (the list is kept either way)."""
    results = results.sort_values(ROW).reset_index(drop=True)
    bad = results["skipped"].astype(str) != ""
    listing = out.with_name(f"{out.stem}-skipped.csv")
    if bad.any():
        skipped = inputs.table.iloc[results.loc[bad, ROW]].assign(
            reason=results.loc[bad, "skipped"].to_numpy())
        skipped.to_csv(listing, index=False)
        log.warning("%d of %d images could not be read; listed in %s. First: %s",
                    int(bad.sum()), len(results), listing, skipped["reason"].iloc[0])
        if bad.mean() > cfg.max_bad_fraction:
            raise PredictError(f"{int(bad.sum())} of {len(results)} images could not be read, "
                               f"more than max_bad_fraction = {cfg.max_bad_fraction}; all are "
                               f"listed in {listing}; first: {skipped['reason'].iloc[0]}")
    else:
        listing.unlink(missing_ok=True)
    good = results[~bad]
    # Only a galaxy_size or catalog_radius model writes the column.
    if "framing" in good and (fixed := good["framing"] == FIXED).any():
        log.warning("%d of %d galaxies had no measurable size and were centre-cropped instead "
                    "(framing = fixed in the table; first: %s): treat their classes with care",
                    int(fixed.sum()), len(good), inputs.paths[int(good.loc[fixed, ROW].iloc[0])])
    user = inputs.table.iloc[good[ROW]].reset_index(drop=True)
    predictions = good.drop(columns=[ROW, "skipped"]).reset_index(drop=True)
    clash = [c for c in predictions.columns if c in user.columns]
    user = user.rename(columns={c: f"input_{c}" for c in clash})
    return pd.concat([user, predictions], axis=1)


main = stage_main(run, config_name="predict", validator=validate_predict)

if __name__ == "__main__":
    main()
