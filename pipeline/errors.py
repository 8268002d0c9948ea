"""Errors a user can fix. Every stage's command line prints their message as one line and
exits with status 2; anything else is a bug and keeps its traceback.

The config checks every module uses live here too (:func:`require`), so that data sources and
model kinds can check their own keys without importing the config module that lists them.
"""

from __future__ import annotations

import math
from typing import Any


class PipelineError(Exception):
    """Bad input or configuration; the message names the file, key or value and what is valid."""


class MissingInputError(PipelineError, FileNotFoundError):
    """An earlier stage's output is not there yet."""


class ConfigError(PipelineError, ValueError):
    """A config value that cannot work; the message names the key and what is valid."""


class TrainingDiverged(PipelineError):
    """A training whose loss went NaN or infinite: an error for one run, a losing trial in a
    sweep (which goes on to the next)."""


def require(ok: bool, key: str, value: Any, valid: str) -> None:
    """Raise :class:`ConfigError` naming ``key``, ``value`` and what would be ``valid``."""
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: {valid}")


def within(value: float, low: float, high: float) -> bool:
    """``low <= value <= high`` for a finite number (NaN and inf fail)."""
    return math.isfinite(value) and low <= value <= high
