"""Bipartite matching of predictions (queries) to padded targets, callable inside `jax.jit`.

One signature for every back-end (scenic's matcher convention, with a validity mask instead of a count
of real columns): `match(cost, valid_targets, method=...)` takes costs of shape (..., Q, G) whose G
target columns are padded to a static size, and returns a `Matching` of static shape.

Back-ends (`METHODS`):
  "hungarian": exact, in-graph: optax's `hungarian_algorithm` (a JAX port of scenic's
    Jonker-Volgenant-style solver) vmapped over the batch. Runs on any accelerator, no host round trip.
  "scipy": `scipy.optimize.linear_sum_assignment` on the host through `jax.pure_callback`, as
    transformers' `Mask2FormerHungarianMatcher` does; the reference the other back-end is tested against.

Costs are sanitised as transformers 4.56.1 (the version EoMT pins) does: clamped to [-1e10, 1e10]
and NaN replaced by 0, so a diverged prediction is matched only when nothing else can be. (Later
transformers, e.g. 5.x, map NaN and +-inf all to the float32 maximum instead.)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

from jaxseg.errors import UserError

METHODS = ("hungarian", "scipy")
COST_BOUND = 1e10


class Matching(NamedTuple):
    """Static-shape result of `match` for costs (..., Q, G).

    query_of_target: (..., G) int32, the query matched to each target column; 0 where not `matched`,
      so it is always a safe gather index.
    matched: (..., G) bool, target column is valid and has a query. False for padded columns, and for
      the valid targets left over when an image has more valid targets than there are queries.
    target_of_query: (..., Q) int32, the target column matched to each query, -1 for unmatched
      queries (the no-object class in the classification loss).

    The matched pairs of one image are (query_of_target[g], g) for every g with matched[g]; this is
    transformers' (index_i, index_j) per image, ordered by target instead of by query.
    """
    query_of_target: jax.Array
    matched: jax.Array
    target_of_query: jax.Array


def sanitize_cost(cost: jax.Array) -> jax.Array:
    """float32 cost with +-inf clamped to +-1e10 and NaN -> 0 (transformers 4.56.1)."""
    cost = jnp.clip(jnp.asarray(cost, jnp.float32), -COST_BOUND, COST_BOUND)
    return jnp.nan_to_num(cost, nan=0.0)


def _hungarian_one(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """(Q, G) cost, (G,) validity -> (Q,) target of each query or -1, via optax."""
    valid = jnp.broadcast_to(valid[None, :], cost.shape)
    # The solver works in float32, which cannot resolve finite costs next to clamped +-1e10 entries.
    # An optimum of the clamped problem minimises first (#(+1e10) - #(-1e10)) and then the finite sum
    # of at most K = min(Q, G) entries; replacing +-1e10 by +-(2 K max|finite| + 1) keeps exactly that
    # order at a scale float32 resolves.
    saturated = jnp.abs(cost) >= COST_BOUND
    finite_max = jnp.max(jnp.abs(cost), where=valid & ~saturated, initial=0.0)
    cost = jnp.where(saturated, jnp.sign(cost) * (2 * min(cost.shape) * finite_max + 1), cost)
    # Padded columns get one constant strictly above every valid cost. Constant: when all columns are
    # assigned (Q >= G) they add the same total to every assignment. Above every valid cost: when only
    # Q < G columns are assigned, swapping a padded column for an unassigned valid one lowers the
    # total, so the optimum covers min(Q, #valid) valid columns and equals the unpadded optimum.
    # The margin scales with the costs so that it survives float32 rounding.
    top = jnp.max(cost, where=valid, initial=0.0)
    cost = jnp.where(valid, cost, top + jnp.maximum(top, 1.0))
    # optax returns (rows, cols) of the min(Q, G) assigned pairs, in no particular order.
    rows, cols = optax.assignment.hungarian_algorithm(cost)
    cols = jnp.where(valid[0, cols], cols, -1).astype(jnp.int32)
    return jnp.full(cost.shape[0], -1, jnp.int32).at[rows].set(cols)


def _scipy_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Host side of the "scipy" back-end: solves each image's unpadded problem exactly."""
    num_queries, num_targets = cost.shape[-2:]
    costs = cost.reshape(math.prod(cost.shape[:-2]), num_queries, num_targets)
    valids = valid.reshape(costs.shape[0], num_targets)
    out = np.full((costs.shape[0], num_queries), -1, np.int32)
    for image, (c, v) in enumerate(zip(costs, valids)):
        columns = np.flatnonzero(v)
        rows, picked = linear_sum_assignment(c[:, columns])
        out[image, rows] = columns[picked]
    return out.reshape(cost.shape[:-1])


def _scipy(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """(B, Q, G), (B, G) -> (B, Q) target of each query or -1, via a host callback."""
    result = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
    # broadcast_all: under vmap (e.g. over prediction layers) the host gets every batch axis at once
    # and loops over them in one call.
    return jax.pure_callback(_scipy_host, result, cost, valid, vmap_method="broadcast_all")


def _invert(target_of_query: jax.Array, num_targets: int) -> tuple[jax.Array, jax.Array]:
    """(Q,) target of each query or -1 -> ((G,) query of each target or 0, (G,) matched)."""
    # Unmatched queries scatter to the out-of-range column num_targets, which mode="drop" discards.
    column = jnp.where(target_of_query >= 0, target_of_query, num_targets)
    queries = jnp.arange(target_of_query.shape[0], dtype=jnp.int32)
    query_of_target = jnp.zeros(num_targets, jnp.int32).at[column].set(queries, mode="drop")
    matched = jnp.zeros(num_targets, bool).at[column].set(True, mode="drop")
    return query_of_target, matched


def match(cost: jax.Array, valid_targets: jax.Array | None = None, *,
          method: str = "hungarian") -> Matching:
    """Minimum-cost matching of Q queries to the valid ones of G padded targets, per image.

    Args:
      cost: (..., Q, G) costs; any leading batch axes, e.g. (B, Q, G) or (L, B, Q, G) for L prediction
        layers (each matched independently; `jax.vmap` over a leading axis works as well). Used under
        stop_gradient in float32 after `sanitize_cost`.
      valid_targets: (..., G) bool, False for padded target columns; None means all valid. Padded
        columns never influence the assignment of valid ones.
      method: one of `METHODS`; static (pass it as a static argument when jitting `match` itself).

    Returns:
      A `Matching`. Each image gets min(Q, #valid targets) pairs minimising the summed cost of the
      unpadded problem; with more valid targets than queries (Q < #valid) the left-over targets have
      matched=False. Which optimum is returned when costs tie may differ between back-ends.

    "hungarian" solves in float32 (scipy in float64): totals agree to float32 rounding of the costs,
    also with clamped +-1e10 entries present, as long as finite costs stay far below 1e10 / min(Q, G).
    """
    if method not in METHODS:
        raise UserError(f"unknown matching method {method!r}; valid methods: {', '.join(METHODS)}")
    cost = jnp.asarray(cost)
    if cost.ndim < 2:
        raise UserError(f"cost must have shape (..., Q, G), got {cost.shape}")
    *batch, num_queries, num_targets = cost.shape
    if valid_targets is None:
        valid_targets = jnp.ones((*batch, num_targets), bool)
    valid_targets = jnp.asarray(valid_targets)
    if valid_targets.dtype != bool:
        raise TypeError(f"valid_targets must be bool, got {valid_targets.dtype}")
    if valid_targets.shape != (*batch, num_targets):
        raise UserError(f"valid_targets must have shape {(*batch, num_targets)} to match cost "
                        f"{cost.shape}, got {valid_targets.shape}")

    images = math.prod(batch)
    cost = jax.lax.stop_gradient(sanitize_cost(cost)).reshape(images, num_queries, num_targets)
    valid = valid_targets.reshape(images, num_targets)
    if method == "hungarian":
        target_of_query = jax.vmap(_hungarian_one)(cost, valid)
    else:
        target_of_query = _scipy(cost, valid)
    query_of_target, matched = jax.vmap(_invert, in_axes=(0, None))(target_of_query, num_targets)
    return Matching(query_of_target.reshape(*batch, num_targets),
                    matched.reshape(*batch, num_targets),
                    target_of_query.reshape(*batch, num_queries))
