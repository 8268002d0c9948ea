"""The labelled-folder source: a user's catalog CSV plus JPEG/PNG/FITS images of any size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from PIL import Image

from pipeline import fetch, prepare
from pipeline.sources.folder import CatalogError, safe_name
from tests.conftest import tiny_config


def galaxy_rgb(size: int, elongation: float, rng) -> np.ndarray:
    y, x = np.indices((size, size))
    c = (size - 1) / 2
    sigma = size / 10
    img = 230 * np.exp(-0.5 * (((x - c) / sigma) ** 2 + ((y - c) / (sigma * elongation)) ** 2))
    return np.clip(img[..., None] * [1.0, 0.9, 0.7] + rng.normal(8, 3, (size, size, 3)), 0, 255)


def make_folder(root: Path, n_per_label: int = 7) -> Path:
    """A catalog with raw labels, subfolders, mixed formats and sizes, like a user's."""
    rng = np.random.default_rng(0)
    rows = []
    (root / "imgs" / "sub").mkdir(parents=True)
    for label, elong in (("E", 1.0), ("S_cw", 0.7), ("S_acw", 0.7), ("EDGE", 0.2),
                         ("merger", 0.5)):
        for i in range(n_per_label):
            size = [48, 64, 80][i % 3]
            rgb = galaxy_rgb(size, elong, rng).astype(np.uint8)
            if i % 3 == 2:
                name = f"imgs/sub/{label}_{i}.fits"
                fits.PrimaryHDU(np.moveaxis(rgb.astype(np.float32), -1, 0)).writeto(root / name)
            else:
                name = f"imgs/{label}_{i}.{'png' if i % 3 else 'jpg'}"
                Image.fromarray(rgb).save(root / name)
            rows.append({"filename": name, "morph": label, "id": f"{label}-{i}"})
    catalog = root / "catalog.csv"
    pd.DataFrame(rows).to_csv(catalog, index=False)
    return catalog


def folder_cfg(tmp_path: Path, catalog: Path, *extra: str):
    return tiny_config(
        tmp_path / "run", "data=folder", f"data.folder.catalog={catalog}",
        "data.folder.label_column=morph", "data.folder.id_column=id",
        "+data.folder.label_map={E: elliptical, S_cw: spiral, S_acw: spiral, EDGE: edge_on}",
        *extra)


def test_spreadsheet_spaces_are_ignored_and_a_label_off_by_case_is_named(tmp_path, caplog):
    catalog = make_folder(tmp_path / "user")
    table = pd.read_csv(catalog, dtype=str)
    elliptical = table.index[table["morph"] == "E"]
    table.loc[elliptical[:3], "morph"] = "E "  # a trailing space from a spreadsheet
    table.loc[table.index[table["morph"] == "S_cw"][:2], "morph"] = "s_cw"
    table.to_csv(catalog, index=False)
    with caplog.at_level("WARNING"):
        out = fetch.run(folder_cfg(tmp_path, catalog))
    assert out["label"].value_counts().to_dict() == {"spiral": 12, "elliptical": 7, "edge_on": 7}
    assert "dropped 9 galaxies whose label is not in data.folder.label_map: {'merger': 7, " \
           "'s_cw': 2}; {'s_cw': 'S_cw'} differ from the map's labels only by case: add them " \
           "to data.folder.label_map if they are the same class" in caplog.text


def test_folder_source_maps_labels_drops_unmapped_and_copies_images(tmp_path, caplog):
    catalog = make_folder(tmp_path / "user")
    cfg = folder_cfg(tmp_path, catalog)
    with caplog.at_level("INFO"):
        out = fetch.run(cfg)
    assert "dropped 7 galaxies whose label is not in data.folder.label_map: {'merger': 7}" \
        in caplog.text
    assert out["label"].value_counts().to_dict() == {"spiral": 14, "elliptical": 7, "edge_on": 7}
    raw = Path(cfg.paths.raw)
    assert all((raw / f).is_file() for f in out["file"])
    assert {Path(f).suffix for f in out["file"]} == {".jpg", ".png", ".fits"}
    assert out.loc[out.objid == "S_cw-2", "source_file"].item() == "imgs/sub/S_cw_2.fits"
    meta = prepare.run(cfg)  # mixed sizes and formats prepare to one shape
    assert sum(v.galaxies for v in meta.splits.values()) == 28


def test_ids_cannot_escape_the_data_folder(tmp_path):
    assert safe_name("../../etc/passwd") == "etc_passwd"
    assert safe_name("/abs/path") == "abs_path"
    assert safe_name("..") == "unnamed"
    catalog = make_folder(tmp_path / "user")
    df = pd.read_csv(catalog)
    df.loc[0, "id"] = "../../../escape"
    df.to_csv(catalog, index=False)
    out = fetch.run(folder_cfg(tmp_path, catalog))
    assert "escape" in out["objid"].iloc[0]
    assert not (tmp_path / "escape.jpg").exists()
    assert all(Path(f).parent == Path("images") for f in out["file"])


def test_missing_column_is_named(tmp_path):
    catalog = make_folder(tmp_path / "user", n_per_label=1)
    cfg = folder_cfg(tmp_path, catalog, "data.folder.label_column=klass")
    with pytest.raises(CatalogError, match=r"missing column\(s\) \['klass'\]"):
        fetch.run(cfg)
    assert not Path(cfg.paths.raw).exists()


def test_label_map_onto_unknown_class_is_refused(tmp_path):
    catalog = make_folder(tmp_path / "user", n_per_label=1)
    cfg = folder_cfg(tmp_path, catalog, "data.folder.label_map.E=lenticular")
    with pytest.raises(CatalogError, match=r"maps onto \['lenticular'\], which are not in"):
        fetch.run(cfg)


def test_broken_images_are_listed_and_too_many_fail_the_run(tmp_path):
    catalog = make_folder(tmp_path / "user", n_per_label=9)
    (tmp_path / "user" / "imgs" / "E_0.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (tmp_path / "user" / "imgs" / "E_1.png").write_bytes(b"")
    cfg = folder_cfg(tmp_path, catalog, "data.max_bad_fraction=0.2")
    out = fetch.run(cfg)
    failures = pd.read_csv(Path(cfg.paths.raw) / "failures.csv")
    assert sorted(failures["objid"]) == ["E-0", "E-1"]
    assert "file is empty" in failures.set_index("objid").loc["E-1", "reason"]
    assert len(out) == 34
    strict = folder_cfg(tmp_path / "strict", catalog, "data.max_bad_fraction=0.05")
    kept = Path(strict.paths.raw).with_name("raw-failures.csv")
    with pytest.raises(CatalogError, match=r"2 of 36 galaxies \(5.6%\) could not be used, more "
                                           rf"than data.max_bad_fraction = 0.05; all are listed "
                                           rf"in {kept}"):
        fetch.run(strict)
    assert sorted(pd.read_csv(kept)["objid"]) == ["E-0", "E-1"]  # kept where the message says
    assert not Path(strict.paths.raw).exists()


def test_nan_pixels_in_fits_are_refused(tmp_path):
    catalog = make_folder(tmp_path / "user", n_per_label=9)
    with fits.open(tmp_path / "user" / "imgs" / "sub" / "E_2.fits", mode="update") as hdul:
        hdul[0].data[0, 5, 5] = np.nan
    cfg = folder_cfg(tmp_path, catalog, "data.max_bad_fraction=0.5")
    fetch.run(cfg)
    failures = pd.read_csv(Path(cfg.paths.raw) / "failures.csv")
    assert failures["reason"].str.contains("E_2.fits: 1 NaN or inf pixels").any()


@pytest.mark.shared_data
def test_gz1_dev_folder_maps_to_three_classes(tmp_path):
    from pipeline.config import compose, validate
    from pipeline.sources.folder import read_user_catalog
    from tests.conftest import shared_path

    shared_path("data", "gz1-dev", "labels.csv")
    cfg = validate(compose(["experiment=gz1",
                            f"data.folder.catalog={shared_path('data', 'gz1-dev', 'labels.csv')}"]))
    catalog, root = read_user_catalog(cfg.data.folder)
    mapped = catalog["class_name"].map(dict(cfg.data.folder.label_map)).value_counts()
    assert mapped.to_dict() == {"elliptical": 2787, "edge_on": 599, "spiral": 509}
    assert (root / catalog["filename"].iloc[0]).is_file()


def test_kept_catalog_columns_reach_prepare_which_frames_each_galaxy_by_its_radius(tmp_path):
    catalog = make_folder(tmp_path / "user")
    table = pd.read_csv(catalog)
    # galaxy_rgb draws a Gaussian of sigma = side / 10, whose half-light radius is 1.18 sigma
    sides = [[48, 64, 80][(k % 7) % 3] for k in range(len(table))]
    table["r_half"] = [1.177 * side / 10 for side in sides]
    table.to_csv(catalog, index=False)
    cfg = folder_cfg(tmp_path, catalog, "data.folder.keep_columns=[r_half]",
                     "prepare.framing=catalog_radius", "prepare.radius_column=r_half",
                     "prepare.radius_unit=pixels")
    out = fetch.run(cfg)
    raw_catalog = pd.read_csv(Path(cfg.paths.raw) / "catalog.csv")
    assert raw_catalog.set_index("objid")["r_half"].to_dict() == pytest.approx(
        table.set_index("id")["r_half"].drop([f"merger-{i}" for i in range(7)]).to_dict())
    assert len(out) == 28
    meta = prepare.run(cfg)
    assert meta.framing == "catalog_radius" and meta.n_skipped == 0
    assert sum(v.galaxies for v in meta.splits.values()) == 28


def test_a_kept_column_the_catalog_lacks_is_named(tmp_path):
    catalog = make_folder(tmp_path / "user", n_per_label=1)
    cfg = folder_cfg(tmp_path, catalog, "data.folder.keep_columns=[petroR90_r]")
    with pytest.raises(CatalogError, match=r"missing column\(s\) \['petroR90_r'\]"):
        fetch.run(cfg)
