"""EoMT's mask annealing: per-block probabilities that a query's attention is masked, as pure functions of
the (possibly traced) step."""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxseg.errors import UserError


def mask_annealing_windows(total_steps: int, num_blocks: int) -> tuple[list[int], list[int]]:
    """(starts, ends) of EoMT's per-block mask-annealing windows, as in the official configs.

    Each block anneals over T/6 steps; the starts are evenly spaced from T/6 to 4T/6 in block order, so
    masking is gone by 5T/6 and the last sixth of training is mask-free. Values are the exact fractions
    rounded half up, which reproduces every table of the official configs (e.g. T = 88692, L2 = 4:
    starts [14782, 29564, 44346, 59128], ends [29564, 44346, 59128, 73910]).
    """
    if total_steps < 6 or num_blocks < 1:
        raise UserError(f"the mask-annealing windows need total_steps >= 6 (train.total_steps) and num_blocks >= 1 "
                        f"(model.num_query_blocks), got {total_steps} and {num_blocks}; or give "
                        f"method.annealing.starts and ends")
    sixth = total_steps / 6
    spacing = 3 * sixth / (num_blocks - 1) if num_blocks > 1 else 0.0
    starts = [sixth + k * spacing for k in range(num_blocks)]
    round_half_up = lambda x: int(math.floor(x + 0.5))  # noqa: E731
    return [round_half_up(s) for s in starts], [round_half_up(s + sixth) for s in starts]


def mask_annealing_probs(step, starts: Sequence[int], ends: Sequence[int], power: float = 0.9):
    """Per-block probability that a query is masked at `step` (the number of completed optimizer steps):
    1 before the block's start, 0 from its end, (1 - progress)^power in between."""
    starts = np.asarray(starts, np.float32)
    ends = np.asarray(ends, np.float32)
    if starts.shape != ends.shape or np.any(ends <= starts):
        raise UserError(f"annealing windows need matching starts < ends, got {starts.tolist()} / "
                        f"{ends.tolist()}")
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - starts) / (ends - starts), 0.0, 1.0)
    return (1.0 - progress) ** power
