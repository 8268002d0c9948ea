"""The label scheme: the one object that loading, the loss, metrics and the report all read."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelScheme:
    """Ordered class names; a class's index is its position (the softmax output index)."""

    classes: tuple[str, ...]

    @classmethod
    def from_names(cls, names: Iterable[str]) -> LabelScheme:
        return cls(tuple(str(n) for n in names))

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def encode(self, labels: Sequence[str]) -> np.ndarray:
        """Class names to indices; an unknown name is an error that lists the known ones."""
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({str(x) for x in labels} - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not in the label scheme {list(self.classes)}")
        return np.array([index[str(x)] for x in labels], dtype=np.int32)

    def decode(self, indices: Iterable[int]) -> list[str]:
        return [self.classes[int(i)] for i in indices]
