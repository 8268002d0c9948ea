"""A new user's mistakes and a hostile world, through the real command lines.

Each case sets up a project folder, runs ``python -m pipeline.<stage>`` in it and checks what a
user would see: the exit status, no traceback, one error line that names the culprit and what
would be valid, and every file that was there before left byte for byte as it was.

Set ``ADVERSARIAL_OUTCOMES=<file>`` to append each case's outcome (refused cleanly, traceback,
exit 0, files changed, unclear message) as a JSON line instead of only asserting: the counts
before and after a change come from running this file on both checkouts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import REPO
from tests.fake_skyserver import FakeSkyServer, make_galaxies

CLASSES = ("elliptical", "spiral", "edge_on")


# --------------------------------------------------------------------------- harness
def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its SHA-256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".hydra" not in p.parts}


def run_cli(stage: str, args: list[str], cwd: Path, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    hydra = [] if stage == "config" else ["hydra.run.dir=.hydra", "hydra.output_subdir=null"]
    return subprocess.run([sys.executable, "-m", f"pipeline.{stage}", *args, *hydra],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def outcome(result: subprocess.CompletedProcess, pattern: str, before: dict[str, str],
            root: Path) -> str:
    """How a refusal went, in the words of the closing note's table."""
    text = result.stdout + result.stderr
    after = snapshot(root)
    if any(after.get(name) != digest for name, digest in before.items()):
        return "files changed or lost"
    if "Traceback" in text:
        return "traceback"
    if result.returncode == 0:
        return "exit 0"
    errors = [line for line in text.splitlines() if "ERROR" in line]
    if result.returncode != 2 or len(errors) != 1 or not re.search(pattern, errors[0]):
        return "unclear message"
    return "refused cleanly"


def record(case_id: str, result: str) -> None:
    target = os.environ.get("ADVERSARIAL_OUTCOMES")
    if target:
        with Path(target).open("a") as fh:
            fh.write(json.dumps({"case": case_id, "outcome": result}) + "\n")


def assert_refused(case_id: str, result: subprocess.CompletedProcess, pattern: str,
                   before: dict[str, str], root: Path) -> None:
    got = outcome(result, pattern, before, root)
    record(case_id, got)
    assert got == "refused cleanly", f"{got}\n--- output ---\n{result.stdout}{result.stderr}"


# --------------------------------------------------------------------------- fixtures
def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def galaxy(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.indices((size, size))
    blob = 200 * np.exp(-0.5 * ((x - size / 2) ** 2 + (y - size / 2) ** 2) / (4 + seed % 5))
    return np.clip(blob[..., None] + rng.normal(10, 4, (size, size, 3)), 0, 255).astype(np.uint8)


def user_folder(root: Path, n_per_class: int = 8, encoding: str = "utf-8",
                extra_rows: list[str] = ()) -> Path:
    """A user's catalog beside PNG cutouts: ``id,ra,dec,morph,filename``."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    lines = ["id,ra,dec,morph,filename"]
    for k, label in enumerate(CLASSES):
        for i in range(n_per_class):
            name = f"imgs/{label}_{i}.png"
            (root / name).write_bytes(png_bytes(galaxy(k * 100 + i)))
            lines.append(f"g{k}{i:03d},{150 + i * 0.01:.4f},{2 + k * 0.01:.4f},{label},{name}")
    lines += list(extra_rows)
    catalog = root / "catalog.csv"
    catalog.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return catalog


def folder_args(catalog: Path, *extra: str) -> list[str]:
    return ["debug=tiny", "data=folder", f"data.folder.catalog={catalog}",
            "data.folder.label_column=morph", "data.folder.id_column=id",
            "data.folder.ra_column=ra", "data.folder.dec_column=dec", *extra]


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header that declares ``width`` x ``height`` pixels, in a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1) * 4)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def earlier_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data/raw that an earlier fetch wrote: the output a bad run must not destroy."""
    root = tmp_path_factory.mktemp("earlier")
    result = run_cli("fetch", ["debug=tiny", "paths.raw=data/raw"], root)
    assert result.returncode == 0, result.stderr
    return root / "data" / "raw"


@pytest.fixture(scope="module")
def skyserver():
    server = FakeSkyServer(make_galaxies(8))
    url = server.start()
    yield server, url
    server.stop()


def sdss_args(url: str, cache: Path, *extra: str) -> list[str]:
    return ["debug=tiny", "data=sdss", f"data.sdss.skyserver_url={url}",
            f"data.sdss.sas_url={url}/sas", "data.sdss.n_per_class=8",
            "data.sdss.candidates_per_class=20", "data.sdss.timeout_s=1", "data.sdss.retries=0",
            "data.sdss.backoff_s=0", f"data.sdss.cache_dir={cache}", "data.sdss.jpeg.size=32",
            *extra]


def minimal_meta(prepared: Path) -> None:
    prepared.mkdir(parents=True)
    per_class = {c: 3 for c in CLASSES}
    (prepared / "meta.json").write_text(json.dumps({
        "classes": list(CLASSES), "image_size": 32, "center_crop": 1.0, "source": "mock",
        "normalization": "asinh", "augmented_copies_per_galaxy": 0, "augment_mode": "stored",
        "splits": {s: {"galaxies": 9, "per_class": per_class} for s in ("train", "val", "test")},
    }))


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One thing a user might do wrong; ``setup`` builds it and returns the stage's arguments."""

    stage: str
    setup: Callable[[Path, dict], list[str]]
    message: str  # a regex the one error line must match
    absent: tuple[str, ...] = ()  # outputs that must not appear
    needs: tuple[str, ...] = field(default=())  # fixtures: "earlier_raw", "skyserver"


def with_earlier_raw(args: list[str]) -> Callable[[Path, dict], list[str]]:
    def setup(proj: Path, ctx: dict) -> list[str]:
        shutil.copytree(ctx["earlier_raw"], proj / "data" / "raw")
        return args

    return setup


def folder_case(*extra: str, edit: Callable[[Path], None] | None = None,
                n_per_class: int = 8, encoding: str = "utf-8", rows: tuple[str, ...] = (),
                earlier: bool = True) -> Callable[[Path, dict], list[str]]:
    def setup(proj: Path, ctx: dict) -> list[str]:
        if earlier:
            shutil.copytree(ctx["earlier_raw"], proj / "data" / "raw")
        catalog = user_folder(proj / "user", n_per_class, encoding, list(rows))
        if edit:
            edit(proj / "user")
        return folder_args(catalog, *extra)

    return setup


def sdss_case(*extra: str, bodies: dict[str, bytes] | None = None,
              faults: dict[str, tuple[str, int]] | None = None
              ) -> Callable[[Path, dict], list[str]]:
    def setup(proj: Path, ctx: dict) -> list[str]:
        shutil.copytree(ctx["earlier_raw"], proj / "data" / "raw")
        server = FakeSkyServer(make_galaxies(8), sql_bodies=bodies or {},
                               faults=faults or {})
        ctx["servers"].append(server)
        return sdss_args(server.start(), proj / "cache", *extra)

    return setup


def closed_port() -> int:
    """A local port nobody listens on: bound, then released."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sql_header(columns: str) -> bytes:
    return f"#Table1\n{columns}\n".encode()


GZ1 = ("objid,ra,dec,p_el_debiased,p_cs_debiased,p_cw,p_acw,p_edge,p_mg,p_dk,nvote,"
       "petroR90_r,run,rerun,camcol,field")
ROW = "1237650000000000001,150.1,2.0,0.9,0.05,0.02,0.02,0.01,0.0,0.0,40,6.5,1000,301,3,100"


def config_case(*args: str) -> Callable[[Path, dict], list[str]]:
    def setup(proj: Path, ctx: dict) -> list[str]:
        (proj / "params.yaml").write_text("kept: true  # the params.yaml a user had\n")
        return list(args)

    return setup


def write(path: str, data: bytes | str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data if isinstance(data, bytes) else data.encode())

    return edit


def lambda_model(proj: Path) -> None:
    import keras

    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, outputs).save(proj / "m" / "model.keras")


def model_dir_case(model: bytes | None, *extra: str, lam: bool = False
                   ) -> Callable[[Path, dict], list[str]]:
    """A model folder as train and evaluate leave it, around ``model`` bytes (or a model whose
    Lambda layer safe_mode refuses)."""
    def setup(proj: Path, ctx: dict) -> list[str]:
        folder = proj / "m"
        folder.mkdir()
        (folder / "config.yaml").write_text(
            "data: {classes: [elliptical, spiral, edge_on]}\n"
            "prepare: {image_size: 32, center_crop: 1.0, softening_sigmas: 3.0, "
            "white_percentile: 99.5}\n")
        if lam:
            lambda_model(proj)
        elif model is not None:
            (folder / "model.keras").write_bytes(model)
        (folder / "train_summary.json").write_text(json.dumps({
            "model": "m", "kind": "cnn", "pretrained": None, "backbone": None, "weights": None,
            "classes": list(CLASSES), "input_shape": [32, 32, 3], "parameters": 1,
            "strategy": "default", "replicas": 1, "mixed_precision": False,
            "jit_compile": False, "train_images": 1, "val_images": 1, "class_balance": "none",
            "class_balance_weights": None, "phases": [], "epochs": 1, "best_epoch": 1,
            "best_val_loss": 1.0, "train_loss_at_best": 1.0, "wall_time_s": 1.0}))
        digest = (hashlib.sha256((folder / "model.keras").read_bytes()).hexdigest()
                  if (folder / "model.keras").is_file() else "")
        (folder / "inference.json").write_text(json.dumps({
            "tta": "none", "tta_zoom": 1.0, "prior_correction": {"how": "none"},
            "model_sha256": digest}))
        user_folder(proj / "user", 2)
        return ["model_dir=m", *extra]

    return setup


CASES: dict[str, Case] = {
    # ---- config: pipeline.config checks the composed values before writing params.yaml
    "config-unknown-key": Case("config", config_case("train.epochz=3"),
                               r"config key 'train.epochz' does not exist.*\+train.epochz"),
    "config-unknown-group-option": Case("config", config_case("data=nonexistent"),
                                        r"group 'data' has no option 'nonexistent'.*'mock'"),
    "config-override-syntax": Case("config", config_case("train.epochs=[1,"),
                                   r"cannot read the overrides"),
    "config-huge-image-size": Case("config", config_case("prepare.image_size=100000"),
                                   r"'prepare.image_size' = 100000 is invalid: an integer in"),
    "config-oversample-zero": Case("config", config_case("data.mock.oversample=0"),
                                   r"'data.mock.oversample' = 0 is invalid"),
    "config-augment-batch-zero": Case("config", config_case("augment.batch_size=0"),
                                      r"'augment.batch_size' = 0 is invalid"),
    "config-negative-seed": Case("config", config_case("seed=-1"),
                                 r"'seed' = -1 is invalid: an integer in \[0, 4294967295\]"),
    "config-negative-sky": Case("config", config_case("data.mock.sky_counts=-5"),
                                r"'data.mock.sky_counts' = -5.0 is invalid"),
    "config-negative-width": Case("config", config_case("models.transfer.alpha=-1"),
                                  r"'models.transfer.alpha' = -1.0 is invalid"),
    "config-alpha-without-weights": Case("config", config_case("models.transfer.alpha=0.3"),
                                         r"'models.transfer.alpha' = 0.3 .* one of \[0.35"),
    "config-zero-softening": Case("config", config_case("prepare.softening_sigmas=0"),
                                  r"'prepare.softening_sigmas' = 0.0 is invalid"),
    "config-output-is-project": Case("config", config_case("paths.raw=."),
                                     r"'paths.raw' = '.' .* does not hold the project"),
    "config-nested-outputs": Case("config", config_case("paths.prepared=data/raw/prepared"),
                                  r"'paths.prepared' = 'data/raw/prepared' .* apart from "
                                  r"paths.raw"),
    "config-cnn-shrinks-to-nothing": Case(
        "config", config_case("models.cnn.padding=valid", "models.cnn.filters=[8,8,8,8,8,8]"),
        r"'models.cnn.filters' = \[8, 8, 8, 8, 8, 8\] .* keeps at least 1 pixel"),
    "config-unknown-encoding": Case(
        "config", config_case("data=folder", "data.folder.catalog=c.csv",
                              "data.folder.encoding=klingon"),
        r"'data.folder.encoding' = 'klingon' is invalid"),
    "config-nan-learning-rate": Case("config", config_case("train.learning_rate=nan"),
                                     r"'train.learning_rate' = nan is invalid"),
    "config-model-named-cards": Case("config", config_case("+models.cards.kind=cnn"),
                                     r"'models' = 'cards' is invalid"),
    # ---- the same one-line errors from every stage's command line
    "stage-unknown-key": Case("train", lambda p, c: ["train.epochz=3"],
                              r"config key 'train.epochz' does not exist"),
    "stage-unknown-option": Case("fetch", lambda p, c: ["data=nonexistent"],
                                 r"group 'data' has no option 'nonexistent'"),
    "stage-bad-value": Case("prepare", lambda p, c: ["prepare.white_percentile=101"],
                            r"'prepare.white_percentile' = 101.0 is invalid"),
    # ---- folder catalogs
    "catalog-empty-file": Case("fetch", folder_case(edit=write("catalog.csv", b"")),
                               r"catalog.csv: the file is empty", needs=("earlier_raw",)),
    "catalog-latin-1": Case("fetch", folder_case(encoding="latin-1",
                                                 rows=("gé,150,2,elliptical,imgs/x.png",)),
                            r"byte 0xe9 on line 26 is not valid utf-8.*"
                            r"data.folder.encoding=latin-1", needs=("earlier_raw",)),
    "catalog-ragged-row": Case("fetch", folder_case(rows=("g9,150,2,spiral,imgs/a.png,extra",)),
                               r"catalog.csv: line 26 has 6 fields but the header has 5",
                               needs=("earlier_raw",)),
    "catalog-short-row": Case("fetch", folder_case(rows=("g9,150,2",)),
                              r"line 26 has 3 fields but the header has 5",
                              needs=("earlier_raw",)),
    "catalog-text-coordinate": Case("fetch", folder_case(rows=("g9,north,2,spiral,x.png",)),
                                    r"column 'ra', row 25: 'north' is not a number in \[0, 360\]",
                                    needs=("earlier_raw",)),
    "catalog-dec-out-of-range": Case("fetch", folder_case(rows=("g9,10,95,spiral,x.png",)),
                                     r"column 'dec', row 25: '95' is not a number in \[-90, 90\]",
                                     needs=("earlier_raw",)),
    "catalog-missing-column": Case("fetch", folder_case("data.folder.label_column=klass"),
                                   r"missing column\(s\) \['klass'\]", needs=("earlier_raw",)),
    "catalog-header-only": Case("fetch", folder_case(edit=write("catalog.csv", "id,morph\n")),
                                r"has a header but no rows", needs=("earlier_raw",)),
    "catalog-no-label-maps": Case("fetch", folder_case("+data.folder.label_map={E: elliptical}"),
                                  r"no galaxy left after mapping labels",
                                  needs=("earlier_raw",)),
    "catalog-class-too-small": Case("fetch", folder_case(n_per_class=4),
                                    r"class count\(s\) .* are below 7.*left as it was",
                                    needs=("earlier_raw",)),
    "catalog-is-a-folder": Case("fetch", lambda p, c: folder_args(p),
                                r"data.folder.catalog = .*: no such file"),
    "catalog-inside-raw": Case(
        "fetch", lambda p, c: (shutil.copytree(c["earlier_raw"], p / "data" / "raw"),
                               folder_args(user_folder(p / "data" / "raw" / "mine")))[1],
        r"paths.raw = 'data/raw' would replace data.folder.catalog", needs=("earlier_raw",)),
    "image-root-inside-raw": Case(
        "fetch", folder_case("data.folder.image_root=data/raw/pics"),
        r"paths.raw = 'data/raw' would replace data.folder.image_root", needs=("earlier_raw",)),
    "raw-is-a-user-folder": Case("fetch", folder_case("paths.raw=user", earlier=False),
                                 r"paths.raw = 'user' would replace data.folder.catalog"),
    "raw-is-a-foreign-folder": Case(
        "fetch", lambda p, c: (write("notes.txt", "mine")(p / "mystuff"),
                               ["debug=tiny", "paths.raw=mystuff"])[1],
        r"paths.raw = 'mystuff' is a folder the pipeline did not write"),
    "raw-is-a-file": Case("fetch", lambda p, c: (write("labels.csv", "a,b\n")(p),
                                                 ["debug=tiny", "paths.raw=labels.csv"])[1],
                          r"paths.raw = 'labels.csv' is a file"),
    "too-many-bad-images": Case(
        "fetch", folder_case(edit=write("imgs/spiral_0.png", b"\x89PNG broken")),
        r"1 of 24 galaxies \(4.2%\) could not be used, more than data.max_bad_fraction = 0.0;"
        r" all are listed in data/raw-failures.csv", needs=("earlier_raw",)),
    "decompression-bomb": Case(
        "fetch", folder_case(edit=write("imgs/spiral_1.png", huge_png(30000, 30000))),
        r"30000x30000 = 900,000,000 pixels is more than data.max_image_pixels",
        needs=("earlier_raw",)),
    # ---- SkyServer replies that are not what they claim
    "cas-html-page": Case("fetch", sdss_case(bodies={"elliptical": b"<!DOCTYPE html>\n<html>"
                                                     b"<body>Down for maintenance</body>"}),
                          r"HTML page or an error instead of CSV; it begins '<!DOCTYPE html>'",
                          needs=("earlier_raw",)),
    "cas-missing-columns": Case("fetch", sdss_case(bodies={"elliptical": sql_header(
        "objid,ra,dec") + b"1237650000000000001,150.1,2.0\n"}),
        r"lacks column\(s\) \['p_el_debiased',", needs=("earlier_raw",)),
    "cas-non-integer-objid": Case("fetch", sdss_case(bodies={"elliptical": sql_header(GZ1)
                                                             + ROW.replace("01,", "0x,", 1)
                                                             .encode() + b"\n"}),
                                  r"row 1, column 'objid' = '1237650+x' is not an integer",
                                  needs=("earlier_raw",)),
    "cas-text-in-numeric-column": Case("fetch", sdss_case(bodies={"elliptical": sql_header(GZ1)
                                                                  + ROW.replace("0.9,", "high,")
                                                                  .encode() + b"\n"}),
                                       r"column 'p_el_debiased' = 'high' is not a number",
                                       needs=("earlier_raw",)),
    "cas-ra-out-of-range": Case("fetch", sdss_case(bodies={"elliptical": sql_header(GZ1)
                                                           + ROW.replace("150.1", "400")
                                                           .encode() + b"\n"}),
                                r"column 'ra' = '400' is not a right ascension in \[0, 360\]",
                                needs=("earlier_raw",)),
    "cas-empty-selection": Case("fetch", sdss_case(bodies={"spiral": sql_header(GZ1)}),
                                r"query for class 'spiral' returned no galaxies",
                                needs=("earlier_raw",)),
    "cas-every-download-fails": Case(
        "fetch", sdss_case("data.max_bad_fraction=1.0",
                           faults={f"{g.ra:.6f}": ("500", 99) for g in make_galaxies(8)}),
        r"no galaxies left", needs=("earlier_raw",)),
    "cas-unreachable": Case("fetch", lambda p, c: (
        shutil.copytree(c["earlier_raw"], p / "data" / "raw"),
        sdss_args(f"http://127.0.0.1:{closed_port()}", p / "cache"))[1],
        r"SQL query for class 'elliptical': ConnectionError after 1 attempt\(s\) to "
        r"127.0.0.1:\d+; check this machine's network, or set skyserver_url / sas_url \(under "
        r"data.sdss, or region.sdss for predict\) to a mirror that answers",
        needs=("earlier_raw",)),
    "cas-trickled-reply": Case("fetch", sdss_case(faults={"sql": ("drip", 99)}),
                               r"SQL query for class 'elliptical': Timeout after 1 "
                               r"attempt\(s\) from 127.0.0.1:\d+ \(timeout_s = \S+\); the "
                               r"archive may be busy: raise timeout_s or retries",
                               needs=("earlier_raw",)),
    # ---- stages run before the one they need
    "prepare-before-fetch": Case("prepare", lambda p, c: ["debug=tiny"],
                                 r"data/raw/catalog.csv: catalog not found; run the fetch stage"),
    "train-before-prepare": Case("train", lambda p, c: ["debug=tiny"],
                                 r"meta.json: not found; run the prepare stage first"),
    "evaluate-before-train": Case("evaluate", lambda p, c: (minimal_meta(p / "data" / "prepared"),
                                                            ["debug=tiny"])[1],
                                  r"no prepared split; run the prepare stage first"),
    "report-before-evaluate": Case("report", lambda p, c: (minimal_meta(p / "data" / "prepared"),
                                                           ["debug=tiny"])[1],
                                   r"metrics.json: not found; run the evaluate stage first"),
    "train-missing-weights-file": Case(
        "train", lambda p, c: (minimal_meta(p / "data" / "prepared"),
                               ["debug=tiny", "model=transfer",
                                "models.transfer.weights=/nowhere/w.h5"])[1],
        r"'models.transfer.weights' = '/nowhere/w.h5': no such file"),
    "prepare-into-user-folder": Case(
        "prepare", lambda p, c: (shutil.copytree(c["earlier_raw"], p / "data" / "raw"),
                                 write("thesis.tex", "years of work")(p / "out"),
                                 ["debug=tiny", "paths.prepared=out"])[2],
        r"paths.prepared = 'out' is a folder the pipeline did not write",
        needs=("earlier_raw",)),
    # ---- predict
    "predict-output-is-input": Case("predict", model_dir_case(
        b"", "input=user/catalog.csv", "output=user/catalog.csv", "image_column=filename"),
        r"output = 'user/catalog.csv' lies in or is input"),
    "predict-output-in-input-folder": Case("predict", model_dir_case(
        b"", "input=user/imgs", "output=user/imgs/p.csv"),
        r"output = 'user/imgs/p.csv' lies in or is input = 'user/imgs'"),
    "predict-output-is-a-folder": Case("predict", model_dir_case(
        b"", "input=user/imgs", "output=user"), r"output = 'user' is a folder"),
    "predict-output-over-the-model": Case("predict", model_dir_case(
        b"", "input=user/imgs", "output=m/model.keras"), r"lies in or is model_dir = 'm'"),
    "predict-unknown-format": Case("predict", model_dir_case(
        b"", "input=user/imgs", "output=p.txt"), r"output = 'p.txt': unknown table format; end "
        r"the name in one of \['.csv', '.ecsv', '.fit', '.fits', '.vot', '.xml'\]"),
    "predict-bad-shard": Case("predict", model_dir_case(
        b"", "input=user/imgs", "output=p.csv", "shard=3", "num_shards=3"),
        r"'shard' = 3 is invalid: an integer in \[0, num_shards - 1 = 2\]"),
    "predict-region-without-centre": Case("predict", model_dir_case(
        b"", "input=region", "output=p.fits"), r"'region.ra' = None is invalid: degrees in"),
    "predict-model-not-a-zip": Case("predict", model_dir_case(
        b"not a zip", "input=user/imgs", "output=p.csv"),
        r"m/model.keras: not a Keras model", absent=("p.csv",)),
    "predict-model-refused-by-safe-mode": Case("predict", model_dir_case(
        None, "input=user/imgs", "output=p.csv", lam=True),
        r"m/model.keras: refused by Keras safe_mode", absent=("p.csv",)),
    "predict-no-input-given": Case("predict", model_dir_case(b""),
                                   r"'input' = '\?\?\?' is invalid: a catalog CSV, a folder"),
    "predict-missing-input": Case("predict", model_dir_case(b"", "input=nowhere.csv"),
                                  r"input = 'nowhere.csv': no such file or folder"),
    "predict-latin-1-catalog": Case("predict", model_dir_case(
        b"", "input=user/cat1.csv", "image_column=filename"),
        r"byte 0xe9 on line 2 is not valid utf-8.*set encoding=latin-1"),
    "predict-blank-image-cell": Case("predict", lambda p, c: (
        model_dir_case(b"")(p, c),
        user_folder(p / "user", 2, extra_rows=["g9,150.5,2.5,spiral,"]),
        ["model_dir=m", "input=user/catalog.csv", "image_column=filename", "output=p.csv"])[2],
        r"user/catalog.csv: column image_column = 'filename' is empty in 1 row\(s\) \(first: "
        r"row 7, header excluded\); name an image in every row, or drop those rows",
        absent=("p.csv",)),
    "predict-fits-with-non-ascii-text": Case("predict", lambda p, c: (
        model_dir_case(b"")(p, c),
        user_folder(p / "user", 2,
                    extra_rows=["NGC 4874 – core,150.5,2.5,spiral,imgs/spiral_0.png"]),
        ["model_dir=m", "input=user/catalog.csv", "image_column=filename", "output=p.fits"])[2],
        r"output = 'p.fits': FITS tables hold ASCII text only, and column 'id' has 'NGC 4874 – "
        r"core' on row 7; write .vot or .ecsv \(UTF-8\) instead", absent=("p.fits",)),
    "predict-not-a-model-folder": Case("predict", lambda p, c: ["model_dir=nowhere",
                                                                "input=x.csv"],
                                       r"nowhere/config.yaml: not found; point at a folder "
                                       r"written by the train stage"),
    "predict-stale-inference": Case("predict", lambda p, c: (
        model_dir_case(b"PK old model")(p, c),
        (p / "m" / "model.keras").write_bytes(b"PK retrained"),
        ["model_dir=m", "input=user/imgs", "output=p.csv"])[2],
        r"m/inference.json was fitted for another model.keras .* run the evaluate stage"),
}


def _latin_catalog(proj: Path) -> None:
    (proj / "user" / "cat1.csv").write_bytes("filename\nimgs/é.png\n".encode("latin-1"))


@pytest.mark.parametrize("case_id", list(CASES))
def test_a_user_mistake_is_refused_in_one_line_and_nothing_is_lost(case_id, tmp_path, request):
    case = CASES[case_id]
    ctx: dict = {"servers": []}
    for name in case.needs:
        ctx[name] = request.getfixturevalue(name)
    proj = tmp_path / "project"
    proj.mkdir()
    try:
        args = case.setup(proj, ctx)
        if case_id == "predict-latin-1-catalog":
            _latin_catalog(proj)
        if case.stage == "fetch" and "data.max_bad_fraction=1.0" not in args:
            args = [*args, "data.max_bad_fraction=0"]
        before = snapshot(proj)
        result = run_cli(case.stage, args, proj)
    finally:
        for server in ctx["servers"]:
            server.stop()
    assert_refused(case_id, result, case.message, before, proj)
    for name in case.absent:
        assert not (proj / name).exists()
    leftovers = [p for p in proj.rglob(".*.tmp")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"


# --------------------------------------------------------------------------- beyond refusals
def test_repeated_rows_and_copied_files_never_reach_two_splits(tmp_path):
    """The same galaxy twice (a repeated row, or the same image under a second id) is found at
    fetch, counted and dropped; prepare's split then holds each galaxy once."""
    copies = [f"g0{i:03d},150,2,elliptical,imgs/elliptical_{i}.png" for i in range(8)]
    twins = [f"twin{i},150,2,spiral,imgs/spiral_{i}.png" for i in range(4)]
    clash = ["g1000,150,2,edge_on,imgs/spiral_0.png"]  # same id as a spiral: label clash
    catalog = user_folder(tmp_path / "user", extra_rows=[*copies, *twins, *clash])
    result = run_cli("fetch", folder_args(catalog, "data.max_bad_fraction=0"), tmp_path)
    assert result.returncode == 0, result.stderr
    # 8 repeated rows, 3 twins of kept spirals, and g1000 (two labels, and twin0 shares its
    # image) loses all three of its rows
    assert "dropped 14 duplicate row(s)" in result.stdout + result.stderr
    raw = tmp_path / "data" / "raw"
    kept = pd.read_csv(raw / "catalog.csv", dtype=str)
    assert len(kept) == 23 and kept["objid"].is_unique  # 24 galaxies less g1000
    assert not {"g1000", "twin0"} & set(kept["objid"])
    digests = [hashlib.sha256((raw / f).read_bytes()).hexdigest() for f in kept["file"]]
    assert len(set(digests)) == len(digests)
    dropped = pd.read_csv(raw / "duplicates.csv", dtype=str)
    assert len(dropped) == 14 and dropped["reason"].str.contains("same").all()
    assert (dropped["reason"].str.contains("different label")).sum() == 3
    assert len(list((raw / "images").iterdir())) == 23  # the dropped copies' files went too

    result = run_cli("prepare", ["debug=tiny", "data=folder", f"data.folder.catalog={catalog}"],
                     tmp_path)
    assert result.returncode == 0, result.stderr
    ids = {s: set(np.load(tmp_path / "data" / "prepared" / s / "objid.npy"))
           for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["test"] or ids["train"] & ids["val"] or ids["val"] & ids["test"])
    assert sum(map(len, ids.values())) == 23


def test_a_raw_catalog_edited_by_hand_is_deduplicated_by_prepare(tmp_path, earlier_raw):
    raw = tmp_path / "data" / "raw"
    shutil.copytree(earlier_raw, raw)
    catalog = pd.read_csv(raw / "catalog.csv", dtype=str)
    pd.concat([catalog, catalog.iloc[:5]]).to_csv(raw / "catalog.csv", index=False)
    result = run_cli("prepare", ["debug=tiny"], tmp_path)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "data" / "prepared" / "meta.json").read_text())
    assert meta["n_duplicates_dropped"] == 5
    assert sum(s["galaxies"] for s in meta["splits"].values()) == len(catalog)


def test_a_killed_fetch_leaves_the_old_output_and_the_next_run_cleans_up(tmp_path, earlier_raw):
    raw = tmp_path / "data" / "raw"
    shutil.copytree(earlier_raw, raw)
    before = snapshot(raw)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.fetch", "data.mock.n_per_class=400",
         "hydra.run.dir=.hydra", "hydra.output_subdir=null"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with process.stderr:
        for line in process.stderr:  # kill -9 once it is rendering galaxies
            if "render" in line or "%" in line:
                break
        process.kill()
        process.wait(timeout=60)
    assert snapshot(raw) == before  # killed mid-way: data/raw is the old one, whole
    assert list(tmp_path.glob("data/.raw.*.tmp")), "the killed run should have left its temp"
    result = run_cli("fetch", ["debug=tiny"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob("data/.raw.*.tmp"))  # removed by the next run
    assert "left by an interrupted run" in result.stdout + result.stderr


@contextlib.contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted with ``options`` (root only; skipped where mounting is not allowed)."""
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()[:80]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "small", "size=2m") as mount:
        yield mount


@pytest.fixture
def read_only_folder(tmp_path):
    with tmpfs(tmp_path / "read_only", "ro,size=1m") as mount:
        yield mount


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, read_only_folder,
                                                             earlier_raw):
    shutil.copytree(earlier_raw, tmp_path / "data" / "raw")
    result = run_cli("fetch", ["debug=tiny", f"paths.raw={read_only_folder / 'raw'}"], tmp_path)
    text = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in text, text
    assert re.search(rf"{read_only_folder}/\S*: read-only file system; point the output \(or "
                     r"input\) at a folder this user can write", text), text
    assert (tmp_path / "data" / "raw" / "catalog.csv").is_file()  # the earlier output is kept


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, small_disk,
                                                                 earlier_raw):
    raw = tmp_path / "data" / "raw"
    shutil.copytree(earlier_raw, raw)
    # prepare knows what it will write: it refuses before writing anything
    result = run_cli("prepare", ["debug=tiny", "prepare.image_size=256", "augment.copies=8",
                                 f"paths.prepared={small_disk / 'prepared'}"], tmp_path)
    text = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in text, text
    assert re.search(rf"{small_disk}: writing the prepared images needs [\d,]+ bytes, but only "
                     r"[\d,]+ bytes are free there", text), text
    # fetch cannot know in advance: the disk fills while it writes
    result = run_cli("fetch", ["data.mock.n_per_class=200", f"paths.raw={small_disk / 'raw'}"],
                     tmp_path)
    text = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in text, text
    assert re.search(rf"{small_disk}/raw: the disk filled up while writing it", text), text
    assert list(small_disk.iterdir()) == []  # no half-written output, no temporary
