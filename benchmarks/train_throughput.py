"""Training input throughput and memory: pipeline.train's streaming tf.data vs in-memory fit.

    python benchmarks/train_throughput.py [--images 6000] [--size 64] [--epochs 3]
    python benchmarks/train_throughput.py --memory   # peak RSS at N and 4N training images

Throughput: the default CNN trained for a few epochs (a) with ``model.fit`` on in-memory
float32 tensors and (b) through ``pipeline.train.make_dataset`` reading the prepared ``.npy``
from disk; prints images/s of the epochs after the first (graph tracing) and their ratio.
Memory: trains in a fresh process on N and on 4N images and prints each peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_split(folder: Path, n: int, size: int) -> None:
    from pipeline.io import save_arrays

    rng = np.random.default_rng(0)
    images = np.empty((n, size, size, 3), dtype=np.float16)
    for start in range(0, n, 2048):  # written in chunks: the benchmark itself stays small
        m = min(2048, n - start)
        images[start:start + m] = rng.uniform(-1, 1, (m, size, size, 3)).astype(np.float16)
    save_arrays(folder, images=images, labels=rng.integers(0, 3, n).astype(np.int32))


def build(size: int):
    import keras

    from pipeline.config import compose, validate
    from pipeline.models import build_model

    cfg = validate(compose())
    keras.utils.set_random_seed(0)
    model = build_model(cfg.models.cnn, (size, size, 3), 3, cfg.train, "cnn").model
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model, int(cfg.train.batch_size)


def timed_fit(model, data, epochs: int, n: int, **kwargs) -> float:
    import keras

    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(*data, epochs=epochs, verbose=0, callbacks=[Clock()], **kwargs)
    return n / float(np.mean(times[1:]))  # skip the first epoch (tracing)


def throughput(n: int, size: int, epochs: int) -> None:
    from pipeline.artifacts import load_split
    from pipeline.train import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        make_split(Path(tmp) / "train", n, size)
        split = load_split(Path(tmp), "train", stream=True)
        in_memory = np.asarray(np.load(Path(tmp) / "train" / "images.npy"), dtype=np.float32)
        labels = split["labels"]
        model, batch = build(size)
        fit_rate = timed_fit(model, (in_memory, labels), epochs, n, batch_size=batch,
                             shuffle=True)
        model, batch = build(size)
        ds = make_dataset(split["images"], labels, batch, True, 0)
        pipe_rate = timed_fit(model, (ds,), epochs, n, shuffle=False)
    print(f"images: {n} at {size}x{size}x3, batch {batch}, epochs {epochs} (first not timed)")
    print(f"model.fit on in-memory tensors: {fit_rate:.0f} images/s")
    print(f"pipeline.train input pipeline:  {pipe_rate:.0f} images/s")
    print(f"ratio: {pipe_rate / fit_rate:.1%} (target >= 90%)")


def one_memory_run(folder: Path, size: int) -> None:
    """Train one epoch on the split in ``folder`` (made by the parent) and report peak RSS."""
    from pipeline.artifacts import load_split
    from pipeline.train import make_dataset

    split = load_split(folder, "train", stream=True)
    model, batch = build(size)
    model.fit(make_dataset(split["images"], split["labels"], batch, True, 0), epochs=1,
              verbose=0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": len(split["labels"]), "peak_rss_mib": round(peak_mib, 1)}))


def memory(n: int, size: int) -> None:
    results = []
    for count in (n, 4 * n):
        with tempfile.TemporaryDirectory() as tmp:
            make_split(Path(tmp) / "train", count, size)  # here, not in the measured process
            out = subprocess.run([sys.executable, __file__, "--one-memory-run", tmp,
                                  "--size", str(size)], capture_output=True, text=True,
                                 check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    a, b = results
    data_mib = [r["images"] * size * size * 3 * 2 / 2**20 for r in results]
    print(f"training images: {a['images']} ({data_mib[0]:.0f} MiB on disk) -> peak RSS "
          f"{a['peak_rss_mib']:.0f} MiB")
    print(f"training images: {b['images']} ({data_mib[1]:.0f} MiB on disk) -> peak RSS "
          f"{b['peak_rss_mib']:.0f} MiB")
    print(f"RSS ratio for 4x the data: {b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x "
          "(target <= 1.3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--one-memory-run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_memory_run:
        one_memory_run(args.one_memory_run, args.size)
    elif args.memory:
        memory(args.images, args.size)
    else:
        throughput(args.images, args.size, args.epochs)


if __name__ == "__main__":
    main()
