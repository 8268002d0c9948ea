"""Framing: every galaxy at one apparent size, whatever the cutout's framing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from pipeline.framing import UnmeasuredError, centred_square, half_light_radius, reframe
from pipeline.preprocess import load_images
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
    sized, kept, skipped = load_images(paths, prep(), progress=False)
    fixed, _, _ = load_images(paths, prep(framing="fixed"), progress=False)
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
    _, kept, skipped = load_images(paths, prep(), progress=False)
    assert kept.tolist() == [True, False]
    assert str(paths[1]) in skipped[0]["reason"]
    assert "prepare.unmeasured = fixed" in skipped[0]["reason"]
    with caplog.at_level("WARNING", logger="pipeline.preprocess"):
        _, kept, skipped = load_images(paths, prep(unmeasured="fixed"), progress=False)
    assert kept.all() and not skipped
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
