"""How a trained model is applied to images: test-time views and Monte Carlo dropout.

One place for both :mod:`pipeline.evaluate` and :mod:`pipeline.predict`, so the probabilities
a model card reports are the ones ``predict`` writes for new galaxies.

Test-time augmentation (``tta``) averages the softmax over exact symmetries of the pixel
grid, as Dieleman et al. (2015) did for Galaxy Zoo: a galaxy's class does not depend on how
the camera was turned. ``rot4`` is the four 90-degree rotations; ``dihedral`` adds their
mirror images (8 views); ``dihedral16`` adds the same 8 of the image turned by 45 degrees
(interpolated, as training's random rotations are; 16 views at twice the cost). Mirroring turns
a clockwise spiral into an anticlockwise one, so use ``rot4`` (and ``augment.flip=false``) when
those are separate classes.

``zoom`` (``evaluate.tta_zoom``) magnifies every view about its centre first. Random crops and
zooms in training show the model galaxies larger, on average, than the unaugmented test images
(the train/test scale discrepancy of Touvron et al. 2019, "FixRes"); viewing test images at
the training scale undoes that without retraining.

Class weights make a model answer as if every class were equally common, which buys recall
on rare classes with precision (and accuracy) on common ones. The *prior correction*
multiplies the probabilities by ``w_c ** -alpha`` (Saerens et al. 2002 with alpha = 1 restores
the training-set prior) and renormalises; ``alpha`` is chosen on the validation split by
macro-F1 when the model is trained (or fixed by ``train.prior_correction=<alpha>``: on a small
validation split the fitted value is noisy), stored in its ``train_summary.json``, and applied
by evaluate and predict alike.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

TTA_MODES = {"none": 1, "rot4": 4, "dihedral": 8, "dihedral16": 16}


def tta_views(images: np.ndarray, mode: str, zoom: float = 1.0) -> Iterator[np.ndarray]:
    """The views of a batch of (N, H, W, C) images that ``mode`` averages over, each magnified
    by ``zoom`` about the centre (1.0: as they are)."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta = {mode!r}: use one of {list(TTA_MODES)}")
    if zoom != 1.0:
        from pipeline.augment import zoom as magnify

        images = magnify(images, zoom)
    if mode == "none":
        yield images
        return
    bases = [images]
    if mode == "dihedral16":
        from pipeline.augment import rotate

        bases.append(rotate(images, 45.0))
    for base in bases:
        for quarter_turns in range(4):
            turned = np.rot90(base, quarter_turns, axes=(1, 2))
            yield np.ascontiguousarray(turned)
            if mode != "rot4":
                yield np.ascontiguousarray(turned[:, :, ::-1])


PRIOR_CORRECTION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def apply_class_factors(proba: np.ndarray, class_factors) -> np.ndarray:
    """Rescale each class's probability by its factor and renormalise (None: unchanged)."""
    if class_factors is None:
        return proba
    scaled = proba * np.asarray(class_factors, dtype=proba.dtype)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def fit_prior_correction(proba: np.ndarray, labels: np.ndarray, class_weight: dict | None,
                         n_classes: int, grid: tuple[float, ...] = PRIOR_CORRECTION_GRID) -> dict:
    """Choose ``alpha`` in ``grid`` by macro-F1 on validation predictions.

    Ties go to the smaller correction. A one-value grid is a fixed ``alpha`` (its validation
    score is still reported). Without class weights there is nothing to undo.
    """
    from sklearn.metrics import f1_score

    if not class_weight:
        return {"alpha": 0.0, "class_factors": None, "validation_macro_f1": {}}
    weights = np.array([class_weight.get(c, 1.0) for c in range(n_classes)], dtype=np.float64)
    scores = {}
    for alpha in grid:
        predicted = apply_class_factors(proba, weights ** -alpha).argmax(axis=1)
        scores[alpha] = float(f1_score(labels, predicted, average="macro",
                                       labels=list(range(n_classes)), zero_division=0))
    best = max(grid, key=lambda a: (round(scores[a], 9), -a))
    return {"alpha": best, "class_factors": [float(f) for f in weights ** -best],
            "validation_macro_f1": {str(a): round(s, 4) for a, s in scores.items()}}


def forward(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``model``'s outputs for ``images``, a batch at a time through ``predict_on_batch``.

    ``model.predict`` builds a tf.data pipeline on every call, which costs more than the
    network itself when a survey is classified a chunk and a view at a time; the last batch is
    padded to full size, so the traced function is reused instead of traced anew.
    """
    n = len(images)
    if n == 0:
        return np.zeros((0, *model.output_shape[1:]), dtype=np.float32)
    outputs = []
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        if len(batch) < batch_size and n > batch_size:
            pad = np.zeros((batch_size - len(batch), *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, pad])
        outputs.append(np.asarray(model.predict_on_batch(batch))[:min(batch_size, n - start)])
    return np.concatenate(outputs)


def predict_proba(model, images: np.ndarray, tta: str = "none", batch_size: int = 256,
                  class_factors=None, zoom: float = 1.0) -> np.ndarray:
    """Class probabilities, averaged over the ``tta`` views of each image (magnified by
    ``zoom``), then prior-corrected by ``class_factors`` (the model's ``inference.json``;
    None = as trained)."""
    total = None
    for view in tta_views(images, tta, zoom):
        p = forward(model, view, batch_size)
        total = p if total is None else total + p
    return apply_class_factors(total / TTA_MODES[tta], class_factors)


def mc_dropout_probabilities(model, images: np.ndarray, samples: int, batch_size: int,
                             seed: int, tta: str = "none", class_factors=None,
                             zoom: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The probabilities :func:`predict_proba` gives (dropout off), shape (N, classes), and
    ``samples`` softmax outputs per image with the head's dropout left on (Gal & Ghahramani
    2016), each averaged over the ``tta`` views: shape (samples, N, classes).

    The draws measure the spread only: the point estimate stays the deterministic one, which
    the prior correction, temperature and conformal sets were fitted on and the card scored
    (the draws' mean is not better on validation; docs/benchmarks.md). The expensive part
    (everything up to the pooled features) runs once per view; only the head, where the
    dropout layers are, runs ``samples`` + 1 times. The masks come from a NumPy generator seeded
    by ``seed`` alone (inverted dropout, as Keras applies it), so the same images and seed give
    the same draws whatever ran before in the process.
    """
    import keras

    trunk = keras.Model(model.inputs, model.get_layer("gap").output)
    head = model.layers[model.layers.index(model.get_layer("gap")) + 1:]
    features = [forward(trunk, v, batch_size) for v in tta_views(images, tta, zoom)]
    rng = np.random.default_rng(seed)

    def view_mean(dropout: bool) -> np.ndarray:
        mean = 0.0
        for f in features:
            x = f
            for layer in head:
                if not isinstance(layer, keras.layers.Dropout):
                    x = keras.ops.convert_to_numpy(layer(x))
                elif dropout:
                    keep = rng.random(x.shape) >= layer.rate
                    x = np.where(keep, x / (1.0 - layer.rate), 0.0).astype(np.float32)
            mean = mean + x
        return apply_class_factors(mean / len(features), class_factors)

    deterministic = view_mean(dropout=False)
    return deterministic, np.stack([view_mean(dropout=True) for _ in range(samples)])
