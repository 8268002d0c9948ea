"""Screen gz1 transfer-model settings on an accelerator, judged on the validation split only.

    # here, where the pipeline's prepared gz1 split and photutils are:
    python benchmarks/gpu_screen.py export --prepared /tmp/gz1c/prepared \\
        --raw /tmp/gz1b/raw --out .devcarry/gz1_frames.npz
    python benchmarks/gpu_fit.py --write-config .devcarry/gz1-params.yaml
    # on the accelerator (JAX, Keras 3, OmegaConf; no TensorFlow):
    KERAS_BACKEND=jax python benchmarks/gpu_screen.py run .devcarry/gz1-params.yaml \\
        .devcarry/gz1_frames.npz --weights mobilenet_v2_no_top.h5 --budget-s 420

A CPU training of the gz1 transfer model takes 30-60 minutes here, so only a few settings can
be tried in a session. This is a proxy that ranks settings in seconds each, for the ones worth a
real training: each training and validation galaxy of the pipeline's own split is framed once
by its measured half-light radius (``pipeline.framing``, loosely: radius at 0.3 of the
half-width, 208 px, JPEG q95), and each variant crops and resizes that to its own framing and
input size. The network, its two phases, cosine schedules, weight averaging, class weights and
kept epoch follow ``pipeline.train``; augmentation is the same geometry
(``pipeline.augment.affine_matrices``) drawn by Keras' RNG on the device, with one blur width
(0.5 px) instead of a drawn one. Scores: validation macro-F1 and per-class F1 of 8 dihedral
views at the experiment's ``tta_zoom``, with the prior correction fitted as evaluate fits it.
The test split is never read. A variant that wins here still needs a real training
(``pipeline.train``) before it is kept.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STORED_FRACTION = 0.3  # the widest framing screened: narrower ones are centre crops of it
STORED_SIDE = 208      # the median gz1 half-light radius (31 px) at 0.3 of 104: native scale


def export(args) -> None:
    """Frame each train/val galaxy of the prepared split from its raw cutout; save as JPEGs."""
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd
    from PIL import Image

    from pipeline.framing import (
        UnmeasuredError,
        centred_square,
        galaxy_view_side,
        half_light_radius,
    )

    catalog = pd.read_csv(args.raw / "catalog.csv", dtype={"objid": str}).set_index("objid")
    rows = []
    for split in ("train", "val"):
        ids = np.load(args.prepared / split / "objid.npy", allow_pickle=False).astype(str)
        labels = np.load(args.prepared / split / "labels.npy")
        rows += [(split, i, int(y)) for i, y in zip(ids, labels, strict=True)]

    def frame(row):
        image = np.asarray(Image.open(args.raw / catalog.loc[row[1], "file"]).convert("RGB"))
        try:
            radius = half_light_radius(image, display=True)
        except UnmeasuredError:
            radius = 0.35 * min(image.shape[:2]) * 0.4 / 2  # as the fixed 35% crop shows it
        square = centred_square(image, galaxy_view_side(radius, STORED_FRACTION))
        view = Image.fromarray(square).resize((STORED_SIDE, STORED_SIDE), Image.LANCZOS)
        buf = io.BytesIO()
        view.save(buf, "JPEG", quality=95)
        return buf.getvalue()

    with ThreadPoolExecutor(2) as pool:
        blobs = list(pool.map(frame, rows))
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(args.out, jpeg=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets,
             split=np.array([r[0] for r in rows]), label=np.array([r[2] for r in rows]))
    print(f"wrote {args.out}: {len(rows)} galaxies, {offsets[-1] / 1e6:.1f} MB")


def load_frames(path: Path):
    from PIL import Image

    z = np.load(path)
    buf, off = z["jpeg"].tobytes(), z["offsets"]
    images = np.stack([np.asarray(Image.open(io.BytesIO(buf[off[i]:off[i + 1]])))
                       for i in range(len(off) - 1)])
    return images, z["split"], z["label"]


def view(images: np.ndarray, fraction: float, size: int) -> np.ndarray:
    """The stored frames re-framed so the radius spans ``fraction``, at ``size`` px, in [-1, 1],
    by prepare's own crop, resize and display normalisation."""
    from pipeline.preprocess import crop_and_resize, normalize_display

    return normalize_display(crop_and_resize(images, STORED_FRACTION / fraction, size))


def augment_layer(cfg, seed: int):
    import keras
    from keras import ops

    from pipeline.augment import affine_matrices, transform

    class Augment(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.gen = keras.random.SeedGenerator(seed)
            taps = np.arange(-2, 3, dtype="float32")
            k = np.exp(-0.5 * (taps / 0.5) ** 2)
            k /= k.sum()
            self.kernel = (k[:, None] * k[None, :])[:, :, None, None]

        def call(self, x, training=False):
            if not training:
                return x
            n, h, w = ops.shape(x)[0], x.shape[1], x.shape[2]

            def u(lo, hi, shape=None):
                return keras.random.uniform(shape or (n,), lo, hi, seed=self.gen)

            zooms = u(1 - cfg.zoom, 1 + cfg.zoom)
            crop = u(cfg.crop_fraction, 1.0)
            shifts = u(-1.0, 1.0, (n, 2)) * (1 - crop)[:, None] * ops.array([w, h], "float32") / 2
            flip = 0.5 if cfg.flip else 0.0
            out = transform(x, affine_matrices(
                u(-cfg.rotation_degrees, cfg.rotation_degrees), zooms / crop,
                u(0, 1) < flip, u(0, 1) < flip, shifts, (h, w)))
            kernel = ops.tile(ops.convert_to_tensor(self.kernel), (1, 1, 3, 1))
            blurred = ops.depthwise_conv(out, kernel, padding="same")
            out = ops.where((u(0, 1) < cfg.blur_probability)[:, None, None, None], blurred, out)
            return ops.clip(out, -1.0, 1.0)

    return Augment()


def train_variant(cfg, v: dict, x_tr, y_tr, x_va, y_va, weights: str | None) -> dict:
    import keras
    from omegaconf import OmegaConf
    from sklearn.metrics import f1_score

    from pipeline.inference import apply_class_factors, fit_prior_correction, predict_proba
    from pipeline.models import build_model, set_trainable_from
    from pipeline.train import class_balance_weights, phase_learning_rate

    start = time.perf_counter()
    seed = int(v.get("seed", cfg.train.seed))
    keras.utils.set_random_seed(seed)
    mc = OmegaConf.merge(cfg.models.transfer, {"weights": weights}, v.get("model", {}))
    t = OmegaConf.merge(cfg.train, mc.get("train", {}), v.get("train", {}))
    size = x_tr.shape[1]
    built = build_model(mc, (size, size, 3), len(cfg.data.classes), t, "transfer")
    inp = keras.Input((size, size, 3))
    wrapper = keras.Model(inp, built.model(augment_layer(cfg.augment, seed)(inp)))
    class_weight = class_balance_weights(t.class_weight, y_tr)
    steps = -(-len(y_tr) // t.batch_size)
    best = {"val_loss": np.inf, "weights": None, "epoch": None}
    done = 0

    class Keep(keras.callbacks.Callback):
        def __init__(self, first):
            super().__init__()
            self.first = first

        def on_epoch_end(self, epoch, logs=None):
            if epoch >= self.first and logs["val_loss"] < best["val_loss"]:
                best.update(val_loss=float(logs["val_loss"]), epoch=epoch + 1,
                            weights=wrapper.get_weights())

    for phase in built.phases:
        if phase.trainable_from is not None and built.backbone_name:
            if best["weights"] is not None:
                wrapper.set_weights(best["weights"])
            set_trainable_from(built.model, built.backbone_name, phase.trainable_from)
        rate = phase_learning_rate(phase.learning_rate, phase.epochs, steps, t)
        wrapper.compile(optimizer=keras.optimizers.Adam(
            rate, use_ema=t.ema_momentum > 0, ema_momentum=t.ema_momentum or 0.99),
            loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        swap = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if t.ema_momentum else []
        wrapper.fit(x_tr, y_tr, batch_size=t.batch_size, validation_data=(x_va, y_va),
                    initial_epoch=done, epochs=done + phase.epochs, class_weight=class_weight,
                    callbacks=[*swap, Keep(done + t.min_epochs)], verbose=0)
        done += phase.epochs
    wrapper.set_weights(best["weights"])
    proba = predict_proba(built.model, x_va, cfg.evaluate.tta, zoom=cfg.evaluate.tta_zoom)
    prior = fit_prior_correction(proba, y_va, class_weight, len(cfg.data.classes))
    predicted = apply_class_factors(proba, prior["class_factors"]).argmax(axis=1)
    per_class = f1_score(y_va, predicted, average=None, labels=range(len(cfg.data.classes)))
    return {"variant": v["name"], "seed": seed, "size": size, "fraction": v["fraction"],
            "val_macro_f1": round(float(per_class.mean()), 4),
            "val_f1": [round(float(f), 3) for f in per_class],
            "val_accuracy": round(float((predicted == y_va).mean()), 4),
            "kept_epoch": best["epoch"], "kept_val_loss": round(best["val_loss"], 4),
            "alpha": prior["alpha"], "seconds": round(time.perf_counter() - start, 1)}


VARIANTS = [  # the committed experiment=gz1 first, then one change each; "size" is the prepared
    # side, and models.transfer.input_size (gz1: 112) still resizes it inside unless set to None
    {"name": "gz1 as committed", "fraction": 0.4, "size": 144},
    {"name": "wider view (radius at 0.3)", "fraction": 0.3, "size": 144},
    {"name": "larger input (192 px)", "fraction": 0.4, "size": 192, "model": {"input_size": None}},
    {"name": "gz1 as committed, seed 1", "fraction": 0.4, "size": 144, "seed": 1},
    {"name": "longer fine-tuning (45 epochs)", "fraction": 0.4, "size": 144,
     "model": {"fine_tune_epochs": 45}},
    {"name": "tighter view (radius at 0.5)", "fraction": 0.5, "size": 144},
    {"name": "wider and larger (0.3, 208 px)", "fraction": 0.3, "size": 208,
     "model": {"input_size": None}},
    {"name": "gz1 as committed, seed 2", "fraction": 0.4, "size": 144, "seed": 2},
]


def run(args) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(args.config)
    images, split, labels = load_frames(args.frames)
    if args.smoke:
        images, split, labels = images[::16], split[::16], labels[::16]
        cfg.models.transfer.train.update(epochs=2, min_epochs=1)
        cfg.models.transfer.fine_tune_epochs = 2
    print(f"{len(images)} galaxies loaded", flush=True)
    begin = time.perf_counter()
    chosen = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS
    for v in chosen:
        if time.perf_counter() - begin > args.budget_s:
            print(f"budget spent: skipping {v['name']}", flush=True)
            continue
        x = view(images, v["fraction"], v["size"])
        tr, va = split == "train", split == "val"
        row = train_variant(cfg, v, x[tr], labels[tr], x[va], labels[va], args.weights)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="frame the prepared split's train/val galaxies")
    e.add_argument("--prepared", type=Path, required=True)
    e.add_argument("--raw", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="train and score each variant (accelerator)")
    r.add_argument("config", type=Path, help="the config gpu_fit.py --write-config wrote")
    r.add_argument("frames", type=Path, help="the file export wrote")
    r.add_argument("--weights", default=None, help="ImageNet backbone weights (.h5)")
    r.add_argument("--variants", default=None, help="indices into VARIANTS, comma-separated")
    r.add_argument("--budget-s", type=float, default=420,
                   help="start no new variant after this many seconds")
    r.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    r.add_argument("--smoke", action="store_true",
                   help="200 galaxies, 2+2 epochs: checks the script, not the settings")
    args = parser.parse_args()
    export(args) if args.command == "export" else run(args)


if __name__ == "__main__":
    main()
