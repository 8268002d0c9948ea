"""Whether a compute setting speeds up fine-tuning the gz1 transfer model on this host.

    python benchmarks/transfer_speed.py                          # float32, as experiment=gz1 trains
    python benchmarks/transfer_speed.py --policy mixed_bfloat16  # bfloat16 compute (AMX CPUs)
    python benchmarks/transfer_speed.py --jit --input-size 144   # XLA step (no resize to compile)
    python benchmarks/transfer_speed.py --fine-tune-layers 100   # early blocks left frozen
    python benchmarks/transfer_speed.py --input-size 144         # the backbone at 144 px, as before

Builds the transfer model of ``experiment=gz1`` with pipeline.models, as its fine-tuning
phase trains it (backbone weights saved from a random initialisation, so nothing is
downloaded; the top ``fine_tune_layers`` trainable, batch norms frozen), times a few training
epochs and a prediction pass on random images, and prints images/s. Compare settings with it
on one host, at one time: the figures move with the host's load, and in-memory arrays do not
reproduce the overlap of the training input pipeline, so they do not predict a training's
wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def build(policy: str, jit: bool, weights_dir: Path, fine_tune_layers: int | None,
          input_size: int | None):
    """The gz1 transfer model at the start of fine-tuning, with its input side, the side its
    backbone sees, batch size and number of fine-tuned backbone layers. ``input_size`` overrides
    ``models.transfer.input_size`` (the side the prepared images are resized to inside the
    model)."""
    import keras
    from omegaconf import OmegaConf

    from pipeline.config import compose, model_train_config, validate
    from pipeline.models import build_model, set_trainable_from

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    cfg = compose(["experiment=gz1"])
    size = int(cfg.prepare.image_size)
    weights = weights_dir / "random_no_top.weights.h5"  # build_model loads a local file
    keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False,
                                   weights=None).save_weights(weights)
    overrides = {"weights": str(weights)}
    if fine_tune_layers is not None:
        overrides["fine_tune_layers"] = fine_tune_layers
    if input_size is not None:
        overrides["input_size"] = input_size
    cfg = validate(OmegaConf.merge(cfg, {"models": {"transfer": overrides}}))
    train = model_train_config(cfg, "transfer")
    built = build_model(cfg.models.transfer, (size, size, 3), len(cfg.data.classes), train,
                        "transfer")
    fine_tuning = built.phases[-1]
    set_trainable_from(built.model, built.backbone_name, fine_tuning.trainable_from)
    built.model.compile(keras.optimizers.Adam(fine_tuning.learning_rate),
                        "sparse_categorical_crossentropy", jit_compile=jit)
    seen = built.model.get_layer(built.backbone_name).inputs[0].shape[1]
    return (built.model, size, seen, int(train.batch_size),
            int(cfg.models.transfer.fine_tune_layers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="training steps per timed epoch")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs, after one untimed")
    ap.add_argument("--policy", default="float32",
                    choices=["float32", "mixed_bfloat16", "mixed_float16"])
    ap.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    ap.add_argument("--fine-tune-layers", type=int, default=None,
                    help="top backbone layers fine-tuned (default: experiment=gz1's value)")
    ap.add_argument("--input-size", type=int, default=None,
                    help="side the backbone sees, resized inside the model (default: "
                         "experiment=gz1's value)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model, size, seen, batch, layers = build(args.policy, args.jit, Path(tmp),
                                                 args.fine_tune_layers, args.input_size)
    rng = np.random.default_rng(0)
    n = batch * args.steps
    images = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    model.fit(images, labels, batch_size=batch, epochs=1, verbose=0)  # tracing, not timed
    start = time.perf_counter()
    model.fit(images, labels, batch_size=batch, epochs=args.epochs, verbose=0)
    train_rate = args.epochs * n / (time.perf_counter() - start)
    model.predict(images[:batch], batch_size=batch, verbose=0)
    start = time.perf_counter()
    model.predict(images, batch_size=batch, verbose=0)
    predict_rate = n / (time.perf_counter() - start)

    print(f"gz1 transfer model (MobileNetV2) given {size}x{size}, backbone at {seen}x{seen}, "
          f"batch {batch}, policy {args.policy}, XLA {args.jit}, "
          f"top {layers} backbone layers fine-tuned")
    print(f"training:   {train_rate:6.1f} images/s")
    print(f"prediction: {predict_rate:6.1f} images/s")


if __name__ == "__main__":
    main()
