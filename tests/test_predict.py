"""predict: new images get the trained model's own preprocessing and a row each."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from pipeline import predict
from pipeline.artifacts import InferenceSettings, TrainedModel, load_split
from pipeline.config import ConfigError
from tests.conftest import REPO


def predict_cfg(**values):
    base = OmegaConf.load(REPO / "conf" / "predict.yaml")
    return OmegaConf.merge(base, values)


@pytest.mark.slow
def test_predict_on_a_catalog_reproduces_evaluate(trained_tiny, tmp_path):
    cfg, _ = trained_tiny
    evaluated = pd.read_csv(Path(cfg.paths.reports) / "cnn" / "predictions.csv", dtype=str)
    catalog = pd.read_csv(Path(cfg.paths.raw) / "catalog.csv", dtype=str)
    test_rows = catalog.set_index("objid").loc[evaluated["objid"]].reset_index()
    user_catalog = tmp_path / "new.csv"
    test_rows.assign(path=[str(Path(cfg.paths.raw) / f) for f in test_rows["file"]]).to_csv(
        user_catalog, index=False)
    out = predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                                  input=str(user_catalog), image_column="path",
                                  output=str(tmp_path / "preds.csv"), mc_dropout_samples=0))
    on_disk = pd.read_csv(tmp_path / "preds.csv", dtype={"objid": str})
    # The catalog's own columns first, then what the model says.
    assert list(on_disk.columns) == [*catalog.columns, "path", "predicted", "p_elliptical",
                                     "p_spiral", "p_edge_on", "entropy", "mc_dropout_std",
                                     "prediction_set", "set_size", "image_kind"]
    assert set(on_disk["image_kind"]) == {"flux"}  # the mock's FITS, as the model was trained
    assert (on_disk["set_size"] == on_disk["prediction_set"].str.count(r"\|") + 1).all()
    assert on_disk["objid"].tolist() == test_rows["objid"].tolist()
    assert on_disk["path"].tolist() == [str(Path(cfg.paths.raw) / f) for f in test_rows["file"]]
    # Same preprocessing as training: the same probabilities evaluate found (float16 storage aside).
    np.testing.assert_allclose(out[["p_elliptical", "p_spiral", "p_edge_on"]].to_numpy(),
                               evaluated[["p_elliptical", "p_spiral", "p_edge_on"]].astype(float),
                               atol=0.02)
    np.testing.assert_allclose(on_disk.filter(like="p_").sum(axis=1), 1.0, atol=1e-5)
    # The model's own evaluate.tta is the default; asking for no views changes the numbers.
    metrics = pd.read_json(Path(cfg.paths.reports) / "cnn" / "metrics.json", typ="series")
    assert metrics["tta"] == "dihedral" and metrics["tta_views"] == 8
    assert metrics["tta_zoom"] == 1.0
    # The views and the prior correction are one decision, stored in the bundle by evaluate.
    inference = InferenceSettings.load(Path(cfg.paths.models) / "cnn")
    assert (inference.tta, inference.tta_zoom) == ("dihedral", 1.0)
    assert metrics["prior_correction_alpha"] == inference.prior_correction.alpha
    assert set(inference.prior_correction.validation_macro_f1) == {
        "0.0", "0.25", "0.5", "0.75", "1.0"}
    # The same bundle on the same pixels: evaluate's probabilities, to float precision.
    bundle = TrainedModel.load(Path(cfg.paths.models) / "cnn")
    test = load_split(Path(cfg.paths.prepared), "test")
    bundle_proba = bundle.predict_proba(test["images"].astype(np.float32))
    np.testing.assert_allclose(bundle_proba,
                               evaluated[["p_elliptical", "p_spiral", "p_edge_on"]].astype(float),
                               atol=1e-6)
    # ... and the conformal sets it scored (calibrated probabilities, fitted thresholds).
    from pipeline.calibration import set_labels

    assert set_labels(bundle.prediction_sets(bundle_proba), list(bundle.scheme.classes)) == (
        evaluated["prediction_set"].tolist())
    single = predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                                     input=str(user_catalog), image_column="path", tta="none",
                                     output=str(tmp_path / "one.csv"), mc_dropout_samples=0))
    assert not np.allclose(single["p_spiral"], out["p_spiral"], atol=1e-4)
    with pytest.raises(ConfigError, match=r"'tta' = 'flip' is invalid: one of \['none'"):
        predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                                input=str(user_catalog), image_column="path", tta="flip",
                                output=str(tmp_path / "bad.csv"), mc_dropout_samples=0))
    assert not (tmp_path / "bad.csv").exists()
    with pytest.raises(ConfigError,
                       match=r"'tta_zoom' = 5.0 is invalid: a magnification in \[0.5, 2.0\]"):
        predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                                input=str(user_catalog), image_column="path", tta_zoom=5,
                                output=str(tmp_path / "bad.csv"), mc_dropout_samples=0))
    magnified = predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                                        input=str(user_catalog), image_column="path",
                                        tta_zoom=1.3, output=str(tmp_path / "z.csv"),
                                        mc_dropout_samples=0))
    assert not np.allclose(magnified["p_spiral"], out["p_spiral"], atol=1e-4)


@pytest.mark.slow
def test_predict_on_a_folder_with_mc_dropout_gives_a_spread_not_other_probabilities(
        trained_tiny, tmp_path):
    cfg, _ = trained_tiny
    run = predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                      input=str(Path(cfg.paths.raw) / "images"), output=str(tmp_path / "p.csv"))
    out = predict.run(OmegaConf.merge(run, {"mc_dropout_samples": 20}))
    assert len(out) == 24
    assert (out["mc_dropout_std"] > 0).all()  # tiny dropout model: masks change the answer
    assert (out["entropy"] >= 0).all() and (out["entropy"] <= np.log(3) + 1e-6).all()
    # The probabilities, classes and sets are the ones the card scored, with or without the
    # draws: calibration and conformal coverage were fitted on those.
    plain = predict.run(OmegaConf.merge(run, {"mc_dropout_samples": 0,
                                              "output": str(tmp_path / "q.csv")}))
    np.testing.assert_allclose(out.filter(like="p_").to_numpy(),
                               plain.filter(like="p_").to_numpy(), atol=1e-5)
    assert out["prediction_set"].tolist() == plain["prediction_set"].tolist()


def test_predict_cli_names_a_missing_column(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.yaml").write_text("data: {classes: [a, b]}\nprepare: {image_size: 8}\n")
    (model_dir / "model.keras").write_bytes(b"")
    catalog = tmp_path / "c.csv"
    catalog.write_text("file,label\nx.jpg,a\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", f"model_dir={model_dir}", f"input={catalog}",
         f"output={tmp_path / 'o.csv'}", f"hydra.run.dir={tmp_path / 'h'}"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode != 0
    assert "no column image_column = 'filename'; the catalog has ['file', 'label']" in (
        result.stdout + result.stderr)
    assert not (tmp_path / "o.csv").exists()


def folder_cfg(cfg, tmp_path, output: str, **values):
    return predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"),
                       input=str(Path(cfg.paths.raw) / "images"), output=str(tmp_path / output),
                       **values)


@pytest.mark.slow
def test_three_shards_merged_equal_one_run_row_for_row(trained_tiny, tmp_path):
    cfg, _ = trained_tiny
    common = {"chunk_size": 5, "mc_dropout_samples": 5}
    whole = predict.run(folder_cfg(cfg, tmp_path, "whole.csv", **common))
    written = [predict.run(folder_cfg(cfg, tmp_path, "sharded.csv", shard=k, num_shards=3,
                                      **common)) for k in (2, 0, 1)]
    assert written[0] is None and written[1] is None  # the last shard to finish writes the table
    sharded = pd.read_csv(tmp_path / "sharded.csv")
    pd.testing.assert_frame_equal(sharded, pd.read_csv(tmp_path / "whole.csv"))
    assert len(whole) == 24 and (whole["mc_dropout_std"] > 0).all()
    assert not list(tmp_path.glob(".*.parts"))  # parts removed once the table is written


@pytest.mark.slow
def test_a_killed_prediction_resumes_and_writes_what_an_uninterrupted_run_writes(trained_tiny,
                                                                                 tmp_path):
    cfg, _ = trained_tiny
    args = [f"model_dir={Path(cfg.paths.models) / 'cnn'}",
            f"input={Path(cfg.paths.raw) / 'images'}", "chunk_size=1", "mc_dropout_samples=30",
            f"hydra.run.dir={tmp_path / 'h'}"]
    parts = tmp_path / ".resumed.csv.parts"
    process = subprocess.Popen([sys.executable, "-m", "pipeline.predict", *args,
                                f"output={tmp_path / 'resumed.csv'}"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(parts.glob("chunk-*.csv"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.kill()  # kill -9, part way through
    finally:
        process.wait(timeout=60)
    finished = len(list(parts.glob("chunk-*.csv")))
    assert 4 <= finished < 24, "the run should have been killed part way"
    again = subprocess.run([sys.executable, "-m", "pipeline.predict", *args,
                            f"output={tmp_path / 'resumed.csv'}"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming: {finished} of 24 chunks are finished" in again.stderr + again.stdout
    predict.run(folder_cfg(cfg, tmp_path, "straight.csv", chunk_size=1, mc_dropout_samples=30))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "resumed.csv"),
                                  pd.read_csv(tmp_path / "straight.csv"))


@pytest.mark.slow
def test_parts_from_other_settings_are_discarded_not_mixed(trained_tiny, tmp_path, caplog):
    cfg, _ = trained_tiny
    first = folder_cfg(cfg, tmp_path, "p.csv", chunk_size=5, shard=0, num_shards=2)
    predict.run(first)  # leaves the parts of shard 0
    with caplog.at_level("INFO"):
        table = predict.run(folder_cfg(cfg, tmp_path, "p.csv", chunk_size=5, seed=7))
    assert "discarding 3 part file(s)" in caplog.text
    assert len(table) == 24


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".fits", ".vot", ".ecsv"])
def test_tables_carry_the_catalog_columns_units_and_provenance(trained_tiny, tmp_path, suffix):
    from astropy.io.votable import parse
    from astropy.table import Table

    cfg, _ = trained_tiny
    catalog = pd.read_csv(Path(cfg.paths.raw) / "catalog.csv", dtype=str)
    user = tmp_path / "survey.csv"
    catalog.assign(file=[str(Path(cfg.paths.raw) / f) for f in catalog["file"]]).to_csv(
        user, index=False)
    out = tmp_path / f"morphologies{suffix}"
    predict.run(predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"), input=str(user),
                            image_column="file", output=str(out), mc_dropout_samples=0))
    table = Table.read(out)
    assert table.colnames[:5] == ["objid", "ra", "dec", "label", "file"]
    assert table.colnames[-9:] == ["predicted", "p_elliptical", "p_spiral", "p_edge_on",
                                   "entropy", "mc_dropout_std", "prediction_set", "set_size",
                                   "image_kind"]
    assert len(table) == 24 and table["ra"].unit == "deg" and table["dec"].unit == "deg"
    assert table["ra"].dtype.kind == "f" and table["r_eff_arcsec"].dtype.kind == "f"
    assert " ".join(table["entropy"].description.split()).endswith("in nats (natural log)")
    assert table["p_spiral"].description.startswith("probability of class spiral")
    np.testing.assert_allclose(table["p_elliptical"] + table["p_spiral"] + table["p_edge_on"], 1,
                               atol=1e-5)
    meta = ({i.name: i.value for i in parse(str(out)).resources[0].infos} if suffix == ".vot"
            else table.meta)
    assert meta["CLASSES"] == "elliptical,spiral,edge_on" and meta["TTA"] == "dihedral"
    assert str(meta["MODEL"]).endswith("cnn") and "PIPEVER" in meta and "DATE" in meta
    assert meta["TRAINKND"] == "flux" and table["image_kind"].description.startswith(
        "the cutout's kind: display")
    if suffix == ".vot":
        fields = {f.name: f for f in parse(str(out)).resources[0].tables[0].fields}
        assert fields["ra"].ucd == "pos.eq.ra;meta.main"


@pytest.mark.slow
def test_unreadable_images_are_listed_and_too_many_fail(trained_tiny, tmp_path):
    import shutil

    cfg, _ = trained_tiny
    images = tmp_path / "images"
    shutil.copytree(Path(cfg.paths.raw) / "images", images)
    broken = sorted(images.iterdir())[:2]
    for path in broken:
        path.write_bytes(b"SIMPLE  = broken")
    run = predict_cfg(model_dir=str(Path(cfg.paths.models) / "cnn"), input=str(images),
                      output=str(tmp_path / "out" / "p.csv"), mc_dropout_samples=0)
    with pytest.raises(predict.PredictError, match=r"2 of 24 images could not be read, more "
                                                   r"than max_bad_fraction = 0.05; all are "
                                                   r"listed in .*p-skipped.csv"):
        predict.run(run)
    listed = pd.read_csv(tmp_path / "out" / "p-skipped.csv")
    assert listed["image"].tolist() == [str(p) for p in broken]
    assert not (tmp_path / "out" / "p.csv").exists()
    table = predict.run(OmegaConf.merge(run, {"max_bad_fraction": 0.1}))
    assert len(table) == 22 and str(broken[0]) not in set(table["image"])


@pytest.mark.slow
def test_a_patch_of_sky_is_queried_fetched_and_classified(trained_tiny, tmp_path):
    from urllib.parse import unquote_plus

    from tests.fake_skyserver import FakeSkyServer, make_galaxies

    cfg, _ = trained_tiny
    galaxies = make_galaxies(4)
    server = FakeSkyServer(galaxies)
    url = server.start()
    try:
        table = predict.run(predict_cfg(
            model_dir=str(Path(cfg.paths.models) / "cnn"), input="region",
            output=str(tmp_path / "field.fits"), mc_dropout_samples=0,
            region={"ra": 150.0, "dec": 2.0, "radius_arcmin": 1.0, "sdss": {
                "skyserver_url": url, "sas_url": f"{url}/sas", "timeout_s": 5,
                "cache_dir": str(tmp_path / "cache"), "jpeg": {"size": 48}}}))
    finally:
        server.stop()
    near = [g for g in galaxies if 60 * np.hypot((g.ra - 150.0) * np.cos(np.deg2rad(2)),
                                                 g.dec - 2.0) <= 1.0]
    assert 0 < len(near) < len(galaxies)  # the cone holds some of the galaxies, not all
    assert sorted(table["objid"]) == sorted(g.objid for g in near)
    assert {"ra", "dec", "petroR90_r", "petroMag_r", "url", "predicted"} <= set(table.columns)
    assert any("fGetNearbyObjEq(150.0, 2.0, 1.0)" in unquote_plus(r) for r in server.requests)
    assert all("width=48" in u for u in table["url"])


def test_a_bad_region_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", "input=region", "region.ra=400",
         "region.dec=2", f"output={tmp_path / 'o.fits'}", f"hydra.run.dir={tmp_path / 'h'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert "config key 'region.ra' = 400.0 is invalid: degrees in [0, 360]" in (
        result.stdout + result.stderr)


@pytest.mark.slow
def test_a_hydra_multirun_over_shard_writes_one_table(trained_tiny, tmp_path):
    cfg, _ = trained_tiny
    out = tmp_path / "sky.ecsv"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", "-m", "shard=0,1", "num_shards=2",
         f"model_dir={Path(cfg.paths.models) / 'cnn'}",
         f"input={Path(cfg.paths.raw) / 'images'}", f"output={out}", "chunk_size=7",
         "mc_dropout_samples=0", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shard 0 is done; 2 chunk(s) of other shards are still to come" in (
        result.stdout + result.stderr)
    from astropy.table import Table

    single = predict.run(folder_cfg(cfg, tmp_path, "single.ecsv", chunk_size=7,
                                    mc_dropout_samples=0))
    table = Table.read(out).to_pandas()
    pd.testing.assert_frame_equal(table[single.columns], single.reset_index(drop=True),
                                  check_dtype=False)


def test_the_table_says_how_each_galaxy_was_framed_and_the_log_names_grey_cutouts(tmp_path,
                                                                                   caplog):
    """gz1 models frame each galaxy by its measured size and centre-crop one they cannot
    measure: the user must be able to tell those rows apart, and the radius is worth having.
    They were trained on colour: a grey cutout is classified, and the log says so."""
    from astropy.io import fits
    from astropy.table import Table

    from pipeline.framing import reframe
    from pipeline.release import available
    from tests.test_release import mock_cutouts

    if "gz1-cnn-v2" not in available():
        pytest.skip("this checkout carries no released gz1-cnn-v2")
    folder = mock_cutouts(tmp_path / "in", n=2)
    galaxy = np.moveaxis(fits.getdata(folder / "g0.fits").astype(np.float32), 0, -1)
    fits.PrimaryHDU(np.moveaxis(reframe(galaxy, zoom=2.0), -1, 0)).writeto(
        folder / "g0_zoomed.fits")
    sky = np.random.default_rng(3).normal(100.0, 5.0, (3, 64, 64)).astype(np.float32)
    fits.PrimaryHDU(sky).writeto(folder / "blank.fits")
    fits.PrimaryHDU(galaxy[..., 1]).writeto(folder / "g0_grey.fits")
    out = tmp_path / "p.fits"
    with caplog.at_level("WARNING", logger="pipeline.predict"):
        predict.run(predict_cfg(model="gz1-cnn-v2", input=str(folder), output=str(out),
                                mc_dropout_samples=0))
    table = Table.read(out, mask_invalid=False)  # NaN stays NaN, not masked
    rows = {Path(str(row["image"])).stem: row for row in table}
    assert [rows[k]["framing"] for k in ("blank", "g0", "g0_grey", "g0_zoomed", "g1")] == \
        ["fixed", "galaxy_size", "galaxy_size", "galaxy_size", "galaxy_size"]
    assert np.isnan(rows["blank"]["radius_px"])
    assert rows["g0"]["radius_px"] > 1 and rows["g1"]["radius_px"] > 1
    assert rows["g0_zoomed"]["radius_px"] / rows["g0"]["radius_px"] == pytest.approx(2, rel=0.15)
    assert table["radius_px"].unit == "pix" and table.meta["FRAMING"] == "galaxy_size"
    assert f"1 of 5 galaxies had no measurable size and were centre-cropped instead (framing " \
           f"= fixed in the table; first: {folder / 'blank.fits'})" in caplog.text
    assert f"1 of the 5 cutouts classified here are grey (one band, or three identical ones; " \
           f"first: {folder / 'g0_grey.fits'})" in caplog.text
    # One image is an input too, and gets the row it gets among others.
    one = predict.run(predict_cfg(model="gz1-cnn-v2", input=str(folder / "g1.fits"),
                                  output=str(tmp_path / "one.csv"), mc_dropout_samples=0))
    assert one["image"].tolist() == [str(folder / "g1.fits")]
    np.testing.assert_allclose(one.filter(like="p_").to_numpy()[0],
                               [rows["g1"][c] for c in one.filter(like="p_").columns], atol=1e-6)


def test_cutouts_of_a_kind_the_model_never_saw_are_named_in_the_log(tmp_path, caplog):
    """The gz1 releases were trained on SkyServer JPEGs: a FITS cutout gets prepare's asinh
    stretch, which they never saw. The table cannot show that, so the log must; JPEGs and
    PNGs, the kind they know, pass without a word."""
    from astropy.io import fits
    from astropy.table import Table
    from PIL import Image

    from pipeline.release import available
    from tests.test_release import mock_cutouts

    if "gz1-cnn-v2" not in available():
        pytest.skip("this checkout carries no released gz1-cnn-v2")
    folder = mock_cutouts(tmp_path / "in", n=2)
    flux = np.moveaxis(fits.getdata(folder / "g1.fits").astype(np.float32), 0, -1)
    scaled = np.arcsinh((flux - np.median(flux)) / flux.std())
    display = np.clip(255 * scaled / scaled.max(), 0, 255).astype(np.uint8)
    Image.fromarray(display).save(folder / "g1_display.png")
    with caplog.at_level("WARNING", logger="pipeline.predict"):
        predict.run(predict_cfg(model="gz1-cnn-v2", input=str(folder),
                                output=str(tmp_path / "p.fits"), mc_dropout_samples=0))
    # The table outlives the log: each row's kind, and the kinds the model was trained on.
    table = Table.read(tmp_path / "p.fits")
    kinds = {Path(str(row["image"])).name: str(row["image_kind"]) for row in table}
    assert kinds == {"g0.fits": "flux", "g1.fits": "flux", "g1_display.png": "display"}
    assert table.meta["TRAINKND"] == "display"
    warnings = [r.getMessage() for r in caplog.records if "never saw" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert warnings[0].startswith(
        "2 of the 3 cutouts classified here are flux images (FITS or float TIFF, given an "
        "asinh stretch), a kind that ")
    assert (f"gz1-cnn-v2 never saw (first: {folder / 'g0.fits'}): it was trained on 2,726 "
            "display images (JPEG, PNG or integer TIFF, stretched by whoever made them, only "
            "rescaled). Its card's figures do not hold for them") in warnings[0]
