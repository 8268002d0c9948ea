"""How sure a model is: temperature scaling, and prediction sets with a coverage guarantee.

Both are fitted on the validation split, after the prior correction, and stored with the model
(``inference.json``), so evaluate reports and predict writes the same thing.

* **Temperature scaling** (Guo et al. 2017): probabilities ``p`` become ``softmax(log p / T)``,
  one ``T`` chosen to minimise the validation log loss. It changes how confident the model is,
  never which class it picks.
* **Split-conformal prediction sets**, class-conditional (Mondrian) with the least-ambiguous
  score (Sadinle, Lei & Wasserman 2019; Vovk 2012): a galaxy's set holds every class whose
  probability clears that class's threshold, fitted on the validation galaxies of that class,
  so that the set contains the true class for at least ``level`` of new galaxies *of each
  class* (exchangeable with the validation split): what users of an imbalanced sample need,
  where one overall guarantee could be met by covering ellipticals alone. The most probable
  class is always in the set. Written by hand in a few lines: mapie and crepes would add a
  dependency for two functions.
"""

from __future__ import annotations

import math

import numpy as np

TEMPERATURE_RANGE = (0.05, 20.0)


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``: T > 1 softens over-confident probabilities, T < 1 sharpens."""
    if temperature == 1.0:
        return proba
    logits = np.log(np.clip(proba, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def fit_temperature(proba: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the log loss of ``proba`` on ``labels`` (bounded search)."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        p = apply_temperature(proba, math.exp(log_t))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0))))

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    return float(math.exp(minimize_scalar(nll, bounds=(low, high), method="bounded").x))


def temperature_bound(temperature: float) -> float | None:
    """The end of ``TEMPERATURE_RANGE`` that ``fit_temperature`` stopped at, or None inside it.
    At the lower end the validation split is separated perfectly and the calibrated
    probabilities sit at 0 and 1; at the upper end they are near uniform."""
    low, high = TEMPERATURE_RANGE
    return low if temperature <= low * 1.01 else high if temperature >= high / 1.01 else None


def fit_conformal(proba: np.ndarray, labels: np.ndarray, level: float) -> list[float]:
    """Per class c, the probability a class-c galaxy's own class must reach to be in its set:
    one minus the ``ceil((n_c + 1) level) / n_c`` quantile of ``1 - p_true`` over the ``n_c``
    validation galaxies of class c (0, always in the set, when too few of them to tell)."""
    thresholds = []
    for k in range(proba.shape[1]):
        scores = 1.0 - proba[labels == k, k]
        n = len(scores)
        rank = math.ceil((n + 1) * level)
        thresholds.append(0.0 if n == 0 or rank > n else
                          float(1.0 - np.sort(scores)[rank - 1]))
    return thresholds


def prediction_sets(proba: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """A boolean (N, classes) mask: the classes whose probability reaches their threshold, and
    always the most probable one."""
    mask = proba >= np.asarray(thresholds)[None, :] - 1e-12
    mask[np.arange(len(proba)), proba.argmax(axis=1)] = True
    return mask


def set_labels(mask: np.ndarray, classes: list[str]) -> list[str]:
    """Each set as text, classes in the label scheme's order joined by '|' (``spiral|edge_on``)."""
    names = np.array(classes)
    return ["|".join(names[row]) for row in mask]


def coverage_by_class(mask: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """How often the set holds the true class, and how large the sets are, overall and for the
    galaxies of each true class (what users of an imbalanced sample need)."""
    covered = mask[np.arange(len(labels)), labels]
    size = mask.sum(axis=1)
    result = {"all": {"coverage": float(covered.mean()), "mean_set_size": float(size.mean()),
                      "galaxies": len(labels)}}
    for k, c in enumerate(classes):
        mine = labels == k
        if mine.any():
            result[c] = {"coverage": float(covered[mine].mean()),
                         "mean_set_size": float(size[mine].mean()), "galaxies": int(mine.sum())}
    return result
