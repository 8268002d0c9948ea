"""Training input throughput and memory: pipeline.train's streaming tf.data vs in-memory fit.

    python benchmarks/train_throughput.py [--images 6000] [--size 64] [--epochs 3]
    python benchmarks/train_throughput.py --memory   # peak RSS at N and 4N training images
    python benchmarks/train_throughput.py --experiment gz1 --prepared /tmp/gz1/prepared \
        [--images 768] [--epochs 3]   # what users run: both gz1 models, on-the-fly augmentation
        [--set train.mixed_precision=true]   # any config override on top of the experiment

``--experiment gz1`` builds each model as ``experiment=gz1`` does (the CNN; the transfer
model in its frozen and its fine-tuning phase) and trains it for a few epochs (a) through
``pipeline.train.make_dataset`` with on-the-fly augmentation and the experiment's class
balance, and (b) with plain ``model.fit`` on in-memory float32 tensors augmented beforehand.
For each it prints images/s of the epochs after the first, the ratio, the CPU cores busy
(process CPU time over wall time) and minor page faults per image. The prepared gz1 split
comes from ``python -m pipeline.prepare experiment=gz1 paths.prepared=...``.

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


def measured_fit(model, data, epochs: int, n: int, **kwargs) -> dict:
    """images/s, CPU cores busy and minor page faults per image, over the epochs after the
    first (which traces the graph)."""
    import keras

    marks: list[tuple[float, float, int]] = []

    def mark() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        marks.append((time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_minflt))

    class Meter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mark()

    model.fit(*data, epochs=epochs, verbose=0, callbacks=[Meter()], **kwargs)
    (t0, c0, f0), (t1, c1, f1) = marks[0], marks[-1]
    images = n * (len(marks) - 1)
    return {"images/s": round(images / (t1 - t0), 1), "cores": round((c1 - c0) / (t1 - t0), 2),
            "page faults/image": round((f1 - f0) / images, 1)}


def experiment(name: str, prepared: Path, n: int, epochs: int, weights: str | None,
               rows_wanted: list[str], settings: list[str]) -> None:
    import keras
    from omegaconf import OmegaConf

    from pipeline.artifacts import load_split
    from pipeline.augment import augment_copies
    from pipeline.config import compose, model_train_config, validate
    from pipeline.models import build_model, set_trainable_from
    from pipeline.train import class_balance_weights, make_dataset, precision_policy

    overrides = [f"experiment={name}"]
    if weights:
        overrides.append(f"models.transfer.weights={weights}")
    cfg = validate(compose(overrides + settings))
    split = load_split(prepared, "train", stream=True)
    rows = np.arange(min(n, len(split["labels"])))
    labels = split["labels"][rows]
    images16 = split["images"][rows]
    augmented = augment_copies(images16.astype(np.float32),
                               OmegaConf.merge(cfg.augment, {"copies": 1}), seed=0)[0]
    print(f"experiment={name}: {len(rows)} training images at {images16.shape[1]} px, "
          f"{epochs} epochs (first not timed)")
    for model_name, phase in (("cnn", "train"), ("transfer", "feature_extraction"),
                              ("transfer", "fine_tuning")):
        if phase not in rows_wanted and model_name not in rows_wanted:
            continue
        t = model_train_config(cfg, model_name)
        weights_by_class = class_balance_weights(t.class_weight, labels)
        class_weight = weights_by_class if t.class_weight == "balanced" else None
        keras.mixed_precision.set_global_policy(precision_policy(bool(t.mixed_precision)))
        results = {}
        for path in ("raw model.fit", "pipeline.train", "pipeline.train, streamed from disk"):
            keras.utils.set_random_seed(0)
            built = build_model(cfg.models[model_name], tuple(images16.shape[1:]), 3, t,
                                model_name)
            if phase == "fine_tuning":
                set_trainable_from(built.model, built.backbone_name, built.phases[1].trainable_from)
            built.model.compile(optimizer=keras.optimizers.Adam(1e-4), metrics=["accuracy"],
                                loss="sparse_categorical_crossentropy")
            if path == "raw model.fit":
                results[path] = measured_fit(built.model, (augmented, labels), epochs,
                                             len(rows), batch_size=int(t.batch_size),
                                             shuffle=True, class_weight=class_weight)
            else:
                ds = make_dataset(split["images"], split["labels"][:len(rows)],
                                  int(t.batch_size), True, 0, augment=cfg.augment,
                                  balanced=t.class_weight == "resample",
                                  hold_in_memory=None if path == "pipeline.train" else False)
                results[path] = measured_fit(built.model, (ds,), epochs, len(rows),
                                             class_weight=class_weight)
        raw, ours = results["raw model.fit"], results["pipeline.train"]
        print(json.dumps({"model": model_name, "phase": phase,
                          "precision": keras.mixed_precision.global_policy().name, **{
            f"{k} ({path})": v for path, r in results.items() for k, v in r.items()},
            "ratio": round(ours["images/s"] / raw["images/s"], 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--one-memory-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--experiment", help="benchmark an experiment's models, e.g. gz1")
    parser.add_argument("--prepared", type=Path, help="its prepared split (prepare stage)")
    parser.add_argument("--rows", nargs="+", default=["cnn", "transfer"],
                        help="cnn, transfer, or one transfer phase (feature_extraction, "
                             "fine_tuning)")
    parser.add_argument("--weights", help="ImageNet weights file for the transfer model",
                        default=str(Path(__file__).resolve().parents[2] / "shared" / "weights"
                                    / "mobilenet_v2_alpha1.0_224_imagenet_no_top.h5"))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides on top of the experiment, e.g. "
                             "models.cnn.train.mixed_precision=true")
    args = parser.parse_args()
    if args.experiment:
        experiment(args.experiment, args.prepared, args.images, args.epochs, args.weights,
                   args.rows, args.set)
    elif args.one_memory_run:
        one_memory_run(args.one_memory_run, args.size)
    elif args.memory:
        memory(args.images, args.size)
    else:
        throughput(args.images, args.size, args.epochs)


if __name__ == "__main__":
    main()
