"""Metrics against independent references: mIoU against per-class numpy masks, PQ against a
re-implementation that keeps the structure of panopticapi's `pq_compute_single_core` (dicts of
segments, a dict of (gt id, pred id) intersections, loops). Integer counts must agree exactly, ratios
to 1e-6."""
import collections

import jax
import numpy as np
import pytest

from jaxseg.metrics import confusion_matrix, miou_from_confusion, panoptic_stats, pq_from_stats

TOL = 1e-6
RNG = np.random.default_rng(0)

# ---------------------------------------------------------------------------------------------------
# Semantic segmentation

confusion_jit = jax.jit(confusion_matrix, static_argnames=("num_classes", "ignore_index"))


def reference_semantic(labels, predictions, num_classes, counted):
    """Per-class IoU / accuracy straight from pixel masks, without a confusion matrix."""
    iou, accuracy = [], []
    for c in range(num_classes):
        gt_c, pred_c = (labels == c) & counted, (predictions == c) & counted
        inter, union, gt_pixels = (gt_c & pred_c).sum(), (gt_c | pred_c).sum(), gt_c.sum()
        iou.append(inter / union if union else np.nan)
        accuracy.append(inter / gt_pixels if gt_pixels else np.nan)
    iou, accuracy = np.array(iou), np.array(accuracy)
    return {"per_class_iou": iou, "mean_iou": np.nanmean(iou), "per_class_accuracy": accuracy,
            "mean_class_accuracy": np.nanmean(accuracy),
            "pixel_accuracy": ((labels == predictions) & counted).sum() / counted.sum()}


def random_semantic_batch(batch=4, height=17, width=23, num_classes=6):
    """Labels use classes 0..3 and ignore (255); predictions 0..4: class 4 is only predicted, class 5
    appears nowhere. The last example is padding (weight 0) holding out-of-range garbage."""
    labels = RNG.integers(0, 4, (batch, height, width))
    labels[RNG.random(labels.shape) < 0.15] = 255
    predictions = np.where(RNG.random(labels.shape) < 0.6, labels, RNG.integers(0, 5, labels.shape))
    predictions[labels == 255] = RNG.integers(0, num_classes, (labels == 255).sum())
    weights = np.ones(batch, np.float32)
    weights[-1] = 0.0
    labels[-1], predictions[-1] = 999, -7
    return labels, predictions, weights


def assert_miou_equal(got, expected):
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=TOL, err_msg=key)


@pytest.mark.parametrize("jit", [False, True])
def test_confusion_matrix_and_miou_match_numpy(jit):
    labels, predictions, weights = random_semantic_batch()
    fn = confusion_jit if jit else confusion_matrix
    cm = np.asarray(fn(labels, predictions, num_classes=6, weights=weights))
    counted = (labels != 255) & (weights[:, None, None] != 0)
    expected_cm = np.zeros((6, 6), np.int64)
    np.add.at(expected_cm, (labels[counted], predictions[counted]), 1)
    np.testing.assert_array_equal(cm, expected_cm)

    expected = reference_semantic(labels, predictions, 6, counted)
    got = miou_from_confusion(cm)
    assert_miou_equal(got, expected)
    assert np.isnan(got["per_class_iou"][5]) and got["per_class_iou"][4] == 0.0
    assert np.isnan(got["per_class_accuracy"][4])


def test_per_pixel_weights_and_other_ignore_index():
    labels, predictions, _ = random_semantic_batch(batch=3)
    labels[labels == 255] = -1
    labels[-1], predictions[-1] = 0, 0  # a real example this time
    pixel_mask = RNG.random(labels.shape) < 0.7
    cm = np.asarray(confusion_jit(labels, predictions, num_classes=6, ignore_index=-1,
                                  weights=pixel_mask))
    counted = (labels != -1) & pixel_mask
    assert_miou_equal(miou_from_confusion(cm), reference_semantic(labels, predictions, 6, counted))


def test_summed_confusion_matrices_equal_the_concatenation():
    batches = [random_semantic_batch(batch=3) for _ in range(3)]
    total = sum(np.asarray(confusion_jit(y, p, num_classes=6, weights=w), np.int64)
                for y, p, w in batches)
    labels, predictions, weights = (np.concatenate(parts) for parts in zip(*batches))
    np.testing.assert_array_equal(total, confusion_jit(labels, predictions, num_classes=6,
                                                       weights=weights))
    per_example = sum(np.asarray(confusion_matrix(y[None], p[None], 6)) for y, p, w in zip(
        labels, predictions, weights) if w)
    np.testing.assert_array_equal(total, per_example)


def test_confusion_matrix_bad_inputs():
    labels = np.zeros((2, 4, 4), np.int32)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(labels, labels[:, :3], 3)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(labels.astype(np.float32), labels, 3)
    with pytest.raises(ValueError, match="leading axes"):
        confusion_matrix(labels, labels, 3, weights=np.ones(4))
    bad_label = labels.copy()
    bad_label[0, 1, 1] = 3
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) or be ignore_index=255, found \[3\]"):
        confusion_matrix(bad_label, labels, 3)
    bad_prediction = labels.copy()
    bad_prediction[1, 2, 3] = -2
    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 3\), found \[-2\]"):
        confusion_matrix(labels, bad_prediction, 3)
    # Under jit the value cannot be checked: the pixel is left out.
    assert int(confusion_jit(labels, bad_prediction, num_classes=3).sum()) == labels.size - 1
    with pytest.raises(ValueError, match="square"):
        miou_from_confusion(np.zeros((3, 4)))
    empty = miou_from_confusion(np.zeros((3, 3), np.int64))
    assert np.isnan(empty["mean_iou"]) and np.isnan(empty["pixel_accuracy"])


# ---------------------------------------------------------------------------------------------------
# Panoptic quality: the reference

VOID = 0
OFFSET = 1 << 16


def to_panopticapi(ids, categories, used, iscrowd=None):
    """(id map, slot table) -> (PNG id map, segments_info) as panopticapi reads them: the documented
    convention makes pixels of unused slots void; segments_info lists the segments of the map in id
    order, with their areas (COCO's ground-truth JSON carries the areas of its PNGs)."""
    used_with_void = np.concatenate([[False], used])
    png = np.where(used_with_void[ids], ids, VOID).astype(np.int64)
    segments_info = []
    for segment_id, area in zip(*np.unique(png, return_counts=True)):
        if segment_id == VOID:
            continue
        info = {"id": int(segment_id), "category_id": int(categories[segment_id - 1]), "area": int(area)}
        if iscrowd is not None:
            info["iscrowd"] = int(iscrowd[segment_id - 1])
        segments_info.append(info)
    return png, segments_info


def reference_pq_image(pan_gt, gt_segments_info, pan_pred, pred_segments_info, events=None):
    """panopticapi's per-image loop; returns {category: [iou, tp, fp, fn]}. `events` counts the
    borderline cases the random data reached."""
    events = collections.Counter() if events is None else events
    stat = collections.defaultdict(lambda: [0.0, 0, 0, 0])
    gt_segms = {el["id"]: dict(el) for el in gt_segments_info}
    pred_segms = {el["id"]: {k: v for k, v in el.items() if k != "area"} for el in pred_segments_info}

    # Predicted areas are counted from the map, as panopticapi does.
    for label, count in zip(*np.unique(pan_pred, return_counts=True)):
        if label == VOID:
            continue
        pred_segms[label]["area"] = count
    assert all("area" in segment for segment in pred_segms.values())

    gt_pred_map = {}
    for label, intersection in zip(*np.unique(pan_gt * OFFSET + pan_pred, return_counts=True)):
        gt_pred_map[(label // OFFSET, label % OFFSET)] = intersection

    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in gt_pred_map.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        gt_info, pred_info = gt_segms[gt_label], pred_segms[pred_label]
        if gt_info["iscrowd"] == 1 or gt_info["category_id"] != pred_info["category_id"]:
            continue
        union = (pred_info["area"] + gt_info["area"] - intersection
                 - gt_pred_map.get((VOID, pred_label), 0))
        iou = intersection / union
        events["iou_tie"] += iou == 0.5
        events["void_in_union"] += iou > 0.5 and (VOID, pred_label) in gt_pred_map
        if iou > 0.5:
            stat[gt_info["category_id"]][0] += iou
            stat[gt_info["category_id"]][1] += 1
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    crowd_labels_dict = {}
    for gt_label, gt_info in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt_info["iscrowd"] == 1:
            events["shadowed_crowd"] += gt_info["category_id"] in crowd_labels_dict
            crowd_labels_dict[gt_info["category_id"]] = gt_label
            continue
        stat[gt_info["category_id"]][3] += 1

    for pred_label, pred_info in pred_segms.items():
        if pred_label in pred_matched:
            continue
        intersection = gt_pred_map.get((VOID, pred_label), 0)
        if pred_info["category_id"] in crowd_labels_dict:
            crowd_label = crowd_labels_dict[pred_info["category_id"]]
            events["on_crowd"] += (crowd_label, pred_label) in gt_pred_map
            intersection += gt_pred_map.get((crowd_label, pred_label), 0)
        events["excuse_tie"] += intersection / pred_info["area"] == 0.5
        if intersection / pred_info["area"] > 0.5:
            events["excused"] += 1
            continue
        stat[pred_info["category_id"]][2] += 1
    return stat


def reference_pq_average(stat, is_thing, isthing):
    """panopticapi's `PQStat.pq_average` over categories 0..K-1."""
    pq, sq, rq, n = 0.0, 0.0, 0.0, 0
    for label in range(len(is_thing)):
        if isthing is not None and bool(is_thing[label]) != isthing:
            continue
        iou, tp, fp, fn = stat[label]
        if tp + fp + fn == 0:
            continue
        n += 1
        pq += iou / (tp + 0.5 * fp + 0.5 * fn)
        sq += iou / tp if tp != 0 else 0
        rq += tp / (tp + 0.5 * fp + 0.5 * fn)
    return {"PQ": pq / n, "SQ": sq / n, "RQ": rq / n, "n": n}


def reference_stats(image, num_categories, events=None):
    pan_gt, gt_info = to_panopticapi(image["gt_ids"], image["gt_categories"], image["gt_valid"],
                                     image["gt_iscrowd"])
    pan_pred, pred_info = to_panopticapi(image["pred_ids"], image["pred_categories"], image["pred_valid"])
    stat = reference_pq_image(pan_gt, gt_info, pan_pred, pred_info, events)
    return {key: np.array([stat[c][i] for c in range(num_categories)])
            for i, key in enumerate(("iou_sum", "tp", "fp", "fn"))}


# ---------------------------------------------------------------------------------------------------
# Panoptic quality: random images

NUM_CATEGORIES = 4
IS_THING = np.array([True, True, False, False])
STAT_KEYS = ("iou_sum", "tp", "fp", "fn")
ARG_ORDER = ("pred_ids", "pred_categories", "gt_ids", "gt_categories", "gt_iscrowd")


def random_panoptic_image(height, width, num_gt=8, num_pred=10):
    """Rectangles of ground truth over void (some crowd, some slots empty), and predictions made of the
    same segments under other ids, shifted, partly recategorised, overpainted and noisy."""
    gt_ids = np.zeros((height, width), np.int32)
    for t in range(1, num_gt + 1):
        y, x = RNG.integers(0, height - 1), RNG.integers(0, width - 1)
        h, w = RNG.integers(1, height // 2 + 1), RNG.integers(1, width // 2 + 1)
        gt_ids[y:y + h, x:x + w] = t
    gt_ids[RNG.random(gt_ids.shape) < 0.05] = 0
    gt_categories = RNG.integers(0, NUM_CATEGORIES, num_gt).astype(np.int32)
    gt_iscrowd = RNG.random(num_gt) < 0.25

    slot_of_gt = RNG.permutation(num_pred)[:num_gt] + 1
    pred_ids = np.where(gt_ids > 0, slot_of_gt[gt_ids - 1], 0)
    pred_ids = np.roll(pred_ids, RNG.integers(-1, 2, 2), axis=(0, 1))
    for _ in range(RNG.integers(0, 4)):
        y, x = RNG.integers(0, height - 1), RNG.integers(0, width - 1)
        pred_ids[y:y + RNG.integers(1, 6), x:x + RNG.integers(1, 6)] = RNG.integers(0, num_pred + 1)
    noise = RNG.random(pred_ids.shape) < 0.08
    pred_ids[noise] = RNG.integers(0, num_pred + 1, noise.sum())
    pred_categories = RNG.integers(0, NUM_CATEGORIES, num_pred).astype(np.int32)
    keep = RNG.random(num_gt) < 0.8
    pred_categories[slot_of_gt[keep] - 1] = gt_categories[keep]
    return {"pred_ids": pred_ids.astype(np.int32), "pred_categories": pred_categories,
            "gt_ids": gt_ids, "gt_categories": gt_categories, "gt_iscrowd": gt_iscrowd,
            "pred_valid": RNG.random(num_pred) < 0.9, "gt_valid": RNG.random(num_gt) < 0.95}


def stack(images):
    return {key: np.stack([image[key] for image in images]) for key in images[0]}


@jax.jit
def batched_stats(batch):
    return jax.vmap(lambda image: panoptic_stats(*(image[k] for k in ARG_ORDER), NUM_CATEGORIES,
                                                 pred_valid=image["pred_valid"],
                                                 gt_valid=image["gt_valid"]))(batch)


def call(image, fn=panoptic_stats, **overrides):
    image = {**image, **overrides}
    return fn(*(image[k] for k in ARG_ORDER), NUM_CATEGORIES, pred_valid=image["pred_valid"],
              gt_valid=image["gt_valid"])


def assert_stats_equal(got, expected):
    for key in STAT_KEYS:
        if key == "iou_sum":
            np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=TOL, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_panoptic_stats_match_panopticapi_on_random_images():
    events = collections.Counter()
    totals = {key: np.zeros(NUM_CATEGORIES, np.float64) for key in STAT_KEYS}
    reference_totals = collections.defaultdict(lambda: [0.0, 0, 0, 0])
    for height, width in ((16, 16), (24, 32), (32, 19)):
        images = [random_panoptic_image(height, width) for _ in range(80)]
        got = jax.device_get(batched_stats(stack(images)))
        for i, image in enumerate(images):
            expected = reference_stats(image, NUM_CATEGORIES, events)
            assert_stats_equal({key: got[key][i] for key in STAT_KEYS}, expected)
            for c in range(NUM_CATEGORIES):
                for j, key in enumerate(STAT_KEYS):
                    reference_totals[c][j] += expected[key][c]
        for key in STAT_KEYS:
            totals[key] += got[key].sum(0, dtype=np.float64)

    # The random images reach every borderline case of panopticapi's rules.
    for event in ("iou_tie", "void_in_union", "shadowed_crowd", "on_crowd", "excuse_tie", "excused"):
        assert events[event] > 0, (event, events)

    results = pq_from_stats(totals, IS_THING)
    for group, isthing in (("all", None), ("things", True), ("stuff", False)):
        expected = reference_pq_average(reference_totals, IS_THING, isthing)
        assert results[group]["n"] == expected["n"]
        for key in ("PQ", "SQ", "RQ"):
            np.testing.assert_allclose(results[group][key], expected[key], rtol=0, atol=TOL)


def test_eager_jit_and_summation_agree():
    images = [random_panoptic_image(20, 20) for _ in range(6)]
    batched = jax.device_get(batched_stats(stack(images)))
    single = [call(image) for image in images]
    jitted = jax.jit(panoptic_stats, static_argnames="num_categories")
    for i, image in enumerate(images):
        assert_stats_equal(single[i], {key: batched[key][i] for key in STAT_KEYS})
        assert_stats_equal(call(image, jitted), single[i])
    summed = {key: sum(np.asarray(s[key], np.float64) for s in single) for key in STAT_KEYS}
    assert_stats_equal(summed, {key: batched[key].sum(0, dtype=np.float64) for key in STAT_KEYS})


def test_unused_slots_and_padded_examples_are_void():
    image = random_panoptic_image(24, 24)
    pred_void = ~np.concatenate([[True], image["pred_valid"]])[image["pred_ids"]]
    gt_void = ~np.concatenate([[True], image["gt_valid"]])[image["gt_ids"]]
    as_void = call(image, pred_ids=np.where(pred_void, 0, image["pred_ids"]),
                   gt_ids=np.where(gt_void, 0, image["gt_ids"]),
                   pred_valid=np.ones_like(image["pred_valid"]), gt_valid=np.ones_like(image["gt_valid"]))
    assert_stats_equal(call(image), as_void)
    # A padded example: every slot unused, whatever its maps and (even out-of-range) categories hold.
    padded = call(image, pred_valid=np.zeros_like(image["pred_valid"]),
                  gt_valid=np.zeros_like(image["gt_valid"]),
                  pred_categories=np.full_like(image["pred_categories"], -1))
    assert all(not np.any(padded[key]) for key in STAT_KEYS)


def hand_made(gt_ids, gt_categories, gt_iscrowd, pred_ids, pred_categories):
    image = {"gt_ids": np.array(gt_ids, np.int32), "gt_categories": np.array(gt_categories, np.int32),
             "gt_iscrowd": np.array(gt_iscrowd, bool), "pred_ids": np.array(pred_ids, np.int32),
             "pred_categories": np.array(pred_categories, np.int32)}
    image["gt_valid"] = np.ones(len(gt_categories), bool)
    image["pred_valid"] = np.ones(len(pred_categories), bool)
    got = call(image)
    assert_stats_equal(got, reference_stats(image, NUM_CATEGORIES))
    return {key: np.asarray(got[key])[0] for key in STAT_KEYS}  # category 0 holds every case below


def test_iou_of_exactly_one_half_does_not_match():
    # gt 1 (3 px) vs pred 1 (3 px): 2 px shared, the third pred pixel on gt 2: IoU = 2 / 4.
    tie = hand_made([[1, 1, 1, 2]], [0, 1], [0, 0], [[1, 1, 0, 1]], [0])
    assert (tie["tp"], tie["fp"], tie["fn"]) == (0, 1, 1)
    # The same pixel on void leaves the union: IoU = 2 / 3, a match.
    on_void = hand_made([[1, 1, 1, 0]], [0], [0], [[1, 1, 0, 1]], [0])
    assert (on_void["tp"], on_void["fp"], on_void["fn"]) == (1, 0, 0)
    np.testing.assert_allclose(on_void["iou_sum"], 2 / 3, atol=TOL)


def test_false_positives_excused_by_void_and_the_last_crowd_segment():
    # Unmatched pred 1 (4 px) with exactly half on void: still a false positive; with 3/4, excused.
    assert hand_made([[0, 0, 1, 1]], [1], [0], [[1, 1, 1, 1]], [0])["fp"] == 1
    assert hand_made([[0, 0, 0, 1]], [1], [0], [[1, 1, 1, 1]], [0])["fp"] == 0
    # Two crowd segments of category 0: only the last (id 2) excuses a prediction lying on it.
    assert hand_made([[1, 1, 2, 2]], [0, 0], [1, 1], [[0, 0, 1, 1]], [0])["fp"] == 0
    assert hand_made([[1, 1, 2, 2]], [0, 0], [1, 1], [[1, 1, 0, 0]], [0])["fp"] == 1
    # Crowd segments neither match nor count as false negatives.
    crowd = hand_made([[1, 1, 1, 1]], [0], [1], [[1, 1, 1, 1]], [0])
    assert (crowd["tp"], crowd["fp"], crowd["fn"]) == (0, 0, 0)


def test_pq_from_stats_absent_categories_and_groups():
    stats = {"iou_sum": [1.6, 0.0, 0.0, 0.9], "tp": [2, 0, 0, 1], "fp": [1, 1, 0, 0],
             "fn": [1, 0, 0, 0]}
    results = pq_from_stats(stats, IS_THING)
    np.testing.assert_allclose(results["per_class"]["PQ"], [1.6 / 3, 0.0, np.nan, 0.9], atol=TOL)
    np.testing.assert_allclose(results["per_class"]["SQ"], [0.8, 0.0, np.nan, 0.9], atol=TOL)
    np.testing.assert_allclose(results["per_class"]["RQ"], [2 / 3, 0.0, np.nan, 1.0], atol=TOL)
    assert (results["all"]["n"], results["things"]["n"], results["stuff"]["n"]) == (3, 2, 1)
    np.testing.assert_allclose(results["things"]["PQ"], (1.6 / 3 + 0.0) / 2, atol=TOL)
    np.testing.assert_allclose(results["stuff"]["SQ"], 0.9, atol=TOL)
    no_stuff = pq_from_stats(stats, [True] * 4)
    assert no_stuff["stuff"]["n"] == 0 and np.isnan(no_stuff["stuff"]["PQ"])
    with pytest.raises(ValueError, match="is_thing"):
        pq_from_stats(stats, [True, False])


def test_panoptic_stats_bad_inputs():
    image = random_panoptic_image(8, 8, num_gt=3, num_pred=3)
    with pytest.raises(ValueError, match=r"\(H, W\) integer segment-id map"):
        call(image, pred_ids=image["pred_ids"][None])
    with pytest.raises(ValueError, match="differ in shape"):
        call(image, gt_ids=image["gt_ids"][:, :5])
    with pytest.raises(ValueError, match=r"gt_iscrowd must be a \(3,\) table"):
        call(image, gt_iscrowd=np.zeros(4, bool))
    with pytest.raises(TypeError, match="integer category ids"):
        call(image, pred_categories=image["pred_categories"].astype(np.float32))
    bad_ids = image["pred_ids"].copy()
    bad_ids[0, 0] = 4
    with pytest.raises(ValueError, match=r"pred_ids must lie in \[0, 4\), found \[4\]"):
        call(image, pred_ids=bad_ids)
    with pytest.raises(ValueError, match=r"categories of used gt slots must lie in \[0, 4\)"):
        call(image, gt_categories=np.array([0, 7, 1], np.int32), gt_valid=np.ones(3, bool))
    # Under jit the out-of-range id is void, as documented.
    jitted = jax.jit(panoptic_stats, static_argnames="num_categories")
    voided = bad_ids.copy()
    voided[0, 0] = 0
    assert_stats_equal(call(image, jitted, pred_ids=bad_ids), call(image, pred_ids=voided))


def test_panoptic_stats_of_an_image_without_ground_truth_segments():
    # Every predicted segment on void: excused, so nothing counts (panopticapi: same).
    pred_ids = np.array([[1, 1], [0, 2]], np.int32)
    stats = panoptic_stats(pred_ids, np.array([0, 1]), np.zeros((2, 2), np.int32), np.zeros(0, np.int32),
                           np.zeros(0, bool), 3)
    for key in ("iou_sum", "tp", "fp", "fn"):
        np.testing.assert_array_equal(stats[key], 0)
