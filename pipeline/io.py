"""Atomic writes, path safety and image reading: one place for how files enter and leave the
pipeline.

Every output is written beside its final path and renamed into place, so an interrupted
stage leaves either the old output or the new one, never half of one. A stage replaces only
what the pipeline wrote itself, never a folder or file of the user's.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import MissingInputError, PipelineError

log = logging.getLogger(__name__)

# Flux images (FITS, float TIFF) get an asinh stretch; display images (JPEG/PNG/TIFF, already
# stretched by whoever made them) are only rescaled. Readers say which kind they returned.
FLUX = "flux"
DISPLAY = "display"
KIND_WORDS = {FLUX: "flux images (FITS or float TIFF, given an asinh stretch)",
              DISPLAY: "display images (JPEG, PNG or integer TIFF, stretched by whoever made "
                       "them, only rescaled)"}
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz")
DISPLAY_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
# A cutout larger than this many pixels is refused before it is decoded: a 97 KB PNG can
# declare 30,000 x 30,000 pixels and cost gigabytes (data.max_image_pixels overrides it).
DEFAULT_MAX_PIXELS = 20_000_000
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def unseen_kind(trained_on: dict[str, int] | None) -> str | None:
    """The kind a model trained on these kinds (its ``train_image_kinds``) never saw; None
    when it saw both, or its bundle predates the record."""
    if not trained_on or len(trained_on) != 1:
        return None
    return next(k for k in KIND_WORDS if k not in trained_on)


def is_disk_full(err: OSError) -> bool:
    """ENOSPC or a quota, or NumPy's own wording for a write that did not fit."""
    return err.errno in DISK_FULL or "Not enough free space" in str(err)


class ImageError(PipelineError, ValueError):
    """An image file that cannot be used; the message names the file and the problem."""


class OutputError(PipelineError, ValueError):
    """An output path that would destroy an input or a folder the pipeline did not write."""


class DiskFullError(PipelineError, OSError):
    """Not enough free space for an output; the message names the path and the bytes."""


# --------------------------------------------------------------------------- path safety
def _resolved(path: Path | str) -> Path:
    return Path(path).expanduser().resolve()


def is_within(path: Path | str, folder: Path | str) -> bool:
    """True when ``path`` is ``folder`` or lies inside it (after resolving links)."""
    return _resolved(path).is_relative_to(_resolved(folder))


def refuse_overlap(outputs: Mapping[str, Path | str], inputs: Mapping[str, Path | str]) -> None:
    """Refuse, before any work, outputs that would replace or delete an input.

    ``outputs`` are paths a stage replaces whole (key -> path); ``inputs`` are what it reads.
    The working directory counts as an input: an output that holds it would replace the
    project itself.
    """
    inputs = {"the working directory (the project)": Path.cwd(), **inputs}
    for out_key, out in outputs.items():
        for in_key, source in inputs.items():
            if source is None or str(source) == "":
                continue
            if is_within(source, out):
                raise OutputError(
                    f"{out_key} = {str(out)!r} would replace {in_key} = {str(source)!r}, "
                    f"which lies inside it; point {out_key} at a folder of its own (outputs are "
                    "replaced whole) or move the input out of it")


def check_replaceable(path: Path, key: str, signature: str | tuple[str, ...] | None) -> None:
    """Refuse to replace a folder or file that the pipeline did not write.

    ``signature`` names a file (or files, any one will do) that every earlier output of this
    stage holds: its summary or metadata. ``None`` means the output is a single file. An empty
    folder is fine.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if signature is None:
        if path.is_dir():
            raise OutputError(f"{key} = {str(path)!r} is a folder; give a file path (for "
                              f"example {str(path / 'predictions.csv')!r})")
        return
    if not path.is_dir():
        raise OutputError(f"{key} = {str(path)!r} is a file, not a folder this stage wrote; "
                          f"refusing to replace it: point {key} at a new folder")
    names = (signature,) if isinstance(signature, str) else signature
    if any(path.iterdir()) and not any((path / n).is_file() for n in names):
        raise OutputError(f"{key} = {str(path)!r} is a folder the pipeline did not write (it "
                          f"has no {' or '.join(names)}); refusing to replace it and delete "
                          f"what it holds: point {key} at a new or empty folder")


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds ``path`` (or its nearest existing parent)."""
    path = _resolved(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_free_space(path: Path, needed: int, what: str) -> None:
    """Fail before writing when ``needed`` bytes will not fit beside ``path``."""
    free = free_bytes(path)
    if needed > free:
        raise DiskFullError(f"{path}: {what} needs {needed:,} bytes, but only {free:,} bytes "
                            "are free there; free some space or point the output at a larger "
                            "disk")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(folder: Path, prefix: str) -> None:
    """Remove ``<prefix><pid>.*`` temporaries that a killed process left in ``folder``.

    Temporaries carry their writer's pid, so a live writer's (a second terminal) are kept.
    """
    if not folder.is_dir():
        return
    for stale in folder.glob(f"{glob.escape(prefix)}*"):
        pid = stale.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted run (process %s)", stale, pid)


def _recover_interrupted_swap(path: Path, prefix: str) -> None:
    """A run killed between moving the old output aside and moving the new one in left the
    old one as ``<tmp>/.old``; put it back before anything else looks at ``path``."""
    if path.exists() or path.is_symlink():
        return
    for stale in sorted(path.parent.glob(f"{glob.escape(prefix)}*/.old")):
        pid = stale.parent.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.rename(path)
            log.warning("restored %s, which an interrupted run had moved aside", path)
            return


@contextlib.contextmanager
def atomic_path(path: Path, signature: str | tuple[str, ...] | None = None,
                key: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only on success.

    Works for files and whole directories. An existing ``path`` is replaced only after the new
    one is complete, and only if the pipeline wrote it (:func:`check_replaceable`, with
    ``signature`` for folders). Temporaries that a killed run left beside ``path`` are
    removed first. A disk that fills up ends in a :class:`DiskFullError` naming ``path``,
    with nothing half-written left behind.
    """
    path = Path(path)
    check_replaceable(path, key or str(path), signature)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    _recover_interrupted_swap(path, prefix)
    remove_stale_temps(path.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.", suffix=".tmp",
                                dir=path.parent))
    target = tmp / path.name
    try:
        try:
            yield target
        except OSError as err:
            if is_disk_full(err):
                raise DiskFullError(
                    f"{path}: the disk filled up while writing it ({err.strerror}); "
                    f"{_written_bytes(tmp):,} bytes were written before that and "
                    f"{free_bytes(path.parent):,} are free now. Free some space, or point the "
                    "output at a larger disk; nothing was replaced") from None
            raise
        if path.is_dir() and not path.is_symlink():
            old = tmp / ".old"
            path.rename(old)
            target.rename(path)
        else:
            target.replace(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _written_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def atomic_write_text(path: Path, text: str) -> Path:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, stage: str) -> Any:
    """A JSON file another stage wrote; a missing or corrupt one names that stage."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: not found; run the {stage} stage first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: not valid JSON ({err}); run the {stage} stage again") \
            from None


def require_file(path: Path, stage: str) -> Path:
    """``path`` if it exists, else an error that names the stage that writes it."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: not found; run the {stage} stage first")
    return path
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


def read_image(path: Path, bands: tuple[str, ...] = ("i", "r", "g"),
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Read one cutout as a float32 ``(H, W, 3)`` array in display (R, G, B) order.

    FITS cutouts hold one image extension per band (EXTNAME g, r, i, as SDSS frames are split by
    band) or a single ``(3, H, W)`` cube; ``bands`` maps them to R, G, B (SDSS convention:
    i, r, g). Display images come back on the 8-bit scale (0-255) whatever their depth.
    Returns the array and its kind (:data:`FLUX` or :data:`DISPLAY`). An image of more than
    ``max_pixels`` pixels is refused before it is decoded.
    """
    path = Path(path)
    kind = image_kind(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: file is empty")
    try:
        if kind == FLUX:
            data = _read_fits(path, bands, max_pixels)
        else:
            data, kind = _read_display(path, max_pixels)
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


def _too_many_pixels(path: Path, shape: tuple[int, ...], max_pixels: int) -> None:
    pixels = int(np.prod(shape[-2:], dtype=np.int64)) if len(shape) >= 2 else 0
    if pixels > max_pixels:
        raise ImageError(f"{path}: {shape[-1]}x{shape[-2]} = {pixels:,} pixels is more than "
                         f"data.max_image_pixels = {max_pixels:,}; crop the cutout, or raise "
                         "the limit if you have the memory (about 12 bytes a pixel)")


# warnings.catch_warnings saves and restores the process-wide filter list, so two threads
# inside it at once restore each other's filters: a warning meant to be an error passes (a
# half-read FITS file), or one meant to be ignored escapes. Cutouts are decoded in threads.
_WARNING_FILTERS = threading.RLock()  # re-entrant: a nested block in one thread is fine


@contextlib.contextmanager
def warnings_as(action: str, category: type[Warning]) -> Iterator[None]:
    """``warnings.simplefilter(action, category)`` for the block, one thread at a time."""
    with _WARNING_FILTERS, warnings.catch_warnings():
        warnings.simplefilter(action, category)
        yield


def _read_fits(path: Path, bands: tuple[str, ...], max_pixels: int) -> np.ndarray:
    """Read from bytes in memory (cutouts are small), with astropy's warnings made errors.

    A truncated or malformed file is an error here, never a silently half-read image.
    """
    import io

    from astropy.io import fits
    from astropy.utils.exceptions import AstropyWarning

    raw = path.read_bytes()
    if len(raw) % 2880 and not path.name.lower().endswith(".gz"):
        raise ImageError(f"{path}: truncated FITS file ({len(raw)} bytes is not a multiple of "
                         "the 2880-byte FITS block)")
    with warnings_as("error", AstropyWarning), fits.open(io.BytesIO(raw), memmap=False) as hdul:
        return _fits_planes(path, hdul, bands, max_pixels)


def _fits_planes(path: Path, hdul, bands: tuple[str, ...], max_pixels: int) -> np.ndarray:
    """Band extensions by name (g, r, i), else the first HDU that holds an image (a table
    HDU before it, as some archives write, is passed over)."""
    images = [h for h in hdul if h.is_image and h.header.get("NAXIS", 0) >= 2]
    for h in images:
        _too_many_pixels(path, tuple(h.header[f"NAXIS{k}"]
                                     for k in range(h.header["NAXIS"], 0, -1)), max_pixels)
    names = {h.name.lower(): h for h in images}
    if all(b.lower() in names for b in bands):
        planes = [np.asarray(names[b.lower()].data, dtype=np.float32) for b in bands]
        return np.stack(planes, axis=-1)
    if not images:
        kinds = [type(h).__name__ for h in hdul]
        raise ImageError(f"{path}: FITS file holds no image HDU (it has {kinds})")
    cube = np.asarray(images[0].data, dtype=np.float32)
    if cube.ndim == 2:
        return np.repeat(cube[..., None], 3, axis=-1)
    if cube.ndim == 3 and cube.shape[0] == 3:
        return np.moveaxis(cube, 0, -1)
    raise ImageError(f"{path}: FITS image of shape {cube.shape}; expected (H, W), "
                     f"(3, H, W) or band extensions {list(bands)}")


def _read_display(path: Path, max_pixels: int) -> tuple[np.ndarray, str]:
    """A PNG, JPEG or TIFF as RGB on the 8-bit scale, and its kind.

    16-bit images are scaled by the 16-bit range (65535 is white, as a viewer shows them),
    not clipped at 255. An alpha channel is dropped; transparent pixels become black (sky)
    and the log says how many. Floating-point TIFFs are flux, not display, images.
    """
    from PIL import Image

    # data.max_image_pixels is the limit, checked below before any pixel is decoded; Pillow's
    # own fixed one would otherwise warn or fail first (idempotent, so safe across threads).
    Image.MAX_IMAGE_PIXELS = None
    img = Image.open(path)
    with img:
        _too_many_pixels(path, (img.size[1], img.size[0]), max_pixels)
        img.load()
        mode = img.mode
        if mode.startswith("I;16") or mode == "I":
            grey = np.asarray(img, dtype=np.float32)
            top = 65535.0 if mode.startswith("I;16") or grey.max() <= 65535 else 2.0**32 - 1
            return np.repeat((grey * (255.0 / top))[..., None], 3, axis=-1), DISPLAY
        if mode == "F":
            return np.repeat(np.asarray(img, dtype=np.float32)[..., None], 3, axis=-1), FLUX
        has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            mode == "P" and "transparency" in img.info)
        if not has_alpha:
            return np.asarray(img.convert("RGB"), dtype=np.float32), DISPLAY
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    transparent = int(np.count_nonzero(alpha < 1))
    if transparent:
        log.warning("%s: alpha channel: %d of %d pixels are (partly) transparent; they are "
                    "blended onto black sky", path, transparent, alpha.size)
    else:
        log.debug("%s: opaque alpha channel ignored", path)
    return rgba[..., :3] * alpha, DISPLAY
