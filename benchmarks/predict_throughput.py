"""Survey-scale prediction: throughput against raw model.predict, memory at 1x and 4x, resume.

    python benchmarks/predict_throughput.py --images 4000            # images/s and the ratio
    python benchmarks/predict_throughput.py --memory --images 20000  # peak RSS at N and 4N
    python benchmarks/predict_throughput.py --resume --images 4000   # kill -9 at ~50%, rerun

The benchmark writes its own synthetic JPEG cutouts (a galaxy-like blob in noise) and a model
bundle holding the default config's CNN, untrained (speed does not depend on the weights), with
the test-time views given by ``--tta``. Throughput compares (a) ``model.predict`` over those
views on tensors already decoded and preprocessed in memory with (b) ``pipeline.predict.run``
from the JPEG files to the written table, in the same process. Memory runs ``python -m
pipeline.predict`` in a fresh process on N and on 4N files and prints each peak RSS. Resume
kills a run with SIGKILL once about half its chunks are written, runs it again, and compares the
rerun's time and table with an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_jpegs(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.indices((size, size))
    for i in range(len(list(folder.glob("*.jpeg"))), n):
        width = rng.uniform(2, size / 6)
        blob = 220 * np.exp(-0.5 * ((x - size / 2) ** 2 + (y - size / 2) ** 2) / width ** 2)
        rgb = np.clip(blob[..., None] + rng.normal(12, 5, (size, size, 3)), 0, 255)
        Image.fromarray(rgb.astype(np.uint8)).save(folder / f"g{i:07d}.jpeg", quality=90)


def write_bundle(folder: Path, size: int, tta: str) -> None:
    """A model folder as train and evaluate leave it, around an untrained default CNN."""
    import keras
    from omegaconf import OmegaConf

    from pipeline.artifacts import (
        MODEL_NAME,
        InferenceSettings,
        PriorCorrection,
        TrainSummary,
        file_sha256,
        save_config,
    )
    from pipeline.config import compose, validate
    from pipeline.models import build_model

    cfg = validate(compose([f"prepare.image_size={size}"]))
    keras.utils.set_random_seed(0)
    model = build_model(cfg.models.cnn, (size, size, 3), 3, cfg.train, "cnn").model
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / MODEL_NAME)
    save_config(cfg, folder)
    TrainSummary(model="cnn", kind="cnn", pretrained=None, backbone=None, weights=None,
                 classes=list(cfg.data.classes), input_shape=[size, size, 3],
                 parameters=int(model.count_params()), strategy="default", replicas=1,
                 mixed_precision=False, jit_compile=False, train_images=0, val_images=0,
                 class_balance="none", class_balance_weights=None, phases=[], epochs=0,
                 best_epoch=0, best_val_loss=0.0, train_loss_at_best=0.0,
                 wall_time_s=0.0).save(folder)
    InferenceSettings(tta=tta, tta_zoom=1.0, prior_correction=PriorCorrection(how="none"),
                      model_sha256=file_sha256(folder / MODEL_NAME)).save(folder)
    OmegaConf.save(cfg, folder / "benchmark_config.yaml")


def predict_args(bundle: Path, images: Path, output: Path, chunk: int) -> list[str]:
    return [f"model_dir={bundle}", f"input={images}", f"output={output}",
            "mc_dropout_samples=0", f"chunk_size={chunk}", f"hydra.run.dir={output.parent / 'h'}"]


def throughput(root: Path, n: int, size: int, chunk: int) -> dict:
    from omegaconf import OmegaConf

    from pipeline import predict
    from pipeline.artifacts import TrainedModel
    from pipeline.config import CONF_DIR
    from pipeline.inference import TTA_MODES, predict_proba, tta_views
    from pipeline.preprocess import load_images

    bundle, images = root / "bundle", root / f"jpeg{n}"
    trained = TrainedModel.load(bundle)
    paths = sorted(images.glob("*.jpeg"))
    x = load_images(paths, trained.preprocessing, progress=False).images
    views = trained.inference.tta

    def by_hand(images: np.ndarray) -> np.ndarray:
        """What a user would write: model.predict over each view of in-memory tensors."""
        return sum(trained.model.predict(v, batch_size=256, verbose=0)
                   for v in tta_views(images, views)) / TTA_MODES[views]

    by_hand(x[:512])  # warm-up: graph tracing
    start = time.perf_counter()
    reference = by_hand(x)
    raw = n / (time.perf_counter() - start)
    ours = predict_proba(trained.model, x, views)
    assert np.allclose(ours, reference, atol=1e-5), "the pipeline's forward pass differs"

    cfg = OmegaConf.merge(OmegaConf.load(CONF_DIR / "predict.yaml"), {
        "model_dir": str(bundle), "input": str(images), "output": str(root / "out.csv"),
        "mc_dropout_samples": 0, "chunk_size": chunk})
    start = time.perf_counter()
    predict.run(cfg)
    streamed = n / (time.perf_counter() - start)
    return {"images": n, "views": trained.inference.tta, "raw model.predict images/s":
            round(raw, 1), "pipeline.predict images/s (files to table)": round(streamed, 1),
            "ratio": round(streamed / raw, 3)}


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """Peak RSS (MB) and wall time (s) of ``python -m pipeline.predict args`` in a fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.predict", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pipeline.predict failed: {args}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def memory(root: Path, n: int, chunk: int) -> dict:
    rows = {}
    for count in (n, 4 * n):
        rss, wall = peak_rss_mb(predict_args(root / "bundle", root / f"jpeg{count}",
                                             root / f"mem{count}.csv", chunk))
        rows[count] = {"peak RSS MB": round(rss, 1), "wall s": round(wall, 1)}
    return {"by images": rows, "RSS ratio 4x/1x": round(rows[4 * n]["peak RSS MB"]
                                                         / rows[n]["peak RSS MB"], 3)}


def resume(root: Path, n: int, chunk: int) -> dict:
    import pandas as pd

    images = root / f"jpeg{n}"
    _, full = peak_rss_mb(predict_args(root / "bundle", images, root / "full.csv", chunk))
    out = root / "resumed.csv"
    parts = out.with_name(f".{out.name}.parts")
    total = -(-n // chunk)
    process = subprocess.Popen([sys.executable, "-m", "pipeline.predict",
                                *predict_args(root / "bundle", images, out, chunk)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(list(parts.glob("chunk-*.csv"))) < total // 2 and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list(parts.glob("chunk-*.csv")))
    start = time.perf_counter()
    again = subprocess.run([sys.executable, "-m", "pipeline.predict",
                            *predict_args(root / "bundle", images, out, chunk)],
                           capture_output=True, text=True, check=True)
    rerun = time.perf_counter() - start
    redone = re.search(r"(\d+) images in (\d+) chunk", again.stdout + again.stderr)
    same = pd.read_csv(out).equals(pd.read_csv(root / "full.csv"))
    # The rerun pays the process start-up (TensorFlow import, model load) again: compare the
    # classification work, the wall time less a start-up measured on an empty input.
    empty = root / "jpeg1"
    write_jpegs(empty, 1, 64)
    _, startup = peak_rss_mb(predict_args(root / "bundle", empty, root / "one.csv", chunk))
    remaining = (total - done) / total
    return {"chunks": total, "finished before the kill": done,
            "images classified by the rerun": int(redone.group(1)),
            "images left after the kill": n - min(n, done * chunk),
            "uninterrupted wall s": round(full, 1), "rerun wall s": round(rerun, 1),
            "start-up s": round(startup, 1),
            "rerun work / remaining share of full work": round(
                (rerun - startup) / ((full - startup) * remaining), 3),
            "tables identical": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64, help="cutout side = model input side")
    parser.add_argument("--tta", default="dihedral", choices=["none", "rot4", "dihedral"])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--root", type=Path, default=None, help="keep the files here")
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="predict-bench-"))
    if not (root / "bundle").is_dir():
        write_bundle(root / "bundle", args.size, args.tta)
    counts = (args.images, 4 * args.images) if args.memory else (args.images,)
    for count in counts:
        write_jpegs(root / f"jpeg{count}", count, args.size)
    if args.memory:
        result = memory(root, args.images, args.chunk_size)
    elif args.resume:
        result = resume(root, args.images, args.chunk_size)
    else:
        result = throughput(root, args.images, args.size, args.chunk_size)
    print(json.dumps({"root": str(root), **result}, indent=1))


if __name__ == "__main__":
    main()
