"""Means over a split of per-image quantities (a self-supervised method's validation loss): the predictor
returns, per image, "<name>_sum" and "<name>_count"; the result is each name's total sum over its total
count. A metric names its quantities in `names` and has no settings."""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from jaxseg.metrics.accumulators import _Summed


class MeanMetric(_Summed):
    names: ClassVar[tuple[str, ...]] = ()

    def __init__(self):
        self.totals = None

    def targets(self, target: dict, canvas: tuple[int, int]) -> dict[str, np.ndarray]:
        return {}

    def stats(self, prediction, targets):
        return {f"{name}_{part}": prediction[f"{name}_{part}"] for name in self.names for part in ("sum", "count")}

    def result(self) -> dict:
        if self.totals is None:
            return dict.fromkeys(self.names)
        return {name: float(self.totals[f"{name}_sum"] / self.totals[f"{name}_count"]) for name in self.names}
