"""Atomic outputs: a stage replaces only what it wrote, and cleans up after a killed run."""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.io import OutputError, atomic_path, refuse_overlap, warnings_as

DEAD_PID = 2**22 + 12345  # above Linux's default pid_max: no process has it


def test_a_folder_the_pipeline_did_not_write_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=r"'.*out' is a folder the pipeline did not write "
                                          r"\(it has no meta.json\)"), atomic_path(
            out, signature="meta.json", key="paths.prepared"):
        pass
    assert (out / "thesis.tex").read_text() == "years of work"
    (out / "meta.json").write_text("{}")  # an earlier output of this stage: replaced
    with atomic_path(out, signature="meta.json") as tmp:
        tmp.mkdir()
        (tmp / "meta.json").write_text('{"new": 1}')
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"]


def test_a_swap_cut_short_is_undone_and_stale_temporaries_removed(tmp_path):
    out = tmp_path / "raw"
    # A run killed between moving the old output aside and moving the new one in.
    aside = tmp_path / f".raw.{DEAD_PID}.abc.tmp" / ".old"
    aside.mkdir(parents=True)
    (aside / "catalog.csv").write_text("old")
    live = tmp_path / f".raw.{os.getpid()}.xyz.tmp"  # another run, still going
    live.mkdir()
    with atomic_path(out, signature="catalog.csv") as tmp:
        assert (out / "catalog.csv").read_text() == "old"  # restored before anything else
        assert not aside.parent.exists() and live.exists()
        tmp.mkdir()
        (tmp / "catalog.csv").write_text("new")
    assert (out / "catalog.csv").read_text() == "new"


def test_outputs_that_hold_an_input_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match=r"paths.raw = 'data' would replace "
                                          r"data.folder.catalog = 'data/cat.csv'"):
        refuse_overlap({"paths.raw": Path("data")}, {"data.folder.catalog": "data/cat.csv"})
    with pytest.raises(OutputError, match=r"would replace the working directory"):
        refuse_overlap({"paths.raw": tmp_path.parent}, {})
    refuse_overlap({"paths.raw": Path("data/raw")}, {"data.folder.catalog": "data/cat.csv"})


class BadCard(UserWarning):
    """Stands for astropy's warning about a malformed FITS file: read as an error."""


class NothingFound(UserWarning):
    """Stands for photutils' "no sources" warning while measuring: ignored."""


def test_warning_filters_hold_in_every_thread_that_decodes_at_once():
    """Cutouts are decoded in threads. Reading FITS turns astropy's warnings into errors and
    measuring a galaxy silences photutils' "no sources"; each block must hold while other
    threads are in theirs, or a malformed file reads silently and a stray warning escapes."""
    def strict(_):
        with warnings_as("error", BadCard):
            time.sleep(0.0005)
            try:
                warnings.warn("malformed card", BadCard, stacklevel=1)
            except BadCard:
                return "error"
            return "read silently"

    def quiet(_):
        with warnings_as("ignore", NothingFound):
            time.sleep(0.0005)
            warnings.warn("no sources", NothingFound, stacklevel=1)
            return "quiet"

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # outside the blocks, warnings only print
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: (strict if i % 2 else quiet)(i), range(400)))
    assert answers.count("error") == 200 and answers.count("quiet") == 200
