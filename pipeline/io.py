"""Atomic writes and image reading: one place for how files enter and leave the pipeline.

Every output is written beside its final path and renamed into place, so an interrupted
stage leaves either the old output or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

# Flux images (FITS) get an asinh stretch; display images (JPEG/PNG, already stretched by
# whoever made them) are only rescaled. Readers say which kind they returned.
FLUX = "flux"
DISPLAY = "display"
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz")
DISPLAY_SUFFIXES = (".jpg", ".jpeg", ".png")


class ImageError(PipelineError, ValueError):
    """An image file that cannot be used; the message names the file and the problem."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only on success.

    Works for files and whole directories. An existing ``path`` is replaced only after the new
    one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = tmp / ".old"
            path.rename(old)
            target.rename(path)
        else:
            target.replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> Path:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_arrays(folder: Path, **arrays: np.ndarray) -> None:
    """Save each array as ``folder/<name>.npy`` (no pickles: object arrays are refused).

    Plain ``.npy`` files can be memory-mapped, so training streams images from disk instead of
    holding the whole set in memory.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise TypeError(f"array '{name}' has dtype object; it would need pickling")
        np.save(folder / f"{name}.npy", np.asarray(arr), allow_pickle=False)


def load_arrays(folder: Path, mmap: bool = False) -> dict[str, np.ndarray]:
    """Load the arrays :func:`save_arrays` wrote; ``mmap`` maps them read-only from disk."""
    return {p.stem: np.load(p, allow_pickle=False, mmap_mode="r" if mmap else None)
            for p in sorted(Path(folder).glob("*.npy"))}


class NpyRows:
    """Rows of a ``.npy`` file read on demand with ``os.pread``, for streaming training data.

    Unlike ``np.memmap``, pages read this way stay in the OS page cache instead of the
    process's resident memory, so a training run's memory does not grow with the data set.
    Supports ``len()``, ``.shape``, ``.dtype`` and indexing by an array of row numbers.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self.path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if fortran or dtype.hasobject:
            raise ImageError(f"{path}: expected a C-ordered numeric array")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        # Read runs of consecutive rows with one call each (sorted batches are mostly runs).
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for start, run in zip(np.r_[0, breaks], np.split(rows, breaks), strict=True):
            data = os.pread(self._fd, self.row_bytes * len(run),
                            self.offset + int(run[0]) * self.row_bytes)
            flat[start:start + len(run)] = np.frombuffer(data, np.uint8).reshape(len(run), -1)
        return out

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def image_kind(path: Path) -> str:
    name = str(path).lower()
    if name.endswith(FITS_SUFFIXES):
        return FLUX
    if name.endswith(DISPLAY_SUFFIXES):
        return DISPLAY
    raise ImageError(f"{path}: unsupported image type; use one of "
                     f"{list(FITS_SUFFIXES + DISPLAY_SUFFIXES)}")


def read_image(path: Path, bands: tuple[str, ...] = ("i", "r", "g")) -> tuple[np.ndarray, str]:
    """Read one cutout as a float32 ``(H, W, 3)`` array in display (R, G, B) order.

    FITS cutouts hold one image extension per band (EXTNAME g, r, i, as SDSS frames are split by
    band) or a single ``(3, H, W)`` cube; ``bands`` maps them to R, G, B (SDSS convention:
    i, r, g). Returns the array and its kind (:data:`FLUX` or :data:`DISPLAY`).
    """
    path = Path(path)
    kind = image_kind(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: file is empty")
    try:
        data = _read_fits(path, bands) if kind == FLUX else _read_display(path)
    except ImageError:
        raise
    except Exception as err:  # any decoder failure means a corrupt or truncated file
        raise ImageError(f"{path}: cannot decode ({type(err).__name__}: {err})") from None
    if data.ndim != 3 or data.shape[2] != 3:
        raise ImageError(f"{path}: expected 3 bands/channels, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise ImageError(f"{path}: {n_bad} NaN or inf pixels")
    return data, kind


def _read_fits(path: Path, bands: tuple[str, ...]) -> np.ndarray:
    """Read from bytes in memory (cutouts are small), with astropy's warnings made errors.

    A truncated or malformed file is an error here, never a silently half-read image.
    """
    import io
    import warnings

    from astropy.io import fits
    from astropy.utils.exceptions import AstropyWarning

    raw = path.read_bytes()
    if len(raw) % 2880:
        raise ImageError(f"{path}: truncated FITS file ({len(raw)} bytes is not a multiple of "
                         "the 2880-byte FITS block)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AstropyWarning)
        with fits.open(io.BytesIO(raw), memmap=False) as hdul:
            return _fits_planes(path, hdul, bands)


def _fits_planes(path: Path, hdul, bands: tuple[str, ...]) -> np.ndarray:
    """Band extensions by name (g, r, i), else the first (3, H, W) or (H, W) image."""
    names = {h.name.lower(): h for h in hdul if h.data is not None}
    if all(b.lower() in names for b in bands):
        planes = [np.asarray(names[b.lower()].data, dtype=np.float32) for b in bands]
        return np.stack(planes, axis=-1)
    cube = next((h.data for h in hdul if h.data is not None), None)
    if cube is None:
        raise ImageError(f"{path}: FITS file holds no image data")
    cube = np.asarray(cube, dtype=np.float32)
    if cube.ndim == 2:
        return np.repeat(cube[..., None], 3, axis=-1)
    if cube.ndim == 3 and cube.shape[0] == 3:
        return np.moveaxis(cube, 0, -1)
    raise ImageError(f"{path}: FITS image of shape {cube.shape}; expected (H, W), "
                     f"(3, H, W) or band extensions {list(bands)}")


def _read_display(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("RGB"), dtype=np.float32)
