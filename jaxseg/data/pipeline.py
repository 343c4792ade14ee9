"""The grain training pipeline (evaluation batches: `jaxseg.evaluate`).

Source -> seed/shuffle -> repeat -> random_map (augmentation drawing every random number
from the per-element generator grain derives from the seed and the element's global index; lazy, so
each host only computes its own elements) -> slice by host -> batch -> iterator (optionally
multiprocess prefetch). The batches depend on the seed only, not on the number of workers, and the
iterator state (a few integers) restores the exact position.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import grain
import jax
import numpy as np

from jaxseg.errors import UserError


def _hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise UserError(f"process_index {index} is not in 0..{count - 1}")
    return index, count


def train_dataset(source: Sequence[dict], transform: Callable[[dict, np.random.Generator], dict], *,
                  seed: int, batch_size: int, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  worker_count: int = 0) -> grain.IterDataset:
    """Per-host training batches of `batch_size` examples (the global batch is batch_size x hosts).

    `transform(example, rng)` augments one example; `num_epochs=None` repeats forever. Multiprocess
    workers (`worker_count > 0`) need absl flags parsed in the main process (`absl.app.run`).
    """
    if len(source) == 0:
        raise UserError("the training source is empty")
    index, count = _hosts(process_index, process_count)
    # random_map before the host slice: each element's generator follows from its global position, so
    # hosts draw different augmentations and a run's augmentation does not depend on the host count.
    dataset = grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs).random_map(transform)
    dataset = dataset[index::count].batch(batch_size, drop_remainder=True)
    iterable = dataset.to_iter_dataset()
    if worker_count:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iterable
