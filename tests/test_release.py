"""Released models: made from a trained bundle, shipped in the package, used by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from pipeline import predict
from pipeline.artifacts import CUTOUT_MARK, MODEL_NAME, TrainedModel, file_sha256
from pipeline.release import CUTOUT_NOTE, ReleaseError, available, make_release, release_dir
from tests.conftest import REPO, shared_path


def predict_cfg(**values):
    return OmegaConf.merge(OmegaConf.load(REPO / "conf" / "predict.yaml"), values)


@pytest.mark.slow
def test_a_release_is_the_bundle_without_optimizer_state_and_predicts_by_name(
        trained_tiny, tmp_path, monkeypatch):
    from pipeline import report

    cfg, _ = trained_tiny
    report.run(cfg)
    source = Path(cfg.paths.models) / "cnn"
    folder = make_release(source, Path(cfg.paths.reports) / "cards", "tiny-cnn", 1,
                          into=tmp_path)
    assert folder.name == "tiny-cnn-v1"
    assert (folder / MODEL_NAME).stat().st_size < (source / MODEL_NAME).stat().st_size
    release = json.loads((folder / "release.json").read_text())
    assert release["trained_model_sha256"] == file_sha256(source / MODEL_NAME)
    assert "Lintott et al." in release["cite"]
    assert json.loads((folder / "model_card.json").read_text())["model_details"]["name"] == "cnn"
    full = (Path(cfg.paths.reports) / "cards" / "cnn.html").read_text()
    shipped = (folder / "model_card.html").read_text()
    assert full.count(CUTOUT_MARK) == 3  # example galaxies, saliency maps, augmented copies
    assert CUTOUT_MARK not in shipped and shipped.count(CUTOUT_NOTE) == 3
    assert shipped.count("data:image/png") == full.count("data:image/png") - 3
    assert 'alt="Learning curves"' in shipped
    # The card names the file users have, not the folder it was trained in.
    shipped_card = json.loads((folder / "model_card.json").read_text())
    assert shipped_card["model_details"]["path"] == "pipeline/released/tiny-cnn-v1/model.keras"
    assert "<code>pipeline/released/tiny-cnn-v1/model.keras</code>" in shipped
    assert f"<code>{source / MODEL_NAME}</code>" in full
    assert f"<code>{source / MODEL_NAME}</code>" not in shipped
    with pytest.raises(ReleaseError, match=r"tiny-cnn-v1 exists: a released version is never "
                                           r"replaced"):
        make_release(source, Path(cfg.paths.reports) / "cards", "tiny-cnn", 1, into=tmp_path)

    monkeypatch.setattr("pipeline.release.RELEASED", tmp_path)
    images = str(Path(cfg.paths.raw) / "images")
    by_name = predict.run(predict_cfg(model="tiny-cnn-v1", input=images,
                                      output=str(tmp_path / "a.csv"), mc_dropout_samples=0))
    by_folder = predict.run(predict_cfg(model_dir=str(source), input=images,
                                        output=str(tmp_path / "b.csv"), mc_dropout_samples=0))
    np.testing.assert_allclose(by_name.filter(like="p_").to_numpy(),
                               by_folder.filter(like="p_").to_numpy(), atol=1e-6)
    with pytest.raises(ReleaseError, match=r"model = 'nope-v9': no released model of that "
                                           r"name; this installation has \['tiny-cnn-v1'\]"):
        release_dir("nope-v9")


def mock_cutouts(folder: Path, n: int = 6) -> Path:
    from astropy.io import fits

    from pipeline.config import compose, validate
    from pipeline.sources.mock import MORPHOLOGIES, render_galaxy

    mock = validate(compose()).data.mock
    folder.mkdir()
    for i in range(n):
        image, _ = render_galaxy(MORPHOLOGIES[i % 3], np.random.default_rng(i), mock)
        fits.PrimaryHDU(image).writeto(folder / f"g{i}.fits")
    return folder


@pytest.mark.parametrize("name", available() or [pytest.param(None, marks=pytest.mark.skip(
    reason="this checkout carries no released model"))])
def test_every_released_model_classifies_galaxies_with_valid_probabilities(name, tmp_path):
    folder = release_dir(name)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 20e6
    table = predict.run(predict_cfg(model=name, input=str(mock_cutouts(tmp_path / "in")),
                                    output=str(tmp_path / "p.csv"), mc_dropout_samples=5))
    proba = table.filter(like="p_").to_numpy()
    assert len(table) == 6 and ((proba >= 0) & (proba <= 1)).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (table["set_size"] >= 1).all() and (table["mc_dropout_std"] >= 0).all()


@pytest.mark.parametrize("name", available() or [pytest.param(None, marks=pytest.mark.skip(
    reason="this checkout carries no released model"))])
def test_a_released_card_ships_no_galaxy_cutouts_but_keeps_its_plots(name):
    """The package redistributes no SDSS / Galaxy Zoo images: the packaged card's figures of
    galaxies are notes, its plots of figures stay."""
    card = (release_dir(name) / "model_card.html").read_text()
    for cutouts in ("Example galaxies", "Saliency maps", "Originals (left) beside augmented"):
        assert f'alt="{cutouts}' not in card
    assert card.count(CUTOUT_NOTE) >= 3  # and one per cross-check, for cards made since
    for plot in ("Learning curves", "Confusion matrix", "ROC curves", "Reliability diagram"):
        assert f'alt="{plot}"' in card


@pytest.mark.parametrize("name", available() or [pytest.param(None, marks=pytest.mark.skip(
    reason="this checkout carries no released model"))])
def test_a_released_card_names_the_kind_of_cutout_its_model_never_saw(name):
    """Users read the card before giving a model their FITS: it says what the bundle records."""
    from pipeline.io import KIND_WORDS, unseen_kind

    folder = release_dir(name)
    kinds = json.loads((folder / "train_summary.json").read_text()).get("train_image_kinds")
    card = json.loads((folder / "model_card.json").read_text())
    assert card["training_data"].get("cutouts_per_kind") == kinds
    unseen = unseen_kind(kinds)
    caveats = [c for c in card["caveats_and_recommendations"] if c.startswith("Input kind")]
    if unseen is None:
        assert caveats == []
        return
    assert len(caveats) == 1 and f"never saw {KIND_WORDS[unseen]}" in caveats[0]
    page = (folder / "model_card.html").read_text()
    assert page.count("<li>Input kind: trained on ") == 1
    assert f"never saw {KIND_WORDS[unseen]}" in page


@pytest.fixture(scope="module")
def prepared_from_release_config(tmp_path_factory):
    """The test split a released bundle's config makes of ../shared/data/gz1-dev, prepared
    once for every release whose data, prepare and augment settings agree (fetch and prepare
    of 4,000 cutouts are most of this test's time)."""
    from pipeline import fetch, prepare
    from pipeline.artifacts import load_split
    from pipeline.config import validate

    made: dict[str, dict] = {}

    def split(bundle: TrainedModel) -> dict:
        key = json.dumps(OmegaConf.to_container(OmegaConf.masked_copy(
            bundle.config, ["seed", "data", "prepare", "augment"])), sort_keys=True)
        if key not in made:
            root = tmp_path_factory.mktemp("release_split")
            catalog = shared_path("data", "gz1-dev", "labels.csv")
            cfg = validate(OmegaConf.merge(bundle.config, {
                "data": {"folder": {"catalog": str(catalog)}},
                "paths": {k: str(root / k) for k in ("raw", "prepared", "models", "reports",
                                                     "backup")}}))
            fetch.run(cfg)
            prepare.run(cfg)
            made[key] = load_split(Path(cfg.paths.prepared), "test")
        return made[key]

    return split


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize("name", [n for n in available() if n.startswith("gz1-")] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no gz1 release in this checkout"))])
def test_a_released_cards_figures_match_a_re_evaluation_on_its_split(
        name, prepared_from_release_config):
    """The card's test figures come back when the split it names is prepared again from
    ../shared/data/gz1-dev and scored through the released bundle."""
    from sklearn.metrics import accuracy_score, f1_score

    bundle = TrainedModel.load(release_dir(name))
    test = prepared_from_release_config(bundle)
    predicted = bundle.predict_proba(test["images"].astype(np.float32)).argmax(axis=1)
    card = json.loads((release_dir(name) / "model_card.json").read_text())["metrics"]["test"]
    assert card["n_test"] == len(test["labels"])
    assert accuracy_score(test["labels"], predicted) == pytest.approx(card["accuracy"], abs=1e-9)
    assert f1_score(test["labels"], predicted, average="macro") == pytest.approx(
        card["macro_f1"], abs=1e-9)


@pytest.mark.parametrize("name", available() or [pytest.param(None, marks=pytest.mark.skip(
    reason="this checkout carries no released model"))])
def test_the_list_of_releases_gives_each_cards_test_figures(name):
    import subprocess
    import sys

    listing = subprocess.run([sys.executable, "-m", "pipeline.release", "--list"],
                             capture_output=True, text=True, check=True, timeout=120).stdout
    card = json.loads((release_dir(name) / "model_card.json").read_text())
    test = card["metrics"]["test"]
    row = next(line for line in listing.splitlines() if line.startswith(name + " "))
    assert row.split()[-4:-1] == [str(test["n_test"]), f"{test['accuracy']:.3f}",
                                  f"{test['macro_f1']:.3f}"]
    assert f"model cards: {release_dir(name).parent}/<release>/model_card.html" in listing
