"""Corrupted image bytes never crash a reader with a traceback nor get admitted as an image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.io import ImageError, read_image


def valid_bytes(kind: str) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    if kind == "fits":
        fits.HDUList([fits.PrimaryHDU(rng.normal(0, 1, (3, 16, 16)).astype(np.float32))]
                     ).writeto(buf)
    else:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            buf, format={"jpg": "JPEG", "png": "PNG"}[kind])
    return buf.getvalue()


def corrupt(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data[: max(0, len(data) - cut)])
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["jpg", "png", "fits"]),
       cut=st.integers(0, 3000),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       noise=st.one_of(st.none(), st.binary(max_size=4000)))
def test_reader_returns_a_clean_image_or_a_clear_error(tmp_path, kind, cut, flips, noise):
    data = noise if noise is not None else corrupt(valid_bytes(kind), cut, flips)
    path = tmp_path / f"galaxy.{kind}"
    path.write_bytes(data)
    try:
        image, _ = read_image(path)
    except ImageError as err:
        assert str(path) in str(err)  # the message names the file
        return
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 0 and image.shape[1] > 0
    assert np.isfinite(image).all()


@pytest.mark.parametrize("kind", ["jpg", "png", "fits"])
def test_empty_and_truncated_files_are_named(tmp_path, kind):
    empty = tmp_path / f"empty.{kind}"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.\w+: file is empty"):
        read_image(empty)
    truncated = tmp_path / f"cut.{kind}"
    truncated.write_bytes(valid_bytes(kind)[:-200])
    with pytest.raises(ImageError, match=r"cut\.\w+: (truncated|cannot decode)"):
        read_image(truncated)


def test_wrong_band_count_is_named(tmp_path):
    path = tmp_path / "two_bands.fits"
    fits.PrimaryHDU(np.zeros((2, 8, 8), np.float32)).writeto(path)
    with pytest.raises(ImageError, match=r"two_bands.fits: FITS image of shape \(2, 8, 8\)"):
        read_image(path)


def test_unsupported_suffix_is_named():
    with pytest.raises(ImageError, match=r"galaxy.bmp: unsupported image type"):
        read_image(Path("galaxy.bmp"))
