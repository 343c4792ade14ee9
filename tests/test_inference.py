"""Mask-classification post-processing against loop-by-loop numpy references of the official code
(Mask2Former / EoMT panoptic and instance inference, semantic scores)."""
import jax
import numpy as np
import pytest

from jaxseg.inference.mask_classification import instance_predictions, panoptic_segments, semantic_scores
from jaxseg.inference.semantic import window_starts

K, Q = 5, 12
IS_THING = np.array([True, True, False, False, True])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _outputs(seed, size=(24, 20)):
    rng = np.random.default_rng(seed)
    class_logits = rng.standard_normal((Q, K + 1)).astype(np.float32)
    confident = rng.random(Q) < 0.7  # most queries are sure of one class, so they pass the 0.8 threshold
    class_logits[confident, rng.integers(0, K + 1, confident.sum())] += 6.0
    # Smooth blobs, so masks overlap and compete as real ones do.
    yy, xx = np.mgrid[:size[0], :size[1]]
    centers = rng.random((Q, 2)) * size
    radius = rng.uniform(3, 10, Q)
    dist = np.hypot(yy[None] - centers[:, 0, None, None], xx[None] - centers[:, 1, None, None])
    mask_logits = (radius[:, None, None] - dist + rng.standard_normal((Q, *size))).astype(np.float32)
    return class_logits, mask_logits


def _reference_panoptic(class_logits, mask_logits, is_thing):
    probs = _softmax(class_logits.astype(np.float64))
    scores, labels = probs.max(-1), probs.argmax(-1)
    keep = (labels != K) & (scores > 0.8)
    panoptic = np.zeros(mask_logits.shape[1:], np.int64)
    categories = {}
    if not keep.any():
        return panoptic, categories
    cur_scores, cur_classes = scores[keep], labels[keep]
    cur_masks = _sigmoid(mask_logits[keep].astype(np.float64))
    mask_ids = (cur_scores[:, None, None] * cur_masks).argmax(0)
    stuff_memory, segment_id = {}, 0
    for k in range(len(cur_classes)):
        pred_class = cur_classes[k]
        mask_area = (mask_ids == k).sum()
        original_area = (cur_masks[k] >= 0.5).sum()
        mask = (mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and mask.sum() > 0:
            if mask_area / original_area < 0.8:
                continue
            if not is_thing[pred_class]:
                if pred_class in stuff_memory:
                    panoptic[mask] = stuff_memory[pred_class]
                    continue
                stuff_memory[pred_class] = segment_id + 1
            segment_id += 1
            panoptic[mask] = segment_id
            categories[segment_id] = pred_class
    return panoptic, categories


@pytest.mark.parametrize("seed", range(20))
def test_panoptic_matches_reference(seed):
    class_logits, mask_logits = _outputs(seed)
    ids, cats = jax.jit(panoptic_segments)(class_logits, mask_logits, IS_THING)
    ids, cats = np.asarray(ids), np.asarray(cats)
    ref_ids, ref_cats = _reference_panoptic(class_logits, mask_logits, IS_THING)
    # Same partition of the image into segments (ids may be numbered differently) and same classes.
    pairs = {(a, b) for a, b in zip(ids.ravel(), ref_ids.ravel())}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    assert all((a == 0) == (b == 0) for a, b in pairs)
    assert all(cats[a] == ref_cats[b] for a, b in pairs if a)
    assert cats[0] == -1 and set(np.unique(ids)) - {0} == {i for i in range(Q + 1) if cats[i] >= 0}


def test_panoptic_without_confident_queries_is_all_void():
    class_logits, mask_logits = _outputs(0)
    class_logits[:, K] += 100.0  # every query says "no object"
    ids, cats = panoptic_segments(class_logits, mask_logits, IS_THING)
    assert not np.asarray(ids).any() and (np.asarray(cats) == -1).all()
    with pytest.raises(ValueError, match="one entry per class"):
        panoptic_segments(class_logits, mask_logits, IS_THING[:3])


def test_instances_match_reference():
    class_logits, mask_logits = _outputs(3)
    masks, classes, scores = jax.jit(instance_predictions, static_argnums=2)(class_logits, mask_logits, 20)
    probs = _softmax(class_logits.astype(np.float64))[:, :K]
    order = np.argsort(-probs.ravel(), kind="stable")[:20]
    queries, ref_classes = order // K, order % K
    binary = mask_logits[queries] > 0
    mask_scores = (_sigmoid(mask_logits[queries].astype(np.float64)) * binary).sum((1, 2)) / (
        binary.sum((1, 2)) + 1e-6)
    np.testing.assert_array_equal(classes, ref_classes)
    np.testing.assert_array_equal(masks, binary)
    np.testing.assert_allclose(scores, probs.ravel()[order] * mask_scores, rtol=1e-5)
    assert instance_predictions(class_logits, mask_logits)[0].shape[0] == Q * K  # fewer pairs than 100


def test_semantic_scores_match_reference():
    class_logits, mask_logits = _outputs(4)
    expected = np.einsum("qk,qhw->khw", _softmax(class_logits.astype(np.float64))[:, :K],
                         _sigmoid(mask_logits.astype(np.float64)))
    np.testing.assert_allclose(semantic_scores(class_logits, mask_logits), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length,crop,expected", [
    (512, 512, [0]), (300, 512, [0]), (2048, 1024, [0, 1024]), (683, 512, [0, 171]),
    (1100, 512, [0, 294, 588])])
def test_window_starts_cover_the_side_evenly(length, crop, expected):
    starts = window_starts(length, crop)
    assert starts == expected
    assert starts[-1] + crop >= length


def test_panoptic_output_feeds_panoptic_quality():
    """Post-processing output plugs into the PQ accumulator: a prediction that reproduces the ground
    truth scores PQ = 1 (segment ids q + 1 index the categories table after its void entry 0)."""
    from jaxseg.metrics import panoptic_stats, pq_from_stats

    gt_ids = np.zeros((32, 32), np.int32)
    gt_ids[:, :16] = 1  # stuff (class 2) on the left half
    gt_ids[4:12, 20:28] = 2  # thing (class 0)
    gt_ids[18:30, 18:30] = 3  # thing (class 4)
    gt_categories = np.array([2, 0, 4], np.int32)
    class_logits = np.full((Q, K + 1), -10.0, np.float32)
    class_logits[:, K] = 10.0
    mask_logits = np.full((Q, 32, 32), -10.0, np.float32)
    for slot, query in enumerate((5, 1, 9)):  # any queries may carry the segments
        class_logits[query] = -10.0
        class_logits[query, gt_categories[slot]] = 10.0
        mask_logits[query][gt_ids == slot + 1] = 10.0
    ids, categories = panoptic_segments(class_logits, mask_logits, IS_THING)
    stats = panoptic_stats(ids, np.maximum(categories[1:], 0), gt_ids, gt_categories,
                           np.zeros(3, bool), K, pred_valid=categories[1:] >= 0)
    result = pq_from_stats(stats, IS_THING)
    assert result["all"]["PQ"] == 1.0 and result["all"]["n"] == 3
