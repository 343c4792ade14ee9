"""Matchers against scipy's `linear_sum_assignment` on the unpadded problem (scenic's test matrix).

Every back-end must return a structurally valid matching of min(Q, #valid targets) pairs whose total
cost equals scipy's float64 optimum on the valid columns (relative tolerance 1e-5: float32 costs);
the assignment itself may differ only where costs tie.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from jaxseg.matching import METHODS, match, sanitize_cost

RNG = np.random.default_rng(0)
TOL = 1e-5


@functools.cache
def jitted(method: str):
    return jax.jit(functools.partial(match, method=method))


def check_matching(result, cost, valid):
    """Asserts `result` is an optimal matching of each (cost[b], valid[b]) problem."""
    cost, valid = np.asarray(sanitize_cost(cost), np.float64), np.asarray(valid)
    query_of_target, matched, target_of_query = map(np.asarray, result)
    num_queries, num_targets = cost.shape[-2:]
    assert query_of_target.shape == matched.shape == valid.shape
    assert target_of_query.shape == cost.shape[:-1]
    for b in np.ndindex(cost.shape[:-2]):
        columns = np.flatnonzero(valid[b])
        assert not np.any(matched[b] & ~valid[b])
        assert matched[b].sum() == min(num_queries, len(columns))
        queries = query_of_target[b][matched[b]]
        assert len(set(queries)) == len(queries)
        assert np.all(query_of_target[b][~matched[b]] == 0)
        # target_of_query is the inverse of query_of_target, -1 elsewhere.
        expected_inverse = np.full(num_queries, -1)
        expected_inverse[queries] = np.flatnonzero(matched[b])
        np.testing.assert_array_equal(target_of_query[b], expected_inverse)
        total = cost[b][queries, np.flatnonzero(matched[b])].sum()
        optimum = cost[b][:, columns][linear_sum_assignment(cost[b][:, columns])].sum()
        assert abs(total - optimum) <= TOL * max(1.0, np.abs(cost[b]).max()), (b, total, optimum)


def random_valid(batch: int, num_targets: int, fraction: float) -> np.ndarray:
    valid = RNG.uniform(size=(batch, num_targets)) < fraction
    valid[0] = True  # one unpadded image
    valid[-1] = False  # one image without targets
    return valid


CASES = {  # name: (batch, Q, G, fraction of valid target columns)
    "square": (4, 8, 8, 1.0),
    "rectangular": (4, 20, 12, 1.0),
    "one_target": (3, 7, 1, 1.0),
    "padded": (5, 12, 12, 0.6),
    "padded_rectangular": (5, 16, 9, 0.5),
    "more_targets_than_queries": (5, 4, 10, 0.7),  # Q < G; some images have Q < #valid too
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_cost_equals_scipy_optimum(method, case):
    batch, num_queries, num_targets, fraction = CASES[case]
    cost = RNG.uniform(-1, 4, (batch, num_queries, num_targets)).astype(np.float32)
    valid = np.ones((batch, num_targets), bool) if fraction == 1 else random_valid(
        batch, num_targets, fraction)
    check_matching(jitted(method)(cost, valid), cost, valid)


def test_hungarian_at_eomt_scale():
    """200 queries (EoMT's COCO setting) against 100 target slots, half padded in one image."""
    cost = RNG.uniform(0, 12, (2, 200, 100)).astype(np.float32)
    valid = np.ones((2, 100), bool)
    valid[1, 50:] = False
    check_matching(jitted("hungarian")(cost, valid), cost, valid)


def test_padded_columns_do_not_change_the_assignment():
    """Padding with arbitrary (even very low or NaN) costs gives exactly the unpadded matching when the
    optimum is unique (continuous random costs)."""
    cost = RNG.uniform(0, 5, (3, 10, 6)).astype(np.float32)
    padded = np.concatenate([cost, np.full((3, 10, 4), -100, np.float32)], axis=2)
    padded[1, :, 7] = np.nan
    valid = np.arange(10) < 6
    for method in METHODS:
        plain = jitted(method)(cost)
        result = jitted(method)(padded, np.broadcast_to(valid, (3, 10)))
        np.testing.assert_array_equal(result.query_of_target[:, :6], plain.query_of_target)
        np.testing.assert_array_equal(result.target_of_query, plain.target_of_query)
        assert not np.any(result.matched[:, 6:])


@pytest.mark.parametrize("method", METHODS)
def test_identity_like_costs(method):
    eye = 1.0 - np.eye(6, dtype=np.float32)
    result = jitted(method)(eye[None])
    np.testing.assert_array_equal(result.query_of_target[0], np.arange(6))
    np.testing.assert_array_equal(result.target_of_query[0], np.arange(6))
    # Q > G: the first G queries sit on the diagonal, the rest stay unmatched.
    result = jitted(method)(eye[None, :, :4])
    np.testing.assert_array_equal(result.query_of_target[0], np.arange(4))
    np.testing.assert_array_equal(result.target_of_query[0], [0, 1, 2, 3, -1, -1])
    # A permuted identity is recovered exactly.
    perm = RNG.permutation(6)
    result = jitted(method)(eye[None, perm])
    np.testing.assert_array_equal(result.query_of_target[0], np.argsort(perm))


@pytest.mark.parametrize("method", METHODS)
def test_vmap_over_prediction_layers_and_leading_axes(method):
    layers, batch, num_queries, num_targets = 3, 2, 9, 5
    cost = RNG.uniform(0, 3, (layers, batch, num_queries, num_targets)).astype(np.float32)
    valid = random_valid(batch, num_targets, 0.6)
    vmapped = jax.jit(jax.vmap(functools.partial(match, method=method), in_axes=(0, None)))(cost, valid)
    leading = jitted(method)(cost, np.broadcast_to(valid, (layers, batch, num_targets)))
    check_matching(leading, cost, np.broadcast_to(valid, (layers, batch, num_targets)))
    for field, expected in zip(vmapped, leading):
        np.testing.assert_array_equal(field, expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_queries,num_targets", [(10, 6), (4, 8)])
def test_nan_and_inf_costs(method, num_queries, num_targets):
    """Clamped to +-1e10 and NaN -> 0 (transformers 4.56.1): the optimum of the clamped problem first
    avoids +inf entries (and takes -inf ones), then minimises the finite costs."""
    cost = RNG.uniform(0, 30, (6, num_queries, num_targets)).astype(np.float32)
    cost[RNG.uniform(size=cost.shape) < 0.3] = np.inf
    cost[RNG.uniform(size=cost.shape) < 0.05] = -np.inf
    cost[RNG.uniform(size=cost.shape) < 0.05] = np.nan
    cost[0, 3] = np.nan  # a diverged query
    cost[1, :, 2] = np.inf  # a target no query can reach
    valid = np.ones((6, num_targets), bool)
    valid[3, 4:] = False
    np.testing.assert_array_equal(sanitize_cost(np.array([np.inf, -np.inf, np.nan, 2.0])),
                                  np.float32([1e10, -1e10, 0.0, 2.0]))
    result = jitted(method)(cost, valid)
    clamped = np.asarray(sanitize_cost(cost), np.float64)
    for b in range(6):
        matched = np.asarray(result.matched[b])
        picked = clamped[b][np.asarray(result.query_of_target[b])[matched], np.flatnonzero(matched)]
        sub = clamped[b][:, valid[b]]
        best = sub[linear_sum_assignment(sub)]
        saturation = [np.sum(v >= 1e10) - np.sum(v <= -1e10) for v in (picked, best)]
        assert saturation[0] == saturation[1]
        finite = [v[np.abs(v) < 1e10].sum() for v in (picked, best)]
        assert abs(finite[0] - finite[1]) <= TOL * 30 * num_targets, (b, finite)


def test_gradients_pass_around_the_matcher():
    """The matching is constant under differentiation: a loss gathering matched costs has the one-hot
    gradient of the gather, for both back-ends (the host callback is never differentiated)."""
    cost = RNG.uniform(0, 1, (2, 6, 4)).astype(np.float32)
    for method in METHODS:
        def loss(c, method=method):
            m = match(c, method=method)
            return jnp.take_along_axis(c, m.query_of_target[:, None, :], axis=1).sum(), m

        grad, result = jax.jit(jax.grad(loss, has_aux=True))(cost)
        check_matching(result, cost, np.ones((2, 4), bool))
        expected = np.zeros_like(cost)
        for b in range(2):
            expected[b, np.asarray(result.query_of_target[b]), np.arange(4)] = 1.0
        np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("method", METHODS)
def test_empty_problems(method):
    no_targets = match(np.zeros((2, 3, 0), np.float32), method=method)
    assert no_targets.matched.shape == (2, 0)
    np.testing.assert_array_equal(no_targets.target_of_query, np.full((2, 3), -1))
    no_queries = match(np.zeros((2, 0, 3), np.float32), method=method)
    assert not np.any(no_queries.matched) and no_queries.target_of_query.shape == (2, 0)


def test_bad_arguments():
    cost = np.zeros((2, 5, 3), np.float32)
    with pytest.raises(ValueError, match="hungarian, scipy"):
        match(cost, method="sinkhorn")
    with pytest.raises(ValueError, match=r"\(\.\.\., Q, G\)"):
        match(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"valid_targets must have shape \(2, 3\)"):
        match(cost, np.ones((2, 5), bool))
    with pytest.raises(TypeError, match="bool"):
        match(cost, np.ones((2, 3), np.int32))


@pytest.mark.parametrize("num_queries,num_targets", [(12, 8), (6, 9)])
def test_hungarian_on_512_random_problems_with_ties_and_padding(num_queries, num_targets):
    """Small integer costs make ties common; about a third of the target slots are padding."""
    cost = RNG.integers(0, 4, (512, num_queries, num_targets)).astype(np.float32)
    valid = random_valid(512, num_targets, 0.65)
    check_matching(jitted("hungarian")(cost, valid), cost, valid)
