"""Galaxy morphology pipeline: fetch -> prepare -> train -> evaluate -> report.

Each stage is a module with a plain ``run(cfg)`` and a thin Hydra entry point, run as
``python -m pipeline.<stage>``.
"""

import importlib
import os
import pkgutil

# TensorFlow prints several lines of C++ start-up chatter (oneDNN, CUDA probing) on every
# import; they bury the per-stage logs users read. Users can still set the variable themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"


def discover(package: str, attribute: str, kind: type) -> dict:
    """The ``attribute`` of every module in ``package`` that is a ``kind``, by its ``name``:
    how data sources and model kinds register themselves (a module each)."""
    found = {}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        value = getattr(importlib.import_module(f"{package}.{info.name}"), attribute, None)
        if isinstance(value, kind):
            found[value.name] = value
    return found
