"""Scalars of a run: TensorBoard event files (tensorboardX) and a JSON-lines file, written by process 0
only so that a multi-host run logs once."""
from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import jax


class MetricWriter:
    """`<workdir>/tensorboard/` event files plus `<workdir>/<name>.jsonl` (one line per write)."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None):
        self.workdir = pathlib.Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # imported here: hosts other than 0 never need it
            self._tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)
        self._tensorboard.flush()
        with open(self.workdir / f"{prefix}_metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(scalars, step=step)) + "\n")

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
