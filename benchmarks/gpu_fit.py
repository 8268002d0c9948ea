"""Raw ``model.fit`` throughput of the gz1 models, for accelerators: precision, XLA, batch size.

    python benchmarks/gpu_fit.py --write-config /tmp/gz1-params.yaml   # where Hydra is
    KERAS_BACKEND=jax python benchmarks/gpu_fit.py /tmp/gz1-params.yaml \\
        --weights mobilenet_v2_no_top.h5 --budget-s 420

Builds each gz1 network exactly as ``pipeline.train`` does (``pipeline.models``), then times
``fit`` on random in-memory tensors of the prepared shape: the CNN, the transfer model with its
backbone frozen, and fully fine-tuned. Keras 3 only, so it runs under any backend: on a GPU
machine that has JAX but no TensorFlow (the pipeline's ``tf.data`` input needs TensorFlow) it
measures what the accelerator can do with these models, not the pipeline's input path; on
TensorFlow it is the same "raw fit" that ``train_throughput.py`` compares the pipeline to.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_case(cfg, name: str, phase: str, precision: str, batch: int, jit: bool,
             weights: str | None, images: int, epochs: int) -> dict:
    import keras
    import numpy as np
    from omegaconf import OmegaConf

    from pipeline.models import build_model, set_trainable_from

    keras.mixed_precision.set_global_policy(precision)
    mc = OmegaConf.merge(cfg.models[name], {"weights": weights} if weights else {})
    size = int(cfg.prepare.image_size)
    n_classes = len(cfg.data.classes)
    built = build_model(mc, (size, size, 3), n_classes, cfg.train, name)
    model = built.model
    if phase == "fine_tuning" and built.backbone_name:
        start = next(p.trainable_from for p in built.phases if p.trainable_from is not None)
        set_trainable_from(model, built.backbone_name, start)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (images, size, size, 3)).astype("float32")
    y = rng.integers(0, n_classes, images)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # compile + warm-up
    warm = time.perf_counter() - start
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    keras.mixed_precision.set_global_policy("float32")
    return {"model": name, "phase": phase, "precision": precision, "batch": batch, "jit": jit,
            "images_per_s": round(images * epochs / seconds, 1),
            "first_epoch_s": round(warm, 1), "backend": keras.backend.backend()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?",
                        help="the resolved experiment=gz1 config that --write-config wrote")
    parser.add_argument("--write-config", type=Path, default=None,
                        help="compose conf/ with experiment=gz1 into this file and stop (needs "
                        "Hydra; the accelerator machine then needs only Keras and OmegaConf)")
    parser.add_argument("--weights", default=None, help="ImageNet backbone weights (.h5)")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=420,
                        help="stop starting new cases after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    parser.add_argument("--cases", default="float32:64,float32:256,mixed_bfloat16:256,"
                        "mixed_float16:256", help="precision:batch, comma-separated")
    parser.add_argument("--no-jit", action="store_true")
    args = parser.parse_args()
    from omegaconf import OmegaConf

    if args.write_config:
        from pipeline.config import compose, validate

        OmegaConf.save(validate(compose(["experiment=gz1"])), args.write_config, resolve=True)
        print(f"wrote {args.write_config}")
        return
    if args.config is None:
        parser.error("give the config file --write-config wrote")
    cfg = OmegaConf.load(args.config)
    begin = time.perf_counter()
    for name, phase in (("cnn", "all"), ("transfer", "feature_extraction"),
                        ("transfer", "fine_tuning")):
        for case in args.cases.split(","):
            if time.perf_counter() - begin > args.budget_s:
                print(f"budget spent: skipping {name} {phase} {case}", flush=True)
                continue
            precision, batch = case.split(":")
            row = run_case(cfg, name, phase, precision, int(batch), not args.no_jit,
                           args.weights, args.images, args.epochs)
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
