"""How fast this host fine-tunes the gz1 transfer model, and whether a compute setting helps.

    python benchmarks/transfer_speed.py                          # float32, as experiment=gz1 trains
    python benchmarks/transfer_speed.py --policy mixed_bfloat16  # bfloat16 compute (AMX CPUs)
    python benchmarks/transfer_speed.py --jit                    # XLA-compiled train step

Builds MobileNetV2 as fine-tuning sees it (random weights, every layer but the batch norms
trainable, backbone in inference mode) at the gz1 input size and batch, times a few training
epochs and a prediction pass on random images, and prints images/s and the wall time one
gz1 fine-tuning epoch (2,726 training and 584 validation galaxies) would take. Training times
quoted in the README assume the host's usual figure; run this first when a training is slow.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

GZ1_TRAIN, GZ1_VAL = 2726, 584


def build(size: int, policy: str, jit: bool):
    import keras

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False,
                                              weights=None)
    for layer in backbone.layers:  # as pipeline.models.set_trainable_from leaves them
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs, training=False))
    outputs = keras.layers.Dense(3, activation="softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(2e-4), "sparse_categorical_crossentropy",
                  jit_compile=jit)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=144, help="input side (experiment=gz1: 144)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="training steps per timed epoch")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs, after one untimed")
    ap.add_argument("--policy", default="float32",
                    choices=["float32", "mixed_bfloat16", "mixed_float16"])
    ap.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    args = ap.parse_args()

    model = build(args.size, args.policy, args.jit)
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    images = rng.uniform(-1, 1, (n, args.size, args.size, 3)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    model.fit(images, labels, batch_size=args.batch, epochs=1, verbose=0)  # tracing, not timed
    start = time.perf_counter()
    model.fit(images, labels, batch_size=args.batch, epochs=args.epochs, verbose=0)
    train_rate = args.epochs * n / (time.perf_counter() - start)
    model.predict(images[:args.batch], batch_size=args.batch, verbose=0)
    start = time.perf_counter()
    model.predict(images, batch_size=args.batch, verbose=0)
    predict_rate = n / (time.perf_counter() - start)

    epoch_s = GZ1_TRAIN / train_rate + GZ1_VAL / predict_rate
    print(f"MobileNetV2 at {args.size}x{args.size}, batch {args.batch}, policy {args.policy}, "
          f"XLA {args.jit}")
    print(f"training:   {train_rate:6.1f} images/s")
    print(f"prediction: {predict_rate:6.1f} images/s")
    print(f"one gz1 fine-tuning epoch: about {epoch_s:.0f} s "
          f"(30 of them: {30 * epoch_s / 60:.1f} min)")


if __name__ == "__main__":
    main()
