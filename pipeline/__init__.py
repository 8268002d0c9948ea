"""Galaxy morphology pipeline: fetch -> prepare -> train -> evaluate -> report.

Each stage is a module with a plain ``run(cfg)`` and a thin Hydra entry point, run as
``python -m pipeline.<stage>``.
"""

import os

# TensorFlow prints several lines of C++ start-up chatter (oneDNN, CUDA probing) on every
# import; they bury the per-stage logs users read. Users can still set the variable themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
