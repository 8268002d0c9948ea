"""data=sdss against a stand-in SkyServer on 127.0.0.1 speaking the real formats."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from pipeline import fetch, prepare
from pipeline.catalog import CatalogError
from pipeline.config import ConfigError
from pipeline.sources.sdss import label_query
from tests.conftest import shared_path, tiny_config
from tests.fake_skyserver import FakeSkyServer, Galaxy, make_galaxies


@pytest.fixture
def skyserver():
    server = FakeSkyServer(make_galaxies(8))
    url = server.start()
    yield server, url
    server.stop()


def sdss_cfg(tmp_path: Path, url: str, *extra: str):
    return tiny_config(
        tmp_path, "data=sdss", f"data.sdss.skyserver_url={url}", f"data.sdss.sas_url={url}/sas",
        "data.sdss.n_per_class=8", "data.sdss.candidates_per_class=20",
        "data.sdss.timeout_s=0.5", "data.sdss.backoff_s=0.01", "data.sdss.retries=2",
        f"data.sdss.cache_dir={tmp_path / 'cache'}", "data.sdss.jpeg.size=64", *extra)


def test_jpeg_fetch_queries_galaxy_zoo_and_downloads_every_cutout(tmp_path, skyserver):
    server, url = skyserver
    catalog = fetch.run(sdss_cfg(tmp_path, url))
    assert catalog["label"].value_counts().to_dict() == {
        "elliptical": 8, "spiral": 8, "edge_on": 8}
    sql = [r for r in server.requests if "x_results.aspx" in r]
    assert len(sql) == 3 and all("/dr17/" in r and "format=csv" in r for r in sql)
    raw = Path(tmp_path / "raw")
    on_disk = pd.read_csv(raw / "catalog.csv", dtype={"objid": str})
    assert list(on_disk.columns[:6]) == ["objid", "ra", "dec", "label", "file", "url"]
    assert on_disk["url"].str.contains(r"/dr17/SkyServerWS/ImgCutout/getjpeg\?ra=").all()
    # Petrosian scaling: R90 = 6.5 arcsec x 8.46 over 64 pixels.
    assert on_disk["url"].str.contains(f"scale={6.5 * 8.46 / 64:.4f}").all()
    assert all((raw / f).stat().st_size > 500 for f in on_disk["file"])
    assert pd.read_csv(raw / "failures.csv").empty
    assert "FROM zooSpec AS z JOIN PhotoObj" in (raw / "queries.sql").read_text()


def test_rerun_fetches_only_what_is_missing(tmp_path, skyserver):
    server, url = skyserver
    cfg = sdss_cfg(tmp_path, url)
    fetch.run(cfg)
    cached = sorted((tmp_path / "cache" / "dr17" / "jpeg").glob("*.jpeg"))
    cached[0].unlink()  # as if the first run had been interrupted before this one
    cached[1].write_bytes(cached[1].read_bytes()[:100])  # and this one left half-written
    server.requests.clear()
    fetch.run(cfg)
    assert len([r for r in server.requests if "getjpeg" in r]) == 2


def test_transient_faults_are_retried_and_persistent_ones_listed(tmp_path):
    galaxies = make_galaxies(8)
    keys = [f"{g.ra:.6f}" for g in galaxies]
    server = FakeSkyServer(galaxies, faults={
        keys[0]: ("500", 1), keys[1]: ("slow", 1), keys[2]: ("truncated", 1),
        keys[3]: ("corrupt", 1), keys[4]: ("500", 99)})
    url = server.start()
    try:
        cfg = sdss_cfg(tmp_path, url, "data.max_bad_fraction=0.1")
        catalog = fetch.run(cfg)
    finally:
        server.stop()
    failures = pd.read_csv(tmp_path / "raw" / "failures.csv", dtype={"objid": str})
    assert failures["objid"].tolist() == [str(galaxies[4].objid)]
    assert "HTTP 500 after 3 attempt(s)" in failures["reason"].iloc[0]
    assert len(catalog) == 23
    assert str(galaxies[4].objid) not in set(catalog["objid"])


def test_too_many_failures_fail_the_stage_without_touching_old_output(tmp_path):
    galaxies = make_galaxies(8)
    server = FakeSkyServer(galaxies, faults={f"{g.ra:.6f}": ("500", 99) for g in galaxies[:5]})
    url = server.start()
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "catalog.csv").write_text("old\n")
    (raw / "fetch_summary.json").write_text("{}\n")  # an earlier fetch's output
    try:
        with pytest.raises(CatalogError, match=r"5 of 24 galaxies \(20.8%\) could not be used, "
                                               r"more than data.max_bad_fraction = 0.05"):
            fetch.run(sdss_cfg(tmp_path, url))
    finally:
        server.stop()
    assert (raw / "catalog.csv").read_text() == "old\n"
    assert len(pd.read_csv(tmp_path / "raw-failures.csv")) == 5


def test_fits_frames_are_downloaded_once_per_field_and_cut_with_the_wcs(tmp_path, skyserver):
    server, url = skyserver
    # The stand-in builds and bz2-compresses each 400x600 frame per request (0.3-0.6 s on a
    # 2-core host): the 0.5 s timeout of the other tests would turn a slow build into a retry,
    # that is a second download of the same frame, which is what this test counts.
    cfg = sdss_cfg(tmp_path, url, "data.sdss.image_type=fits", "data.sdss.fits.size=32",
                   "data.sdss.timeout_s=30")
    catalog = fetch.run(cfg)
    frames = [r for r in server.requests if "frame-" in r]
    assert len(frames) == 2 * 3  # two fields x g, r, i
    assert all("/sas/dr17/eboss/photoObj/frames/301/" in r for r in frames)
    row = catalog.iloc[5]
    with fits.open(tmp_path / "raw" / row.file) as hdul:
        assert [h.name for h in hdul[1:]] == ["G", "R", "I"]
        r = hdul["R"].data
        assert r.shape == (32, 32)
        centre = WCS(hdul["R"].header).pixel_to_world(15.5, 15.5)
        assert centre.ra.deg == pytest.approx(row.ra, abs=0.4 / 3600)
        assert centre.dec.deg == pytest.approx(row.dec, abs=0.4 / 3600)
        assert np.unravel_index(np.argmax(r), r.shape) in {(15, 15), (15, 16), (16, 15),
                                                           (16, 16)}
    prepare.run(cfg)  # the later stages run unchanged on the SDSS contract


@pytest.mark.parametrize("override,message", [
    ("data.sdss.vote_threshold=1.5", r"'data.sdss.vote_threshold' = 1.5 is invalid"),
    ("data.sdss.catalog='zooSpec; DROP TABLE x'",
     r"'data.sdss.catalog' = 'zooSpec; DROP TABLE x' is invalid: one of \['gz1', 'gz2'\]"),
    ("data.sdss.data_release=99", r"'data.sdss.data_release' = 99 is invalid"),
    ("data.sdss.concurrency=500", r"'data.sdss.concurrency' = 500 is invalid"),
    ("data.sdss.skyserver_url=ftp://x", r"'data.sdss.skyserver_url' = 'ftp://x' is invalid"),
    ("data.classes=[elliptical,lenticular]", r"'data.classes' .* classes that gz1 can select"),
])
def test_bad_config_is_refused_before_any_sql_is_sent(tmp_path, skyserver, override, message):
    server, url = skyserver
    with pytest.raises(ConfigError, match=message):
        sdss_cfg(tmp_path, url, override)
    assert server.requests == []


def test_sql_holds_only_numbers_and_known_names():
    sql = label_query("gz1", "spiral", 0.8, 500)
    assert sql.startswith("SELECT TOP 500 z.objid AS objid")
    assert "(z.p_cw + z.p_acw) >= 0.8" in sql
    with pytest.raises(ValueError, match="threshold"):
        label_query("gz1", "spiral", float("nan"), 5)
    with pytest.raises(ValueError, match="cannot be selected"):
        label_query("gz1", "spiral'; --", 0.5, 5)


@pytest.mark.shared_data
def test_real_getjpeg_responses_are_served_and_stored_byte_for_byte(tmp_path):
    folder = shared_path("data", "skyserver-getjpeg")
    labels = pd.read_csv(folder / "labels.csv")
    labels = labels[labels["class_name"].isin(["spiral", "elliptical"])].reset_index(drop=True)
    galaxies = [Galaxy(1237600000000000000 + i, r.ra, r.dec, r.class_name)
                for i, r in labels.iterrows()]
    server = FakeSkyServer(galaxies, jpeg_bytes={
        f"{r.ra:.6f},{r.dec:.6f}": (folder / r.filename).read_bytes()
        for r in labels.itertuples()})
    url = server.start()
    try:
        # 5 of the 310 are ellipticals: held-out fractions of 0.7 split 3 or more.
        cfg = sdss_cfg(tmp_path, url, "data.classes=[spiral,elliptical]",
                       "prepare.split.train=0.3", "prepare.split.val=0.35",
                       "prepare.split.test=0.35",
                       "data.sdss.data_release=12", "data.sdss.jpeg.scale_mode=fixed",
                       "data.sdss.jpeg.scale=0.2", "data.sdss.jpeg.size=120",
                       "data.sdss.n_per_class=400", "data.sdss.candidates_per_class=400",
                       "data.sdss.concurrency=8")
        catalog = fetch.run(cfg)
    finally:
        server.stop()
    assert len(catalog) == len(labels) == 310
    sha = {f"{r.ra:.6f},{r.dec:.6f}": r.sha1 for r in labels.itertuples()}
    for row in catalog.itertuples():
        digest = hashlib.sha1((tmp_path / "raw" / row.file).read_bytes()).hexdigest()
        assert digest == sha[f"{row.ra:.6f},{row.dec:.6f}"]
    # The URL we ask for is the one SkyServer was asked for, up to host and spelling of DR12.
    first = labels.iloc[0]
    ours = catalog.set_index("ra").loc[first.ra, "url"]
    assert ours.split("getjpeg?")[1] == (f"ra={first.ra:.6f}&dec={first.dec:.6f}&scale=0.2000"
                                        "&width=120&height=120")


@pytest.mark.remote_data
def test_live_sdss_returns_galaxy_zoo_cutouts(tmp_path):
    cfg = tiny_config(tmp_path, "data=sdss", "data.sdss.n_per_class=3",
                      "data.sdss.candidates_per_class=50", f"data.sdss.cache_dir={tmp_path}/c")
    catalog = fetch.run(cfg)
    assert len(catalog) == 9
