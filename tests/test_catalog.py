"""Users' catalog CSVs: any bytes give a table or one error that names the file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.catalog import CatalogError, drop_duplicate_galaxies, read_csv_catalog

GOOD = b"id,filename,label\ng1,a.png,elliptical\ng2,b.png,spiral\n"


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=600),
    st.builds(lambda cut, junk: GOOD[:cut] + junk, st.integers(0, len(GOOD)),
              st.binary(max_size=40)),
    st.text(alphabet=st.sampled_from('ab,"\n\r\té;'), max_size=200).map(
        lambda t: t.encode("utf-8"))))
def test_any_bytes_give_a_table_or_a_named_error(tmp_path, data):
    path = tmp_path / "catalog.csv"
    path.write_bytes(data)
    try:
        table = read_csv_catalog(path, "data.folder.catalog")
    except CatalogError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    assert len(table) >= 1 and table.columns.is_unique
    assert all(table[c].map(type).eq(str).all() for c in table.columns)


def test_excel_byte_order_mark_and_blank_lines_are_fine(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"\xef\xbb\xbfid,label\n\ng1,spiral\n\n")
    table = read_csv_catalog(path, "data.folder.catalog")
    assert list(table.columns) == ["id", "label"] and table["id"].tolist() == ["g1"]


def test_a_repeated_header_name_is_refused(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"id,label,label\ng1,a,b\n")
    with pytest.raises(CatalogError, match=r"column name\(s\) \['label'\] appear more than once"):
        read_csv_catalog(path, "data.folder.catalog")


def test_duplicates_chain_through_ids_and_bytes(tmp_path):
    (tmp_path / "a.png").write_bytes(b"A")
    (tmp_path / "b.png").write_bytes(b"B")
    (tmp_path / "c.png").write_bytes(b"A")  # the same bytes as a.png
    catalog = pd.DataFrame({"objid": ["1", "2", "3", "2"],
                            "label": ["spiral", "spiral", "spiral", "spiral"],
                            "file": ["a.png", "b.png", "c.png", "b.png"]})
    kept, dropped = drop_duplicate_galaxies(catalog, tmp_path)
    assert kept["objid"].tolist() == ["1", "2"]
    assert dropped["reason"].tolist() == [
        'a copy of row 1 (same objid, image bytes or position within 1")',
        'a copy of row 2 (same objid, image bytes or position within 1")']
    clash = catalog.assign(label=["spiral", "edge_on", "elliptical", "edge_on"])
    kept, dropped = drop_duplicate_galaxies(clash, tmp_path)
    assert kept["objid"].tolist() == ["2"]  # 1 and 3 share bytes but not a label
    assert len(dropped) == 3


def test_two_cutouts_of_one_position_are_one_galaxy(tmp_path):
    """Another survey's cutout of the same galaxy (other id, other bytes) is still that galaxy;
    a neighbour 3 arcsec away is not. Positions may be missing."""
    for name in "abcde":
        (tmp_path / f"{name}.png").write_bytes(name.encode())
    arcsec = 1 / 3600
    catalog = pd.DataFrame({
        "objid": ["1", "2", "3", "4", "5"],
        "ra": ["150.0", str(150.0 + 0.5 * arcsec / np.cos(np.radians(2.0))), "150.0", "", "10"],
        "dec": ["2.0", "2.0", str(2.0 + 3 * arcsec), "", "-5"],
        "label": ["spiral"] * 5, "file": [f"{n}.png" for n in "abcde"]})
    kept, dropped = drop_duplicate_galaxies(catalog, tmp_path)
    assert kept["objid"].tolist() == ["1", "3", "4", "5"]
    assert dropped["objid"].tolist() == ["2"]
    assert dropped["reason"].tolist() == [
        'a copy of row 1 (same objid, image bytes or position within 1")']
    clash = catalog.assign(label=["spiral", "edge_on", "spiral", "spiral", "spiral"])
    kept, dropped = drop_duplicate_galaxies(clash, tmp_path)
    assert kept["objid"].tolist() == ["3", "4", "5"] and dropped["objid"].tolist() == ["1", "2"]


def test_a_placeholder_position_on_many_rows_does_not_merge_them(tmp_path, caplog):
    for name in "abcd":
        (tmp_path / f"{name}.png").write_bytes(name.encode())
    catalog = pd.DataFrame({"objid": ["1", "2", "3", "4"], "ra": ["0", "0.0", "0", "150"],
                            "dec": ["0", "0", "0.0", "2"],
                            "label": ["spiral", "edge_on", "elliptical", "spiral"],
                            "file": [f"{n}.png" for n in "abcd"]})
    with caplog.at_level("WARNING", logger="pipeline.catalog"):
        kept, dropped = drop_duplicate_galaxies(catalog, tmp_path)
    assert kept["objid"].tolist() == ["1", "2", "3", "4"] and dropped.empty
    assert "3 rows share a position written the same way (first: ra, dec = 0, 0 on row 1): " \
           "taken as placeholders, not matched by position" in caplog.text
