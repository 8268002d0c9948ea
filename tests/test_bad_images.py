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


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_images_keep_their_range(tmp_path, suffix):
    """65535 is white: a 16-bit cutout is scaled by its own depth, not clipped at 255."""
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / f"deep.{suffix}"
    Image.fromarray(ramp).save(path)
    image, kind = read_image(path)
    assert kind == "display"
    np.testing.assert_allclose(image[..., 0], ramp * (255 / 65535), rtol=1e-5)
    assert image.min() == 0 and image.max() == pytest.approx(65520 * 255 / 65535)
    assert len(np.unique(image)) > 1000  # not the constant image clipping made


def test_float_tiff_is_a_flux_image(tmp_path):
    path = tmp_path / "flux.tiff"
    Image.fromarray(np.linspace(-5, 500, 256, dtype=np.float32).reshape(16, 16)).save(path)
    image, kind = read_image(path)
    assert kind == "flux" and image.min() == -5 and image.max() == 500


def test_alpha_is_blended_onto_black_and_said(tmp_path, caplog):
    rgba = np.full((8, 8, 4), 200, dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:2, :, 3] = 0  # two transparent rows
    path = tmp_path / "cut.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    with caplog.at_level("WARNING"):
        image, _ = read_image(path)
    assert (image[:2] == 0).all() and (image[2:] == 200).all()
    assert "cut.png: alpha channel: 16 of 64 pixels are (partly) transparent" in caplog.text
    opaque = tmp_path / "opaque.png"
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(opaque)
    assert (read_image(opaque)[0] == 200).all()


def test_fits_skips_a_table_before_the_image(tmp_path):
    path = tmp_path / "table_first.fits"
    table = fits.BinTableHDU.from_columns([fits.Column(name="objid", format="K", array=[1, 2])])
    cube = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    fits.HDUList([fits.PrimaryHDU(), table, fits.ImageHDU(cube)]).writeto(path)
    image, kind = read_image(path)
    assert kind == "flux" and image.shape == (8, 8, 3)
    np.testing.assert_array_equal(image[..., 1], cube[1])
    only_table = tmp_path / "only_table.fits"
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(only_table)
    with pytest.raises(ImageError, match=r"only_table.fits: FITS file holds no image HDU"):
        read_image(only_table)


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 300, 3), np.uint8)).save(path)
    with pytest.raises(ImageError, match=r"big.png: 300x100 = 30,000 pixels is more than "
                                         r"data.max_image_pixels = 20,000"):
        read_image(path, max_pixels=20_000)
    fits_path = tmp_path / "big.fits"
    fits.PrimaryHDU(np.zeros((3, 100, 300), np.float32)).writeto(fits_path)
    with pytest.raises(ImageError, match=r"big.fits: 300x100 = 30,000 pixels"):
        read_image(fits_path, max_pixels=20_000)
    assert read_image(path, max_pixels=30_000)[0].shape == (100, 300, 3)
