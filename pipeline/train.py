"""Stage 3, train: one training path for every model; the builder is the only difference.

Every epoch scores the validation split. Early stopping restores the best weights, the best
weights are also checkpointed (across phases, so fine-tuning that makes things worse is
undone), the learning rate is cut on plateaus or follows a warm-up and cosine decay
(``train.lr_schedule``), and a per-epoch CSV records losses, metrics, learning rate, wall
time and images per second. The run's state lives in ``paths.backup``
while it trains, so a killed run resumes from its last finished epoch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import (
    HISTORY_NAME,
    INFERENCE_NAME,
    MODEL_NAME,
    SUMMARY_NAME,
    Layout,
    PhaseRecord,
    PreparedMeta,
    TrainSummary,
    load_split,
    save_config,
)
from pipeline.config import model_train_config, schedule_description, stage_main
from pipeline.errors import PipelineError, TrainingDiverged
from pipeline.io import OutputError, atomic_path, check_replaceable, refuse_overlap
from pipeline.models import BuiltModel, build_model, set_trainable_from
from pipeline.models.transfer import backbone_weights

log = logging.getLogger(__name__)


def in_memory(x) -> bool:
    """Whether a split is small enough to hold in memory while training: at most a quarter of
    this machine's memory (the rest is the model's, and the validation split's)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: stream from disk
        return False
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize <= total // 4


# glibc's mallopt() parameters (<malloc.h>): a buffer of at least M_MMAP_THRESHOLD bytes gets a
# mapping of its own, unmapped when freed; the heap's free top is returned above M_TRIM_THRESHOLD.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 2**20   # the largest glibc accepts: every per-step buffer below it
TRIM_THRESHOLD_BYTES = 512 * 2**20  # is reused; a freed top is kept up to this much


@functools.cache
def glibc_mallopt():
    """glibc's ``mallopt``, or None under another C library. Looked up once: ``libc_ver`` reads
    the interpreter's binary."""
    import ctypes
    import platform

    return ctypes.CDLL(None).mallopt if platform.libc_ver()[0] == "glibc" else None


def reuse_freed_memory() -> bool:
    """Let glibc reuse the buffers TensorFlow frees at every step instead of unmapping them.

    Constructing a ``Dataset.from_generator`` kernel calls ``mallopt(M_MMAP_THRESHOLD, 128 KiB)``
    (TensorFlow 2.21, seen with ``perf probe``), which also switches off glibc's adaptive
    threshold. From then on every buffer above 128 KiB (the optimizer's per-weight temporaries,
    activations) is mapped and unmapped at each step, and each of its pages faults on first
    touch: the page faults of issue #22 (docs/benchmarks.md, "Where the page faults come from").
    Called from inside the generator, that is after the kernel's constructor. False where the C
    library is not glibc; nothing is changed there.
    """
    mallopt = glibc_mallopt()
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int,
                 augment: DictConfig | None = None, deterministic: bool = False,
                 balanced: bool = False, hold_in_memory: bool | None = None):
    """A tf.data pipeline that streams batches from the prepared arrays on disk.

    Every epoch draws a new permutation (a global shuffle, no buffer) and gathers each batch's
    images from ``x``, which may be a :class:`pipeline.io.NpyRows` reading rows from disk:
    only the batches in flight are in memory.
    Batches are cast to float32 and prefetched so the model never waits on input. With
    ``augment`` (``augment.mode: on_the_fly``) every batch gets fresh random copies from
    :func:`pipeline.augment.random_augment`, TensorFlow ops seeded per batch and epoch: they
    run on every core in parallel, and the same seed gives the same copies. With ``balanced``
    (``train.class_weight: resample``) each epoch draws its ``len(y)`` images with replacement
    so that every class comes up equally often: rare classes are seen more often, each time
    (with on-the-fly augmentation) as a new random copy.
    """
    import itertools

    import tensorflow as tf

    n = len(y)
    order_rng = np.random.default_rng(seed)
    epochs = itertools.count()
    draw_p = None
    if balanced:
        counts = np.bincount(y)
        draw_p = 1.0 / counts[y]
        draw_p /= draw_p.sum()

    def batches(gather: bool = True):
        reuse_freed_memory()
        epoch = next(epochs)
        if draw_p is not None:
            order = order_rng.choice(n, size=n, replace=True, p=draw_p)
        elif shuffle:
            order = order_rng.permutation(n)
        else:
            order = np.arange(n)
        for number, start in enumerate(range(0, n, batch_size)):
            idx = np.sort(order[start:start + batch_size])  # sorted: sequential disk reads
            seed_of_batch = np.int64(epoch * 1_000_000 + number)
            if gather:
                yield np.asarray(x[idx]), np.asarray(y[idx], dtype=np.int32), seed_of_batch
            else:
                yield idx, None, seed_of_batch

    if in_memory(x) if hold_in_memory is None else hold_in_memory:
        # The split fits in memory: hold it as one tensor and let the generator hand out only
        # row numbers; every batch is gathered inside the graph, with no Python buffer per
        # batch (docs/benchmarks.md, "Training input pipeline").
        images = tf.constant(np.asarray(x[np.arange(n)]))
        labels = tf.constant(np.asarray(y, dtype=np.int32))

        def rows():
            for idx, _, batch_seed in batches(gather=False):
                yield idx, batch_seed

        ds = tf.data.Dataset.from_generator(rows, output_signature=(
            tf.TensorSpec((None,), tf.int64), tf.TensorSpec((), tf.int64)))
        ds = ds.map(lambda idx, s: (tf.gather(images, idx), tf.gather(labels, idx), s),
                    num_parallel_calls=tf.data.AUTOTUNE)
    else:
        spec = (tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype)),
                tf.TensorSpec((None,), tf.int32), tf.TensorSpec((), tf.int64))
        ds = tf.data.Dataset.from_generator(batches, output_signature=spec)
    # A generator has no known length; telling tf.data lets Keras count steps per epoch.
    ds = ds.apply(tf.data.experimental.assert_cardinality(-(-n // batch_size)))
    if augment is None:
        ds = ds.map(lambda a, b, _: (tf.cast(a, tf.float32), b),
                    num_parallel_calls=tf.data.AUTOTUNE)
    else:
        from pipeline.augment import random_augment

        def apply(a, b, batch_seed):
            copy = random_augment(a, augment, tf.stack([tf.constant(seed + 1, tf.int64),
                                                         batch_seed]))
            return tf.ensure_shape(copy, a.shape), b

        ds = ds.map(apply, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    return ds.prefetch(tf.data.AUTOTUNE)


def mixup(ds, alpha: float, n_classes: int, class_weight: dict | None, seed: int):
    """Blend every training image with another of its batch (``train.mixup``; Zhang et al.
    2018): image and one-hot target alike, by a share drawn from Beta(alpha, alpha). Blends
    with no clear class teach the model to hedge between similar-looking classes (faint discs
    and ellipticals) instead of memorising the noisy volunteer labels. Each image keeps the
    larger share, and its loss weight is the blend of the two classes' weights."""
    import tensorflow as tf

    weight_of = tf.constant([float((class_weight or {}).get(c, 1.0)) for c in range(n_classes)],
                            tf.float32)
    draws = tf.data.Dataset.random(seed=seed + 2, rerandomize_each_iteration=True)

    def blend(batch, draw):
        x, y = batch
        n = tf.shape(y)[0]
        gamma = tf.random.stateless_gamma([2, n], tf.stack([tf.constant(seed, tf.int64), draw]),
                                          alpha=alpha)
        share = gamma[0] / tf.maximum(gamma[0] + gamma[1], 1e-12)
        share = tf.maximum(share, 1.0 - share)
        other = tf.random.experimental.stateless_shuffle(
            tf.range(n), tf.stack([tf.constant(seed + 1, tf.int64), draw]))
        target = tf.one_hot(y, n_classes)
        mixed_x = (share[:, None, None, None] * x
                   + (1.0 - share[:, None, None, None]) * tf.gather(x, other))
        mixed_y = share[:, None] * target + (1.0 - share[:, None]) * tf.gather(target, other)
        return mixed_x, mixed_y, tf.linalg.matvec(mixed_y, weight_of)

    return tf.data.Dataset.zip(ds, draws).map(
        blend, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def epoch_stats_callback(phase: int, n_images: int):
    """Adds learning rate, phase number, wall time and throughput to each epoch's logs.

    Keras averages log values, so the phase goes in as its 1-based number; the final
    ``history.csv`` also names it.
    """
    import keras

    class EpochStats(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            seconds = time.perf_counter() - self._start
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            logs["epoch_time_s"] = round(seconds, 3)
            logs["images_per_s"] = round(n_images / seconds, 1)
            logs["phase"] = float(phase)

    return EpochStats()


def precision_policy(mixed: bool) -> str:
    """The Keras dtype policy of ``train.mixed_precision``: float16 where GPUs run it on
    tensor cores, bfloat16 on a CPU, whose oneDNN kernels have bfloat16 (AVX512_BF16, AMX)
    but fall back to slow generic code for float16. Weights and the softmax stay float32."""
    if not mixed:
        return "float32"
    import tensorflow as tf

    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


def distribution_strategy(name: str):
    """``tf.distribute`` strategy from ``train.strategy``.

    ``mirrored`` replicates the model on every GPU of this machine; ``train.batch_size`` is
    the global batch, split across replicas. (Multi-worker training is refused by the config
    checks: Keras 3's ``fit`` does not run under ``MultiWorkerMirroredStrategy``.)
    """
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def epochs_logged(state: Path) -> int:
    """Epochs finished so far in this run (rows of the per-epoch CSV in its state folder)."""
    path = state / HISTORY_NAME
    if not path.is_file():
        return 0
    return max(0, len(path.read_text().splitlines()) - 1)


def config_fingerprint(cfg: DictConfig, name: str) -> str:
    """What a resumed run must share with the killed one: data, model and training params."""
    relevant = {k: OmegaConf.to_container(cfg[k], resolve=True)
                for k in ("data", "prepare", "augment", "train")}
    relevant["model"] = OmegaConf.to_container(cfg.models[name], resolve=True)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class TrainingBusyError(PipelineError, RuntimeError):
    """Another process is training into the same state folder."""


@contextlib.contextmanager
def exclusive_state(state: Path, name: str):
    """One training per state folder: a second one would resume from, then delete, the first's
    files. An advisory ``flock`` beside the folder; the OS drops it if the process dies."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): run unguarded
        yield
        return
    state.parent.mkdir(parents=True, exist_ok=True)
    with (state.parent / f"{state.name}.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingBusyError(
                f"{state}: another process is training {name!r} with this state folder; wait "
                "for it to finish, or give this run its own paths.backup") from None
        yield


def prepare_state_dir(state: Path, fingerprint: str) -> bool:
    """Reuse the state of a killed run with the same config; returns True when resuming.

    Only a folder this stage made (it holds ``fingerprint.txt``) is ever deleted: a
    ``paths.backup`` pointed at a folder of the user's is refused instead.
    """
    stamp = state / "fingerprint.txt"
    if state.is_dir() and stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return True
    if state.exists():
        if not stamp.is_file() and (not state.is_dir() or any(state.iterdir())):
            raise OutputError(
                f"paths.backup = {str(state.parent)!r}: {state} holds files this stage did not "
                "write (no fingerprint.txt); refusing to delete them: point paths.backup at a "
                "folder of its own")
        log.info("discarding training state in %s from a different config", state)
        shutil.rmtree(state)
    state.mkdir(parents=True)
    stamp.write_text(fingerprint)
    return False


def class_balance_weights(mode: str, labels: np.ndarray) -> dict[int, float] | None:
    """Inverse-frequency class weights for ``train.class_weight``: the loss weights (balanced),
    or the prior shift that balanced sampling makes (resample); the prior correction partly
    undoes either. None for ``none``."""
    from sklearn.utils.class_weight import compute_class_weight

    if mode not in ("balanced", "resample"):
        return None
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights, strict=True)}


def phase_learning_rate(peak: float, epochs: int, steps_per_epoch: int, t: DictConfig):
    """The optimizer's learning rate for one phase: ``peak`` held and cut on plateaus
    (``train.lr_schedule=plateau``, with ReduceLROnPlateau), or a cosine decay from ``peak``
    to zero over the phase after a linear warm-up from ``peak / 100`` over
    ``train.warmup_epochs`` (``cosine``).

    The warm-up matters most when fine-tuning starts: a fresh Adam at full rate on a whole
    pretrained backbone throws away much of what the frozen phase learnt in its first epochs.
    The decay makes the last epochs' weights settle, so the epoch early stopping keeps depends
    less on the noise of a small validation split.
    """
    import keras

    if t.lr_schedule == "plateau":
        return peak
    warmup = min(int(t.warmup_epochs), epochs - 1) * steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak / 100 if warmup else peak,
        decay_steps=max(1, epochs * steps_per_epoch - warmup),
        warmup_target=peak if warmup else None, warmup_steps=warmup)


def adam(lr_scales: dict[str, float] | None, **kwargs):
    """Keras' Adam, with each weight's step scaled by its ``lr_scales`` entry when given.

    Adam divides the gradient by its own running scale, so scaling gradients would change
    nothing: the factor has to multiply the rate, which ``update_step`` receives per weight.
    """
    import keras

    if not lr_scales:
        return keras.optimizers.Adam(**kwargs)

    class LayerwiseAdam(keras.optimizers.Adam):
        def build(self, variables):
            super().build(variables)
            # update_step may get the backend's variable, which has no Keras path
            self.scale_by_key = {self._var_key(v): lr_scales.get(v.path, 1.0) for v in variables}

        def update_step(self, gradient, variable, learning_rate):
            scale = self.scale_by_key.get(self._var_key(variable), 1.0)
            super().update_step(gradient, variable,
                                learning_rate if scale == 1.0 else learning_rate * scale)

    return LayerwiseAdam(**kwargs)


def check_learned(best_val_loss: float, n_classes: int, learning_rate: float, name: str) -> None:
    """A training that diverged (no finite validation loss to keep) is an error and nothing is
    saved; one whose kept validation loss is no better than a uniform guess, log(classes), is
    saved with a warning, since a learning-rate sweep may well try such a rate."""
    guess = float(np.log(n_classes))
    hint = (f"lower train.learning_rate (it is {learning_rate:g}), or check that the prepared "
            "images vary and their labels are right")
    if not np.isfinite(best_val_loss):
        raise TrainingDiverged(f"training {name} diverged: the validation loss was NaN or "
                               f"infinite at every epoch that could be kept, so nothing was "
                               f"saved; {hint}")
    if best_val_loss >= guess:
        log.warning("training %s learned nothing: its best validation loss %.4g is no better "
                    "than a uniform guess over %d classes (log %d = %.3f); %s", name,
                    best_val_loss, n_classes, n_classes, guess, hint)


def best_epoch_row(history, records: list[dict], min_epochs: int):
    """The history row of the weights kept: lowest val_loss among epochs past each phase's
    first ``min_epochs`` (the last epoch if none qualified, as then nothing was restored)."""
    eligible = np.ones(len(history), dtype=bool)
    for record in records:
        start = record["last_epoch"] - record["epochs_run"]
        warmup = (history["epoch"] > start) & (history["epoch"] <= start + min_epochs)
        eligible &= ~warmup.to_numpy()
    candidates = history[eligible]
    if candidates["val_loss"].isna().all():  # none qualified, or every loss was NaN
        return history.iloc[-1]
    return candidates.loc[candidates["val_loss"].idxmin()]


def fit_phases(built: BuiltModel, data: dict, cfg: DictConfig, state: Path,
               class_weight: dict | None) -> list[dict]:
    """Run the builder's phases in order through one ``fit`` loop; returns per-phase records."""
    import keras

    class CheckpointAfter(keras.callbacks.ModelCheckpoint):
        """Ignores epochs before ``start_epoch`` (``train.min_epochs``), as
        ``EarlyStopping(start_from_epoch=...)`` does, so an early, lucky validation score is
        not kept as the best model."""

        start_epoch = 0

        def on_epoch_end(self, epoch, logs=None):
            if epoch >= self.start_epoch:
                super().on_epoch_end(epoch, logs)

    t = cfg.train
    model = built.model
    x_train, y_train = data["train"]
    x_val, y_val = data["val"]
    on_the_fly = cfg.augment.mode == "on_the_fly" and cfg.augment.copies > 0
    train_ds = make_dataset(x_train, y_train, t.batch_size, True, t.seed,
                            augment=cfg.augment if on_the_fly else None,
                            deterministic=bool(t.deterministic),
                            balanced=t.class_weight == "resample")
    val_ds = make_dataset(x_val, y_val, t.batch_size, False, t.seed)
    loss = "sparse_categorical_crossentropy"
    if t.label_smoothing > 0 or t.mixup > 0:  # both need one-hot targets
        import tensorflow as tf

        classes = int(model.output_shape[-1])
        val_ds = val_ds.map(lambda x, y: (x, tf.one_hot(y, classes)))
        if t.mixup > 0:  # the blend carries the class weights as sample weights
            train_ds = mixup(train_ds, float(t.mixup), classes, class_weight, int(t.seed))
            class_weight = None
        else:
            train_ds = train_ds.map(lambda x, y: (x, tf.one_hot(y, classes)))
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=float(t.label_smoothing))
    best_weights = state / "best.weights.h5"
    checkpoint = CheckpointAfter(
        best_weights, monitor="val_loss", save_best_only=True, save_weights_only=True)
    records, epoch = [], 0
    for number, phase in enumerate(built.phases, start=1):
        done = state / f"{phase.name}.done.json"
        if done.is_file():  # finished before an interruption: restore its end state and move on
            record = json.loads(done.read_text())
            records.append(record)
            epoch = record["last_epoch"]
            checkpoint.best = record["best_val_loss_so_far"]
            log.info("phase %s already finished in an earlier run; skipping", phase.name)
            continue
        if phase.trainable_from is not None and built.backbone_name:
            if best_weights.is_file():
                model.load_weights(best_weights)  # fine-tune from the best frozen-phase weights
            set_trainable_from(model, built.backbone_name, phase.trainable_from)
        rate = phase_learning_rate(phase.learning_rate, phase.epochs,
                                   -(-len(y_train) // t.batch_size), t)
        model.compile(
            optimizer=adam(phase.lr_scales, learning_rate=rate, use_ema=t.ema_momentum > 0,
                           ema_momentum=t.ema_momentum or 0.99),
            loss=loss,
            metrics=["accuracy"],
            jit_compile=bool(t.jit_compile),
        )
        # Quiet: its "best epoch" counts only gains above min_delta, while the checkpoint keeps
        # the lowest val_loss; one log line below names the epoch that is kept.
        early_stopping = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=t.early_stopping_patience,
            min_delta=t.early_stopping_min_delta, restore_best_weights=True, verbose=0)
        # A schedule sets the rate itself: ReduceLROnPlateau only goes with a fixed one.
        plateau = [keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=t.reduce_lr_factor, patience=t.reduce_lr_patience,
            min_delta=t.early_stopping_min_delta, verbose=1)] if t.lr_schedule == "plateau" else []
        # With weight averaging, validation, early stopping and the checkpoint all see the
        # averaged weights; the backup (listed first) still saves the raw ones to resume from.
        averaging = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if t.ema_momentum else []
        callbacks = [
            keras.callbacks.BackupAndRestore(str(state / f"backup_{phase.name}")),
            *averaging,
            epoch_stats_callback(number, len(x_train)),
            keras.callbacks.TerminateOnNaN(),  # a NaN loss never recovers: stop the phase
            early_stopping,
            *plateau,
            checkpoint,
            keras.callbacks.CSVLogger(str(state / HISTORY_NAME), append=True),
        ]
        log.info("phase %s: up to %d epochs at learning rate %g; %s (%d trainable weights)",
                 phase.name, phase.epochs, phase.learning_rate, schedule_description(t),
                 len(model.trainable_weights))
        if phase.lr_scales:
            log.info("layer-wise learning rates: the lowest backbone stage at %g of the rate",
                     min(phase.lr_scales.values()))
        phase_start = epoch  # where the previous phase ended
        checkpoint.start_epoch = early_stopping.start_from_epoch = phase_start + t.min_epochs
        model.fit(train_ds, validation_data=val_ds, initial_epoch=epochs_logged(state),
                  epochs=phase_start + phase.epochs, callbacks=callbacks,
                  class_weight=class_weight, verbose=t.verbose,
                  shuffle=False)  # the tf.data pipeline reshuffles every epoch
        # Count what the CSV holds: right also when BackupAndRestore resumed mid-phase.
        epoch = epochs_logged(state)
        if early_stopping.stopped_epoch > 0:
            log.info("phase %s stopped early after epoch %d: validation loss gained less than "
                     "%g (train.early_stopping_min_delta) over %d epoch(s)", phase.name,
                     early_stopping.stopped_epoch + 1, t.early_stopping_min_delta,
                     t.early_stopping_patience)
        record = {"phase": phase.name, "learning_rate": phase.learning_rate,
                  "epochs_run": epoch - phase_start, "last_epoch": epoch,
                  # None while no epoch has counted (a phase no longer than min_epochs)
                  "best_val_loss_so_far": None if checkpoint.best is None
                  else float(checkpoint.best)}
        records.append(record)
        done.write_text(json.dumps(record))
    if best_weights.is_file():
        model.load_weights(best_weights)
    return records


def check_before_work(cfg: DictConfig, name: str) -> PreparedMeta:
    """Everything that can be checked before TensorFlow loads (seconds) and the data."""
    layout = Layout.from_config(cfg)
    mc = cfg.models[name]
    meta = PreparedMeta.load(layout.prepared)
    # An earlier model folder holds train_summary.json, or only inference.json when DVC has
    # removed this stage's outputs before running it.
    check_replaceable(layout.model_dir(name), "paths.models", (SUMMARY_NAME, INFERENCE_NAME))
    weights = backbone_weights(mc, name) if mc.kind == "transfer" else None
    if weights not in (None, "imagenet"):
        refuse_overlap({"paths.models": layout.model_dir(name),
                        "paths.backup": layout.backup / name},
                       {f"models.{name}.weights": weights})
    return meta


@dataclass
class Fitted:
    """What :func:`fit` hands :func:`save`."""

    built: BuiltModel
    history: pd.DataFrame
    summary: TrainSummary


def fit(cfg: DictConfig, name: str, meta: PreparedMeta, state: Path) -> Fitted:
    """Build and train the model through its phases; the state folder makes it resumable."""
    import keras

    mc, t = cfg.models[name], cfg.train
    prepared = Path(cfg.paths.prepared)
    scheme = meta.scheme
    keras.utils.set_random_seed(int(t.seed))
    if t.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()

    train, val = load_split(prepared, "train", stream=True), load_split(prepared, "val")
    data = {"train": (train["images"], train["labels"]), "val": (val["images"], val["labels"])}
    input_shape = tuple(int(s) for s in train["images"].shape[1:])
    balance_weights = class_balance_weights(t.class_weight, train["labels"])
    class_weight = balance_weights if t.class_weight == "balanced" else None

    policy = precision_policy(bool(t.mixed_precision))
    keras.mixed_precision.set_global_policy(policy)
    strategy = distribution_strategy(t.strategy)
    log.info("strategy %s with %d replica(s); precision %s; XLA %s",
             type(strategy).__name__, strategy.num_replicas_in_sync, policy, t.jit_compile)
    with strategy.scope():
        built = build_model(mc, input_shape, scheme.n_classes, t, name=name)
    log.info("training %s (%s, %d parameters) on %d images, validating on %d", name, mc.kind,
             built.model.count_params(), len(train["labels"]), len(val["labels"]))
    resumed = prepare_state_dir(state, config_fingerprint(cfg, name))
    if resumed:
        log.info("resuming %s from the state left in %s", name, state)
    started = time.perf_counter()
    with strategy.scope():
        records = fit_phases(built, data, cfg, state, class_weight)
    wall = time.perf_counter() - started
    keras.mixed_precision.set_global_policy("float32")  # leave the process as we found it

    history = pd.read_csv(state / HISTORY_NAME)
    history["epoch"] = history["epoch"] + 1  # 1-based, as Keras prints them
    history["phase"] = [built.phases[int(p) - 1].name for p in history["phase"]]
    best = best_epoch_row(history, records, int(t.min_epochs))
    check_learned(float(best["val_loss"]), scheme.n_classes, float(t.learning_rate), name)
    transfer = mc.kind == "transfer"
    summary = TrainSummary(
        model=name,
        kind=mc.kind,
        pretrained=built.pretrained,
        backbone=mc.backbone if transfer else None,
        weights=(str(mc.weights) if mc.weights is not None else None) if transfer else None,
        classes=list(scheme.classes),
        input_shape=list(input_shape),
        parameters=int(built.model.count_params()),
        strategy=type(strategy).__name__,
        replicas=int(strategy.num_replicas_in_sync),
        mixed_precision=bool(t.mixed_precision),
        jit_compile=bool(t.jit_compile),
        train_images=len(train["labels"]),
        val_images=len(val["labels"]),
        class_balance=str(t.class_weight),
        class_balance_weights=None if balance_weights is None else [
            balance_weights.get(k, 1.0) for k in range(scheme.n_classes)],
        phases=[PhaseRecord(**r) for r in records],
        epochs=len(history),
        best_epoch=int(best["epoch"]),
        best_val_loss=float(best["val_loss"]),
        train_loss_at_best=float(best["loss"]),
        wall_time_s=round(wall, 1),
        resumed=resumed,
        train_image_kinds=meta.train_image_kinds,
    )
    return Fitted(built, history, summary)


def save(fitted: Fitted, cfg: DictConfig, out: Path) -> None:
    """The model folder, whole or not at all: network, history, resolved config, summary.

    It replaces the old folder, ``inference.json`` included: that was fitted for the old
    network, and the evaluate stage fits it for this one.
    """
    with atomic_path(out, signature=(SUMMARY_NAME, INFERENCE_NAME), key="paths.models") as tmp:
        tmp.mkdir(parents=True)
        fitted.built.model.save(tmp / MODEL_NAME)
        fitted.history.to_csv(tmp / HISTORY_NAME, index=False)
        save_config(cfg, tmp)
        fitted.summary.save(tmp)


def run(cfg: DictConfig, name: str | None = None) -> TrainSummary:
    """Train ``models[name]`` (default: ``cfg.model``) on the prepared data."""
    from pipeline.sweep import redirect_outputs_in_multirun

    cfg = redirect_outputs_in_multirun(cfg)
    name = name or cfg.model
    # What this model trains with (its models.<name>.train over train), and what config.yaml keeps.
    cfg = OmegaConf.merge(cfg, {"train": model_train_config(cfg, name)})
    meta = check_before_work(cfg, name)
    layout = Layout.from_config(cfg)
    out, state = layout.model_dir(name), layout.backup / name
    with exclusive_state(state, name):  # released even if training fails
        fitted = fit(cfg, name, meta, state)
        save(fitted, cfg, out)
        shutil.rmtree(state, ignore_errors=True)
    summary = fitted.summary
    log.info("saved %s: the weights of epoch %d (lowest val_loss %.4f), trained in %.0f s",
             out / MODEL_NAME, summary.best_epoch, summary.best_val_loss, summary.wall_time_s)
    return summary


main = stage_main(run, objective="best_val_loss")

if __name__ == "__main__":
    main()
