"""Prepare: normalisation to [-1, 1], the stratified split, augmentation only in training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import fetch, prepare
from pipeline.catalog import CatalogError
from pipeline.io import load_arrays
from pipeline.prepare import DataError
from pipeline.preprocess import normalize_display, normalize_flux


def test_flux_normalisation_maps_sky_to_minus_one_and_core_to_plus_one():
    rng = np.random.default_rng(0)
    y, x = np.indices((32, 32))
    galaxy = 5000 * np.exp(-np.hypot(x - 15.5, y - 15.5) / 3)
    image = np.stack([0.5 * galaxy, galaxy, 1.4 * galaxy], axis=-1) + rng.normal(100, 10,
                                                                                 (32, 32, 3))
    out = normalize_flux(image[None], softening_sigmas=3.0, white_percentile=99.5)[0]
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert np.median(out[:5, :5]) < -0.9       # sky (after subtracting its median) is black
    assert out[16, 16].max() > 0.9             # the core is near white
    # One scale for all bands keeps the colour: the redder band stays brighter.
    assert out[14:18, 14:18, 2].mean() > out[14:18, 14:18, 0].mean()


def test_display_normalisation_is_linear_to_minus_one_one():
    out = normalize_display(np.array([[[0, 127.5, 255]]], dtype=np.float32))
    np.testing.assert_allclose(out, [[[-1.0, 0.0, 1.0]]])


def test_prepared_splits_are_stratified_disjoint_and_only_train_is_augmented(prepared_tiny):
    root = Path(prepared_tiny.paths.prepared)
    splits = {s: load_arrays(root / s) for s in ("train", "val", "test")}
    meta = json.loads((root / "meta.json").read_text())
    assert meta["classes"] == ["elliptical", "spiral", "edge_on"]
    for name, arrays in splits.items():
        assert arrays["images"].dtype == np.float16
        assert arrays["images"].shape[1:] == (32, 32, 3)
        assert arrays["images"].min() >= -1 and arrays["images"].max() <= 1
        originals = ~arrays["augmented"]
        assert meta["splits"][name]["galaxies"] == originals.sum()
        per_class = np.bincount(arrays["labels"][originals], minlength=3)
        assert per_class.tolist() == list(meta["splits"][name]["per_class"].values())
    # 8 per class: 70/15/15 rounds to at least one of each class in every split.
    assert all(min(v["per_class"].values()) >= 1 for v in meta["splits"].values())
    ids = {s: set(a["objid"]) for s, a in splits.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    train = splits["train"]
    assert train["augmented"].sum() == 2 * (~train["augmented"]).sum()  # copies: 2
    assert set(train["objid"][train["augmented"]]) <= set(train["objid"][~train["augmented"]])
    assert not splits["val"]["augmented"].any() and not splits["test"]["augmented"].any()
    assert (root / "augmentations.png").stat().st_size > 5000
    # The mock renders FITS: every training cutout is flux, which the model will record.
    assert meta["train_image_kinds"] == {"flux": meta["splits"]["train"]["galaxies"]}


def test_augment_none_adds_no_copies(tmp_path):
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, "augment=none")
    fetch.run(cfg)
    prepare.run(cfg)
    train = load_arrays(Path(cfg.paths.prepared) / "train")
    assert not train["augmented"].any()


def test_changing_the_split_seed_changes_the_split_but_not_the_sizes(prepared_tiny, tmp_path):
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, "prepare.split.seed=99", f"paths.raw={prepared_tiny.paths.raw}")
    prepare.run(cfg)
    a = load_arrays(Path(prepared_tiny.paths.prepared) / "test")["objid"]
    b = load_arrays(Path(cfg.paths.prepared) / "test")["objid"]
    assert len(a) == len(b)
    assert set(a) != set(b)


def split_of_each_galaxy(prepared: Path) -> dict[str, str]:
    return {str(o): name for name in ("train", "val", "test")
            for o in np.load(prepared / name / "objid.npy")}


def test_corrupt_cutout_is_skipped_and_reported_and_moves_no_other_galaxy(tiny_cfg):
    fetch.run(tiny_cfg)
    prepare.run(tiny_cfg)
    prepared = Path(tiny_cfg.paths.prepared)
    before = split_of_each_galaxy(prepared)
    raw = Path(tiny_cfg.paths.raw)
    victim = raw / "images" / "mock0000002.fits"
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated download
    meta = prepare.run(tiny_cfg)
    skipped = pd.read_csv(prepared / "skipped.csv")
    assert meta.n_skipped == 1
    assert skipped["objid"].tolist() == ["mock0000002"]
    assert "mock0000002.fits" in skipped["reason"].iloc[0]
    after = split_of_each_galaxy(prepared)
    assert set(after) == set(before) - {"mock0000002"}
    assert {o: before[o] for o in after} == after


def test_catalog_without_a_label_column_is_refused_by_name(tiny_cfg):
    fetch.run(tiny_cfg)
    catalog = Path(tiny_cfg.paths.raw) / "catalog.csv"
    pd.read_csv(catalog).drop(columns="label").to_csv(catalog, index=False)
    with pytest.raises(DataError, match=r"catalog.csv: missing column\(s\) \['label'\]"):
        prepare.run(tiny_cfg)
    assert not Path(tiny_cfg.paths.prepared).exists()  # nothing half-written


def test_labels_outside_the_scheme_are_refused(tiny_cfg):
    fetch.run(tiny_cfg)
    catalog = Path(tiny_cfg.paths.raw) / "catalog.csv"
    df = pd.read_csv(catalog)
    df.loc[0, "label"] = "merger"
    df.to_csv(catalog, index=False)
    with pytest.raises(DataError, match=r"labels \['merger'\] are not in data.classes"):
        prepare.run(tiny_cfg)


def test_a_class_too_small_to_split_is_refused(tiny_cfg):
    fetch.run(tiny_cfg)
    catalog = Path(tiny_cfg.paths.raw) / "catalog.csv"
    df = pd.read_csv(catalog)
    keep = (df["label"] != "spiral") | (df.groupby("label").cumcount() < 2)
    df[keep].to_csv(catalog, index=False)
    with pytest.raises(CatalogError, match=r"class count\(s\) \{'spiral': 2\} are below 7, the "
                                           r"fewest a stratified split .* can take"):
        prepare.run(tiny_cfg)


def test_interrupted_prepare_leaves_the_old_output_and_a_rerun_equals_a_clean_run(
        prepared_tiny, tmp_path, monkeypatch):
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, f"paths.raw={prepared_tiny.paths.raw}")
    prepare.run(cfg)
    before = (Path(cfg.paths.prepared) / "train" / "images.npy").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C or a dying worker looks like mid-stage

    monkeypatch.setattr(prepare, "save_augmentation_grid", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.run(cfg)
    assert (Path(cfg.paths.prepared) / "train" / "images.npy").read_bytes() == before
    assert not [p for p in Path(cfg.paths.prepared).parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    prepare.run(cfg)
    assert (Path(cfg.paths.prepared) / "train" / "images.npy").read_bytes() == before


def test_streamed_rows_equal_the_array_on_disk(tmp_path):
    from pipeline.io import NpyRows, save_arrays

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (50, 8, 8, 3)).astype(np.float16)
    save_arrays(tmp_path / "split", images=images)
    rows = NpyRows(tmp_path / "split" / "images.npy")
    assert len(rows) == 50 and rows.shape == images.shape and rows.dtype == np.float16
    for idx in ([0, 1, 2, 3], [7, 3, 49], [10, 11, 20, 21, 22, 40]):
        np.testing.assert_array_equal(rows[np.array(idx)], images[idx])
