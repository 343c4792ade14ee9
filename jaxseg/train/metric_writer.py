"""Scalars of a run: TensorBoard event files (tensorboardX) and a JSON-lines file, written by process 0
only so that a multi-host run logs once. A resumed run logs each step once: opened with `purge_step`, the
writer drops the rows of that step and later from the JSON-lines files and tells TensorBoard to do the
same with its events."""
from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import jax


class MetricWriter:
    """`<workdir>/tensorboard/` event files plus `<workdir>/<name>.jsonl` (one line per write)."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool | None = None, purge_step: int | None = None):
        self.workdir = pathlib.Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # imported here: hosts other than 0 never need it
            if purge_step is not None:
                for path in self.workdir.glob("*_metrics.jsonl"):
                    _drop_rows_from(path, purge_step)
            self._tensorboard = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge_step)

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


def _drop_rows_from(path: pathlib.Path, step: int) -> None:
    """Rewrites a JSON-lines metrics file without its rows of `step` and later, and without a row cut off
    by a kill (atomically: a kill now leaves the old file or the new one)."""
    def step_of(row: str) -> int | None:
        try:
            return json.loads(row).get("step")
        except json.JSONDecodeError:
            return None

    rows = path.read_text().splitlines()
    kept = [row for row in rows if (row_step := step_of(row)) is not None and row_step < step]
    if len(kept) < len(rows):
        partial = path.with_suffix(".jsonl.partial")
        partial.write_text("".join(row + "\n" for row in kept))
        partial.replace(path)
