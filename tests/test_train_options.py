"""Training switches for accelerators and scale-out, exercised on the CPU."""

from __future__ import annotations

from pathlib import Path

import keras
import pandas as pd
import pytest

from pipeline import train
from tests.conftest import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("options,strategy", [
    (["train.strategy=default"], "_DefaultDistributionStrategy"),
    (["train.strategy=mirrored"], "MirroredStrategy"),
    (["train.mixed_precision=true", "train.jit_compile=true"], "_DefaultDistributionStrategy"),
])
def test_training_runs_under_each_strategy_and_precision(prepared_tiny, tmp_path, options,
                                                         strategy):
    cfg = tiny_config(tmp_path, f"paths.raw={prepared_tiny.paths.raw}",
                      f"paths.prepared={prepared_tiny.paths.prepared}", *options)
    try:
        summary = train.run(cfg, "cnn")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert summary.strategy == strategy
    assert summary.replicas == 1  # one CPU device
    history = pd.read_csv(Path(cfg.paths.models) / "cnn" / "history.csv")
    assert history["loss"].notna().all()
    from pipeline.artifacts import load_keras_model

    model = load_keras_model(Path(cfg.paths.models) / "cnn")
    assert model.get_layer("probabilities").dtype_policy.compute_dtype == "float32"
    if "train.mixed_precision=true" in options:  # the convolutions in the device's half type
        import tensorflow as tf

        half = "float16" if tf.config.list_physical_devices("GPU") else "bfloat16"
        convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        assert convolutions
        assert {layer.dtype_policy.compute_dtype for layer in convolutions} == {half}


def test_on_the_fly_augmentation_draws_new_copies_every_epoch():
    import numpy as np
    from omegaconf import OmegaConf

    from pipeline.config import compose, validate
    from pipeline.train import make_dataset

    aug = OmegaConf.merge(validate(compose()).augment, {"mode": "on_the_fly"})
    y_, x_ = np.indices((32, 32))
    galaxy = np.exp(-((x_ - 16) ** 2 / 40 + (y_ - 16) ** 2 / 8))[..., None].repeat(3, -1)
    images = np.repeat((2 * galaxy - 1)[None], 8, axis=0).astype(np.float16)
    ds = make_dataset(images, np.zeros(8, np.int32), 8, False, 0, augment=aug)
    assert ds.element_spec[0].shape.as_list() == [None, 32, 32, 3]
    first, second = (next(iter(ds))[0].numpy() for _ in range(2))
    assert first.shape == (8, 32, 32, 3) and first.dtype == np.float32
    assert not np.allclose(first, second)          # a new draw every epoch
    assert not np.allclose(first[0], first[1])     # and per image
    assert first.min() >= -1 and first.max() <= 1
    plain = next(iter(make_dataset(images, np.zeros(8, np.int32), 8, False, 0)))[0].numpy()
    np.testing.assert_allclose(plain, images.astype(np.float32))


def test_resampling_draws_every_class_equally_often_each_epoch():
    """train.class_weight=resample: 90 ellipticals and 10 spirals come out about 50/50, each
    image still paired with its own label, and every epoch is a new draw of the same length."""
    import numpy as np

    from pipeline.train import make_dataset

    labels = np.array([0] * 90 + [1] * 10, dtype=np.int32)
    images = np.broadcast_to(np.arange(100, dtype=np.float32)[:, None, None, None],
                             (100, 2, 2, 3)).copy()  # each image holds its own index
    ds = make_dataset(images, labels, 25, True, 0, balanced=True)
    epochs = []
    for _ in range(20):
        drawn = [(x.numpy()[:, 0, 0, 0].astype(int), y.numpy()) for x, y in ds]
        index = np.concatenate([i for i, _ in drawn])
        assert len(index) == 100                             # an epoch keeps its length
        np.testing.assert_array_equal(np.concatenate([y for _, y in drawn]), labels[index])
        epochs.append(index)
    spiral_share = np.mean([(labels[i] == 1).mean() for i in epochs])
    assert 0.45 < spiral_share < 0.55                        # 10% in the data
    assert len(np.unique(np.concatenate(epochs)[labels[np.concatenate(epochs)] == 0])) == 90
    assert not np.array_equal(epochs[0], epochs[1])
    plain = np.concatenate([x.numpy()[:, 0, 0, 0] for x, _ in
                            make_dataset(images, labels, 25, True, 0)])
    assert sorted(plain.astype(int)) == list(range(100))     # without it: each image once


@pytest.mark.slow
def test_resample_zoom_and_averaging_reach_the_metrics_and_the_card(prepared_tiny, tmp_path):
    from omegaconf import open_dict

    from pipeline import evaluate, report

    cfg = tiny_config(tmp_path, f"paths.raw={prepared_tiny.paths.raw}",
                      f"paths.prepared={prepared_tiny.paths.prepared}",
                      "train.class_weight=resample", "evaluate.tta_zoom=1.2",
                      "train.ema_momentum=0.9", "models.cnn.input_size=48")
    with open_dict(cfg):
        del cfg.models["transfer"]  # a project with one model: its card alone
    summary = train.run(cfg, "cnn")
    assert summary.class_balance == "resample" and len(summary.class_balance_weights) == 3
    metrics = evaluate.run(cfg, "cnn")
    assert metrics.tta_zoom == 1.2
    report.run(cfg)
    card = (Path(cfg.paths.reports) / "cards" / "cnn.md").read_text()
    assert "class-balanced sampling, every class drawn equally often each epoch" in card
    assert "Test images are magnified 1.2x about the centre" in card
    assert ("exponential moving average of the trained ones (Polyak averaging, momentum 0.9 "
            "per step)") in card
    assert "**Architecture**: images resized to 48x48 px inside the model, 2 conv blocks" in card


@pytest.mark.slow
def test_on_the_fly_mode_stores_no_copies_and_trains(tmp_path):
    from pipeline import fetch, prepare
    from pipeline.io import load_arrays

    cfg = tiny_config(tmp_path, "augment.mode=on_the_fly")
    fetch.run(cfg)
    meta = prepare.run(cfg)
    assert meta.augment_mode == "on_the_fly"
    assert not load_arrays(Path(cfg.paths.prepared) / "train")["augmented"].any()
    summary = train.run(cfg, "cnn")
    assert summary.train_images == meta.splits["train"].galaxies


def test_best_epoch_skips_each_phases_first_min_epochs():
    history = pd.DataFrame({"epoch": range(1, 9),
                            "val_loss": [0.1, 0.9, 0.8, 0.7, 0.05, 0.6, 0.5, 0.55]})
    records = [{"last_epoch": 4, "epochs_run": 4}, {"last_epoch": 8, "epochs_run": 4}]
    assert train.best_epoch_row(history, records, 0)["epoch"] == 5
    # Epochs 1-2 and 5-6 are each phase's warm-up: the lucky 0.1 and 0.05 do not count.
    assert train.best_epoch_row(history, records, 2)["epoch"] == 7
    assert train.best_epoch_row(history, records, 10)["epoch"] == 8  # none qualified: the last


def test_a_diverged_training_is_one_line_and_saves_nothing():
    import numpy as np

    from pipeline.errors import TrainingDiverged

    history = pd.DataFrame({"epoch": [1, 2, 3], "val_loss": [np.nan] * 3})
    best = train.best_epoch_row(history, [{"last_epoch": 3, "epochs_run": 3}], 0)
    assert best["epoch"] == 3
    with pytest.raises(TrainingDiverged, match=r"^training cnn diverged: the validation loss "
                                               r"was NaN or infinite at every epoch that could be "
                                               r"kept, so nothing was saved; lower "
                                               r"train.learning_rate \(it is 0.5\)"):
        train.check_learned(float(best["val_loss"]), 3, 0.5, "cnn")


@pytest.mark.slow
def test_a_training_worse_than_a_guess_is_saved_with_a_warning(prepared_tiny, tmp_path, caplog):
    cfg = tiny_config(tmp_path, f"paths.raw={prepared_tiny.paths.raw}",
                      f"paths.prepared={prepared_tiny.paths.prepared}", "train.epochs=2",
                      "train.learning_rate=10")
    with caplog.at_level("WARNING", logger="pipeline.train"):
        summary = train.run(cfg, "cnn")
    assert summary.best_val_loss > 1.0987  # log 3: a uniform guess
    assert (Path(cfg.paths.models) / "cnn" / "model.keras").is_file()
    assert (f"training cnn learned nothing: its best validation loss {summary.best_val_loss:.4g} "
            "is no better than a uniform guess over 3 classes (log 3 = 1.099); lower "
            "train.learning_rate (it is 10)") in caplog.text


@pytest.mark.slow
def test_min_epochs_keeps_no_early_epoch(prepared_tiny, tmp_path):
    cfg = tiny_config(tmp_path, f"paths.raw={prepared_tiny.paths.raw}",
                      f"paths.prepared={prepared_tiny.paths.prepared}", "train.epochs=4",
                      "train.min_epochs=2", "train.early_stopping_patience=1000",
                      "evaluate.prior_correction=0.5")
    summary = train.run(cfg, "cnn")
    from pipeline import evaluate
    from pipeline.artifacts import InferenceSettings

    # A fixed prior correction is kept as given; evaluate fits, stores, applies and reports it.
    metrics = evaluate.run(cfg, "cnn")
    assert metrics.prior_correction == "0.5" and metrics.prior_correction_alpha == 0.5
    correction = InferenceSettings.load(Path(cfg.paths.models) / "cnn").prior_correction
    assert correction.alpha == 0.5 and correction.how == "0.5"
    assert list(correction.validation_macro_f1) == ["0.5"]
    weights = summary.class_balance_weights
    assert correction.class_factors == pytest.approx([w ** -0.5 for w in weights])
    history = pd.read_csv(Path(cfg.paths.models) / "cnn" / "history.csv")
    assert len(history) == 4
    later = history[history["epoch"] > 2]
    assert summary.best_epoch == int(later.loc[later["val_loss"].idxmin(), "epoch"])
    assert summary.best_val_loss == pytest.approx(later["val_loss"].min())


@pytest.mark.slow
def test_min_epochs_longer_than_training_keeps_the_last_epoch(prepared_tiny, tmp_path):
    """No epoch qualifies: nothing is restored, and the model saved is the last epoch's."""
    cfg = tiny_config(tmp_path, f"paths.raw={prepared_tiny.paths.raw}",
                      f"paths.prepared={prepared_tiny.paths.prepared}", "train.epochs=2",
                      "train.min_epochs=5")
    summary = train.run(cfg, "cnn")
    assert summary.epochs == 2 and summary.best_epoch == 2
    assert summary.phases[0].best_val_loss_so_far is None


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "transfer"])
def test_weight_averaging_keeps_the_weights_it_validated(prepared_tiny, tmp_path, model):
    """With ``train.ema_momentum``, the val_loss that chose the best epoch is the saved model's."""
    import numpy as np

    from pipeline.artifacts import load_keras_model, load_split

    cfg = tiny_config(tmp_path, f"paths.raw={prepared_tiny.paths.raw}",
                      f"paths.prepared={prepared_tiny.paths.prepared}", "train.epochs=3",
                      "train.ema_momentum=0.9", "train.early_stopping_patience=1000")
    summary = train.run(cfg, model)
    val = load_split(Path(cfg.paths.prepared), "val")
    saved = load_keras_model(Path(cfg.paths.models) / model)
    proba = saved.predict(val["images"].astype(np.float32), verbose=0)
    loss = float(keras.losses.SparseCategoricalCrossentropy()(val["labels"], proba))
    loss += sum(float(penalty) for penalty in saved.losses)  # val_loss includes the L2 terms
    assert loss == pytest.approx(summary.best_val_loss, rel=1e-3)


@pytest.mark.slow
def test_label_smoothing_trains_on_softened_targets(prepared_tiny, tmp_path):
    """The validation loss the run kept is the cross-entropy against smoothed targets."""
    import numpy as np

    from pipeline.artifacts import load_keras_model, load_split

    cfg = tiny_config(tmp_path, f"paths.raw={prepared_tiny.paths.raw}",
                      f"paths.prepared={prepared_tiny.paths.prepared}",
                      "train.label_smoothing=0.3")
    summary = train.run(cfg, "cnn")
    val = load_split(Path(cfg.paths.prepared), "val")
    saved = load_keras_model(Path(cfg.paths.models) / "cnn")
    proba = saved.predict(val["images"].astype(np.float32), verbose=0)
    penalties = sum(float(penalty) for penalty in saved.losses)
    targets = np.eye(proba.shape[1])[val["labels"]]
    smoothed = float(keras.losses.CategoricalCrossentropy(label_smoothing=0.3)(targets, proba))
    hard = float(keras.losses.CategoricalCrossentropy()(targets, proba))
    assert smoothed + penalties == pytest.approx(summary.best_val_loss, rel=1e-3)
    assert abs(hard - smoothed) > 0.01  # the two losses differ on this model


def test_label_smoothing_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'train.label_smoothing' = 0.5 is invalid: a fraction "
                                         r"in \[0, 0.5\)"):
        tiny_config(tmp_path, "train.label_smoothing=0.5")


def test_ema_momentum_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'train.ema_momentum' = 1.0 is invalid: a momentum "
                                         r"in \[0, 1\)"):
        tiny_config(tmp_path, "train.ema_momentum=1.0")


def test_multi_worker_training_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"'train.strategy' = 'multi_worker' is invalid: .*"
                                         r"keras-team/keras#20585"):
        tiny_config(tmp_path, "train.strategy=multi_worker")


MULTI_WORKER_FIT = """
import numpy as np, tensorflow as tf, keras
strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
ds = tf.data.Dataset.from_tensor_slices((x, np.arange(64) % 3)).batch(16)
model.fit(ds, epochs=1, verbose=0)
print("weights", float(model.get_weights()[0].sum()))
"""


@pytest.mark.slow
def test_keras_multi_worker_fit_still_fails_upstream(tmp_path):
    """Two real workers on 127.0.0.1 (TF_CONFIG, CPU). If this starts to pass, Keras has fixed
    keras-team/keras#20585: allow train.strategy=multi_worker again."""
    import json
    import os
    import socket
    import subprocess
    import sys

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    script = tmp_path / "fit.py"
    script.write_text(MULTI_WORKER_FIT)
    workers = [subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "TF_CONFIG": json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
            "task": {"type": "worker", "index": i}})}) for i in range(2)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    assert all(w.returncode != 0 and "PerReplica" in out for w, out in
               zip(workers, outputs, strict=True)), (
        "Keras multi-worker fit now runs: re-enable train.strategy=multi_worker\n"
        + "\n".join(o[-1500:] for o in outputs))


def test_mixup_blends_images_targets_and_class_weights_alike():
    """Each image becomes a blend of two galaxies of its batch, and its target and loss weight
    are the same blend of theirs: the model is never told a blend is pure."""
    import numpy as np
    import tensorflow as tf

    from pipeline.train import mixup

    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2], np.int32)
    brightness = np.array([0.0, 1.0, -1.0], np.float32)       # one flat value per class
    images = np.broadcast_to(brightness[labels][:, None, None, None], (8, 4, 4, 3)).copy()
    weights = {0: 0.5, 1: 1.0, 2: 2.0}
    ds = mixup(tf.data.Dataset.from_tensors((images, labels)).repeat(2), 0.4, 3, weights, 7)
    epochs = [[t.numpy() for t in batch] for batch in ds]
    for x, y, w in epochs:
        assert x.shape == images.shape and y.shape == (8, 3) and w.shape == (8,)
        np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(x[:, 0, 0, 0], y @ brightness, atol=1e-6)
        np.testing.assert_allclose(w, y @ np.array([0.5, 1.0, 2.0]), atol=1e-6)
        assert (y[np.arange(8), labels] >= 0.5 - 1e-6).all()   # each keeps the larger share
    assert any((y.max(axis=1) < 0.99).any() for _, y, _ in epochs)  # some are real blends
    assert not np.allclose(epochs[0][1], epochs[1][1])               # new draws each pass


@pytest.mark.slow
def test_mixup_training_writes_a_card_that_says_so(prepared_tiny, tmp_path):
    from omegaconf import open_dict

    from pipeline import evaluate, report

    cfg = tiny_config(tmp_path, f"paths.raw={prepared_tiny.paths.raw}",
                      f"paths.prepared={prepared_tiny.paths.prepared}", "train.mixup=0.2")
    summary = train.run(cfg, "cnn")
    assert summary.best_val_loss > 0
    evaluate.run(cfg, "cnn")
    with open_dict(cfg):
        del cfg.models["transfer"]  # report only the model trained here
    report.run(cfg)
    card = (Path(cfg.paths.reports) / "cards" / "cnn.md").read_text()
    assert "categorical cross-entropy on mixup blends of image pairs (shares from Beta(0.2, 0.2)" \
        in card
    assert "sparse" not in card.split("**Training**")[1].split("\n")[0]


def test_mixup_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'train.mixup' = -0.2 is invalid: a Beta\(alpha, "
                                         r"alpha\) parameter in \[0, 10\]"):
        tiny_config(tmp_path, "train.mixup=-0.2")


HEAP_PROBE = """
import ctypes, numpy as np, tensorflow as tf
from pipeline.train import make_dataset
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def from_heap():
    # a 1 MiB block lands in the [heap] mapping unless glibc maps it on its own
    block = libc.malloc(1 << 20)
    heap = [line.split()[0] for line in open("/proc/self/maps") if "[heap]" in line]
    low, high = (int(a, 16) for a in heap[0].split("-"))
    libc.free(block)
    return low <= block < high

bare = tf.data.Dataset.from_generator(lambda: iter([np.zeros(4, np.float32)]),
                                      output_signature=tf.TensorSpec((4,), tf.float32))
list(bare)
print("bare from_generator:", from_heap())
x = np.zeros((8, 4, 4, 3), np.float32)
for _ in make_dataset(x, np.arange(8) % 2, 4, True, 0):
    pass
print("make_dataset:", from_heap())
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_training_input_lets_glibc_reuse_freed_buffers(tmp_path):
    """TensorFlow's from_generator kernel pins glibc's mmap threshold at 128 KiB, so every larger
    buffer of a training step is mapped, page-faulted and unmapped again (issue #22). After
    make_dataset's generator has run, a 1 MiB block comes from the reusable heap again. If the
    bare line starts to say True, TensorFlow has stopped pinning it and the workaround can go."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(HEAP_PROBE)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=180, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "bare from_generator: False" in out.stdout, out.stdout
    assert "make_dataset: True" in out.stdout, out.stdout


@pytest.mark.slow
def test_the_log_names_one_kept_epoch_when_training_stops_early(prepared_tiny, tmp_path,
                                                                 caplog, capfd):
    """Keras's early stopping counts only gains above min_delta as its best epoch, while the
    checkpoint keeps the lowest validation loss: two different "best epochs" in one log read
    as a bug. The log says once which epoch's weights were saved, and why training stopped."""
    cfg = tiny_config(tmp_path, f"paths.raw={prepared_tiny.paths.raw}",
                      f"paths.prepared={prepared_tiny.paths.prepared}", "train.epochs=30",
                      "train.early_stopping_patience=1", "train.early_stopping_min_delta=0.5")
    with caplog.at_level("INFO", logger="pipeline.train"):
        summary = train.run(cfg, "cnn")
    history = pd.read_csv(Path(cfg.paths.models) / "cnn" / "history.csv")
    assert len(history) < 30
    assert (f"phase train stopped early after epoch {len(history)}: validation loss gained "
            "less than 0.5 (train.early_stopping_min_delta) over 1 epoch(s)") in caplog.text
    assert summary.best_epoch == history.loc[history["val_loss"].idxmin(), "epoch"]
    assert (f"the weights of epoch {summary.best_epoch} (lowest val_loss "
            f"{summary.best_val_loss:.4f})") in caplog.text
    assert "Restoring model weights" not in capfd.readouterr().out
