"""Framing: every galaxy at one apparent size, whatever the cutout's framing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.framing import UnmeasuredError, centred_square, half_light_radius, reframe
from pipeline.preprocess import kind_counts, load_images
from tests.conftest import REPO


def disc(r_eff: float, side: int = 160, seed: int = 0, sky_noise: float = 2.0) -> np.ndarray:
    """An exponential disc (Sersic n=1: ``r_eff`` is its half-light radius) in three bands,
    on a noisy sky, as an 8-bit display image."""
    from astropy.modeling.models import Sersic2D

    y, x = np.mgrid[0:side, 0:side]
    light = Sersic2D(amplitude=1.0, r_eff=r_eff, n=1, x_0=(side - 1) / 2,
                     y_0=(side - 1) / 2)(x, y)
    light = 200 * light / light.max()
    noisy = light[..., None] + np.random.default_rng(seed).normal(10, sky_noise, (side, side, 3))
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def prep(**values):
    base = {"image_size": 48, "center_crop": 0.5, "framing": "galaxy_size",
            "galaxy_radius_fraction": 0.4, "unmeasured": "skip", "softening_sigmas": 3.0,
            "white_percentile": 99.5}
    return OmegaConf.create({**base, **values})


@pytest.mark.parametrize("r_eff", [6.0, 12.0, 24.0])
def test_the_half_light_radius_of_a_disc_is_measured_on_the_image(r_eff):
    # The Kron flux misses a few per cent of an exponential's light, so the circle that holds
    # half of it is a little smaller than the true r_eff.
    assert half_light_radius(disc(r_eff), display=True) == pytest.approx(r_eff, rel=0.12)


def test_blank_cutouts_measured_from_many_threads_at_once_raise_only_unmeasured():
    """predict and prepare decode (and measure) cutouts in threads. Silencing photutils' "no
    sources" warning must hold for every thread at once, or a stray warning escapes (an error
    under ``-W error``, and under this suite's settings)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    blank = [rng.normal(0, 1, (64, 64, 3)).astype(np.float32) for _ in range(32)]

    def measure(image):
        try:
            half_light_radius(image, display=False)
        except UnmeasuredError:
            return "unmeasured"
        return "measured"

    with ThreadPoolExecutor(8) as pool:
        for _ in range(10):
            answers = list(pool.map(measure, blank))
            assert set(answers) <= {"unmeasured", "measured"}


def test_the_radius_follows_the_galaxy_when_the_cutout_is_reframed():
    image = disc(10.0, side=200)
    one = half_light_radius(image, display=True)
    for zoom in (0.5, 2.0):
        copy = np.clip(reframe(image, zoom=zoom, seed=1), 0, 255)
        assert half_light_radius(copy, display=True) / one == pytest.approx(zoom, rel=0.1)
    coarse = np.clip(reframe(image, resample=0.5), 0, 255)
    assert half_light_radius(coarse, display=True) / one == pytest.approx(0.5, rel=0.1)


def test_padding_beyond_the_frame_is_the_frames_own_sky():
    image = disc(5.0, side=64)
    padded = centred_square(image, 128, seed=3)
    assert padded.shape == (128, 128, 3) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[32:96, 32:96], image)
    sky = padded[:16].astype(float)
    border = image[:4].astype(float)
    assert sky.mean() == pytest.approx(border.mean(), abs=1.0)
    assert sky.std() == pytest.approx(border.std(), rel=0.25)
    np.testing.assert_array_equal(padded, centred_square(image, 128, seed=3))


def write_pngs(folder: Path, images: dict[str, np.ndarray]) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for name, image in images.items():
        path = folder / f"{name}.png"
        Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_galaxy_size_framing_shows_a_galaxy_alike_at_any_zoom_where_a_fixed_crop_does_not(
        tmp_path):
    image = disc(14.0, side=200)
    copies = {f"z{z:g}": reframe(image, zoom=z, seed=1) for z in (1.0, 0.5, 2.0, 3.0)}
    paths = write_pngs(tmp_path, copies)
    sized, kept, skipped, *_ = load_images(paths, prep(), progress=False)
    fixed = load_images(paths, prep(framing="fixed"), progress=False).images
    assert kept.all() and not skipped
    for k in range(1, len(paths)):
        galaxy_size_change = np.abs(sized[k] - sized[0]).mean()
        fixed_change = np.abs(fixed[k] - fixed[0]).mean()
        assert galaxy_size_change < 0.05, paths[k].name
        assert fixed_change > 3 * galaxy_size_change, paths[k].name


def test_a_cutout_with_no_galaxy_at_its_centre_is_skipped_or_centre_cropped_as_configured(
        tmp_path, caplog):
    sky = np.random.default_rng(0).normal(10, 2, (96, 96, 3))
    paths = write_pngs(tmp_path, {"galaxy": disc(6.0, side=96), "blank": sky})
    with pytest.raises(UnmeasuredError, match="no source 3 sky sigmas above the sky"):
        half_light_radius(np.clip(sky, 0, 255).round(), display=True)
    _, kept, skipped, radius, *_ = load_images(paths, prep(), progress=False)
    assert kept.tolist() == [True, False]
    assert str(paths[1]) in skipped[0]["reason"]
    assert "prepare.unmeasured = fixed" in skipped[0]["reason"]
    assert radius[0] == pytest.approx(6.0, rel=0.15) and np.isnan(radius[1])
    with caplog.at_level("WARNING", logger="pipeline.preprocess"):
        _, kept, skipped, radius, *_ = load_images(paths, prep(unmeasured="fixed"), progress=False)
    assert kept.all() and not skipped
    # The centre-cropped one says so: no radius.
    assert radius[0] == pytest.approx(6.0, rel=0.15) and np.isnan(radius[1])
    assert f"1 cutout(s) had no measurable galaxy size and got the fixed centre crop " \
           f"(prepare.unmeasured = fixed); first: {paths[1]}" in caplog.text


@pytest.mark.parametrize(("key", "value", "message"), [
    ("prepare.framing", "tight", "'prepare.framing' = 'tight' is invalid: fixed"),
    ("prepare.galaxy_radius_fraction", 0, "'prepare.galaxy_radius_fraction' = 0.0 is invalid"),
    ("prepare.unmeasured", "drop", "'prepare.unmeasured' = 'drop' is invalid: skip"),
    ("evaluate.framing_zooms", [0.5, 40], "'evaluate.framing_zooms' = [0.5, 40.0] is invalid"),
])
def test_framing_settings_out_of_range_are_refused_by_name(key, value, message):
    from pipeline.config import compose, validate
    from pipeline.errors import ConfigError

    cfg = compose()
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(cfg)


@pytest.mark.slow
def test_evaluate_scores_reframed_test_galaxies_and_the_card_shows_them(trained_tiny, tmp_path):
    from pipeline import evaluate, report
    from pipeline.artifacts import TrainedModel, load_split

    cfg, _ = trained_tiny
    metrics = json.loads((Path(cfg.paths.reports) / "cnn" / "metrics.json").read_text())
    stress = metrics["framing_stress"]
    assert list(stress) == ["zoom 0.5x", "zoom 2x", "zoom 4x", "pixels 2x larger"]
    assert all(0 <= v["accuracy"] <= 1 and 0 <= v["macro_f1"] <= 1 for v in stress.values())
    # Reframed by 1x, the raw cutouts give back the test split's own score.
    bundle = TrainedModel.load(Path(cfg.paths.models) / "cnn")
    same = evaluate.framing_stress(bundle, Path(cfg.paths.raw),
                                   load_split(Path(cfg.paths.prepared), "test"), [1.0], [])
    assert same["zoom 1x"]["accuracy"] == pytest.approx(metrics["accuracy"],
                                                        abs=1.01 / metrics["n_test"])
    report.run(cfg)
    card = (Path(cfg.paths.reports) / "cards" / "cnn.md").read_text()
    assert "### Framing" in card and "| zoom 4x |" in card
    assert f"| as trained | {metrics['accuracy']:.3f} |" in card


@pytest.mark.slow
def test_predict_frames_new_cutouts_as_the_models_bundle_says(trained_tiny, tmp_path):
    """A bundle trained with galaxy_size framing classifies a galaxy alike at any zoom."""
    import shutil

    from astropy.io import fits

    from pipeline import predict
    from pipeline.artifacts import CONFIG_NAME

    cfg, _ = trained_tiny
    model = shutil.copytree(Path(cfg.paths.models) / "cnn", tmp_path / "model")
    config = OmegaConf.load(model / CONFIG_NAME)
    config.prepare.framing, config.prepare.galaxy_radius_fraction = "galaxy_size", 0.4
    OmegaConf.save(config, model / CONFIG_NAME)
    raw = sorted((Path(cfg.paths.raw) / "images").glob("*.fits"))[:6]
    folder = tmp_path / "in"
    folder.mkdir()
    for path in raw:
        image = np.moveaxis(fits.getdata(path).astype(np.float32), 0, -1)
        for zoom in (1.0, 2.0):
            copy = np.moveaxis(reframe(image, zoom=zoom), -1, 0)
            fits.PrimaryHDU(copy).writeto(folder / f"{path.stem}_z{zoom:g}.fits")
    table = predict.run(OmegaConf.merge(OmegaConf.load(REPO / "conf" / "predict.yaml"), {
        "model_dir": str(model), "input": str(folder), "output": str(tmp_path / "p.csv"),
        "mc_dropout_samples": 0}))
    table = table.sort_values("image")
    proba = table.filter(like="p_").to_numpy()
    one, two = proba[0::2], proba[1::2]
    assert [Path(p).name for p in table["image"]][:2] == [f"{raw[0].stem}_z1.fits",
                                                          f"{raw[0].stem}_z2.fits"]
    assert np.abs(one - two).mean() < 0.1


def test_catalog_radius_framing_crops_each_galaxy_to_the_radius_its_catalog_gives(tmp_path):
    import pandas as pd

    from pipeline.preprocess import catalog_radii

    image = disc(14.0, side=200)
    zooms = (1.0, 0.5, 2.0)
    paths = write_pngs(tmp_path, {f"z{z:g}": reframe(image, zoom=z, seed=1) for z in zooms})
    # the radius in arcsec at 0.5"/px, as a catalog such as SDSS's petroR90_r gives it
    table = pd.DataFrame({"image": paths, "r_arcsec": [14.0 * z * 0.5 for z in zooms]})
    framing = prep(framing="catalog_radius", radius_column="r_arcsec", radius_unit="arcsec",
                   pixel_scale=0.5)
    radii = catalog_radii(table, framing, "my.csv")
    np.testing.assert_allclose(radii, [14.0, 7.0, 28.0])
    views, kept, skipped, *_ = load_images(paths, framing, progress=False, radii=radii)
    assert kept.all() and not skipped
    for k in (1, 2):  # the same apparent size at any zoom, as the catalog says
        assert np.abs(views[k] - views[0]).mean() < 0.05, paths[k].name
    # the view follows the catalog, not the image: a radius twice too large shrinks the galaxy
    wrong = load_images(paths[:1], framing, progress=False, radii=radii[:1] * 2).images
    assert np.abs(wrong[0] - views[0]).mean() > 3 * np.abs(views[1] - views[0]).mean()
    in_pixels = catalog_radii(table.assign(r_px=[14.0, 7.0, 28.0]), prep(
        framing="catalog_radius", radius_column="r_px", radius_unit="pixels"), "my.csv")
    np.testing.assert_allclose(in_pixels, radii)


def test_a_galaxy_without_a_catalog_radius_is_skipped_or_centre_cropped_and_a_missing_column_named(
        tmp_path):
    import pandas as pd

    from pipeline.catalog import CatalogError
    from pipeline.preprocess import catalog_radii

    paths = write_pngs(tmp_path, {"a": disc(6.0, side=96), "b": disc(6.0, side=96)})
    framing = prep(framing="catalog_radius", radius_column="petroR90_r", radius_unit="pixels")
    radii = catalog_radii(pd.DataFrame({"petroR90_r": [6.0, "-"]}), framing, "my.csv")
    _, kept, skipped, radius, *_ = load_images(paths, framing, progress=False, radii=radii)
    assert kept.tolist() == [True, False]
    assert radius[0] == 6.0 and np.isnan(radius[1])
    assert skipped[0]["reason"] == (
        f"{paths[1]}: cannot measure the galaxy's size (the catalog's radius (nan pixels) is not "
        "a positive number); prepare.framing = catalog_radius skips it (prepare.unmeasured = "
        "fixed would centre-crop it)")
    kept = load_images(paths, prep(framing="catalog_radius", radius_column="petroR90_r",
                                   radius_unit="pixels", unmeasured="fixed"),
                       progress=False, radii=radii).kept
    assert kept.all()
    with pytest.raises(CatalogError, match=r"my.csv: no column 'petroR90_r' \(prepare.radius_"
                                           r"column\) with each galaxy's radius, which prepare."
                                           r"framing = catalog_radius needs; the catalog has "
                                           r"\['image'\]"):
        catalog_radii(pd.DataFrame({"image": paths}), framing, "my.csv")


@pytest.mark.parametrize(("overrides", "message"), [
    (["prepare.framing=catalog_radius"], "'prepare.radius_column' = None is invalid: the "
                                         "catalog column with each galaxy's radius"),
    (["prepare.framing=catalog_radius", "prepare.radius_column=petroR90_r"],
     "'prepare.pixel_scale' = None is invalid: the cutouts' arcsec per pixel"),
    (["prepare.framing=catalog_radius", "prepare.radius_column=r", "prepare.radius_unit=deg"],
     "'prepare.radius_unit' = 'deg' is invalid: arcsec"),
])
def test_catalog_radius_framing_names_the_key_it_still_needs(overrides, message):
    from pipeline.config import compose, validate
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose(overrides))


@pytest.mark.slow
def test_predict_frames_new_cutouts_by_the_catalog_radius_the_bundle_names(trained_tiny,
                                                                          tmp_path):
    """A bundle framed by a catalog radius reads that column from predict's input catalog, and
    says so in one line when the input has none (a folder)."""
    import shutil

    import pandas as pd
    from astropy.io import fits

    from pipeline import predict
    from pipeline.artifacts import CONFIG_NAME
    from pipeline.catalog import CatalogError

    cfg, _ = trained_tiny
    model = shutil.copytree(Path(cfg.paths.models) / "cnn", tmp_path / "model")
    config = OmegaConf.load(model / CONFIG_NAME)
    config.prepare.framing, config.prepare.galaxy_radius_fraction = "catalog_radius", 0.3
    config.prepare.radius_column, config.prepare.radius_unit = "r_eff_arcsec", "arcsec"
    config.prepare.pixel_scale = float(cfg.data.mock.pixel_scale)
    OmegaConf.save(config, model / CONFIG_NAME)
    raw = pd.read_csv(Path(cfg.paths.raw) / "catalog.csv").head(6)
    folder, rows = tmp_path / "in", []
    folder.mkdir()
    for galaxy in raw.itertuples():
        image = np.moveaxis(fits.getdata(Path(cfg.paths.raw) / galaxy.file).astype(np.float32),
                            0, -1)
        for zoom in (1.0, 2.0):  # a copy twice as tight: its catalog radius is twice as many px
            name = f"{galaxy.objid}_z{zoom:g}.fits"
            fits.PrimaryHDU(np.moveaxis(reframe(image, zoom=zoom), -1, 0)).writeto(folder / name)
            rows.append({"image": f"in/{name}", "r_eff_arcsec": galaxy.r_eff_arcsec * zoom})
    pd.DataFrame(rows).to_csv(tmp_path / "in.csv", index=False)
    settings = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "predict.yaml"), {
        "model_dir": str(model), "input": str(tmp_path / "in.csv"), "image_column": "image",
        "output": str(tmp_path / "p.csv"), "mc_dropout_samples": 0})
    table = predict.run(settings)
    proba = table.filter(like="p_").to_numpy()
    assert proba.shape == (12, 3) and not np.isnan(proba).any()  # none skipped
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(proba[0::2] - proba[1::2]).mean() < 0.1
    # evaluate's stress test scales each test galaxy's catalog radius with its reframing
    from pipeline.artifacts import TrainedModel, load_split
    from pipeline.evaluate import framing_stress

    stress = framing_stress(TrainedModel.load(model), Path(cfg.paths.raw),
                            load_split(Path(cfg.paths.prepared), "test"), [0.5, 2.0], [2.0])
    assert [v["skipped"] for v in stress.values()] == [0, 0, 0]
    assert all(0 <= v["accuracy"] <= 1 for v in stress.values())
    with pytest.raises(CatalogError, match=r"input = .*in \(a folder: give a catalog CSV with an "
                                           r"image column and this one\): no column "
                                           r"'r_eff_arcsec' \(prepare.radius_column\)"):
        predict.run(OmegaConf.merge(settings, {"input": str(folder),
                                               "output": str(tmp_path / "q.csv")}))


def test_the_card_says_which_catalog_column_a_model_is_framed_by():
    from pipeline.report import framing_description

    text = framing_description(prep(framing="catalog_radius", radius_column="petroR90_r",
                                    radius_unit="arcsec", pixel_scale=0.396,
                                    galaxy_radius_fraction=0.8))
    assert text == ("each galaxy cropped so that the radius in its catalog's column `petroR90_r` "
                    "(arcsec at 0.396 arcsec per pixel) spans 80% of the view's half-width "
                    "(`prepare.framing=catalog_radius`): new cutouts need that column too")


def test_reading_on_several_threads_gives_what_one_thread_gives(tmp_path):
    """prepare, predict and evaluate decode cutouts on several threads; which thread read
    which file must not change a pixel, a skip, a radius or the kind recorded."""
    from astropy.io import fits

    paths = write_pngs(tmp_path, {f"d{k}": disc(5.0 + k, side=96, seed=k) for k in range(5)})
    for k in range(3):  # flux cutouts, (3, H, W) cubes: given the asinh stretch
        cube = np.moveaxis(disc(7.0 + k, side=96, seed=10 + k).astype(np.float32), -1, 0)
        fits.PrimaryHDU(cube).writeto(tmp_path / f"f{k}.fits")
        paths.append(tmp_path / f"f{k}.fits")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    paths.insert(3, tmp_path / "broken.png")
    one, many = (load_images(paths, prep(), progress=False, workers=w) for w in (1, 3))
    assert one.kept.sum() == 8 and [s["file"] for s in one.skipped] == [str(paths[3])]
    np.testing.assert_array_equal(one.images[one.kept], many.images[one.kept])
    np.testing.assert_array_equal(one.kept, many.kept)
    np.testing.assert_array_equal(one.radius_px, many.radius_px)
    np.testing.assert_array_equal(one.flux, many.flux)
    assert one.skipped == many.skipped
    assert kind_counts(one.flux[one.kept]) == {"flux": 3, "display": 5}
