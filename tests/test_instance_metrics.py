"""Instance mask AP against pycocotools' `COCOeval(iouType="segm")` on random datasets: ellipse
ground truth (tiny to large, some crowd, some exact duplicates), predictions perturbed from it, pixel
subsets whose IoU lands exactly on a threshold, false positives, empty masks, tied scores, an image with
more than 100 detections of one category, and padded slots. COCOeval's precision and recall arrays
must agree exactly, the summary numbers to 1e-6."""
import contextlib
import io

import jax
import numpy as np
import pytest
import scipy.ndimage
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jaxseg.metrics.instance import COCO_AREA_RANGES, SUMMARY, InstanceAccumulator, instance_stats

TOL = 1e-6
# Ground truth uses categories 0..3, predictions 0..4; category 5 appears nowhere.
NUM_CATEGORIES = 6
# COCO's ranges make every object of these small images "small"; these split them three ways.
SMALL_IMAGE_AREA_RANGES = ((0, 1e10), (0, 40), (40, 250), (250, 1e10))
IMAGE_SIZES = ((24, 32), (36, 48), (48, 48))


def ellipse(rng, height, width):
    """A random ellipse from a few pixels (or none) to a few hundred, possibly cut by the border."""
    radius = rng.choice([rng.uniform(0.6, 2), rng.uniform(2, 5), rng.uniform(5, 10), rng.uniform(10, 16)])
    yy, xx = np.mgrid[:height, :width]
    (cy, cx), (ry, rx) = rng.uniform(0, (height, width)), radius * rng.uniform(0.6, 1.4, 2)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def perturb(rng, mask):
    """Half the time shifted by up to a pixel, then pixels flipped around the mask."""
    shifted = np.roll(mask, rng.integers(-1, 2, 2) * (rng.random() < 0.5), axis=(0, 1))
    near = scipy.ndimage.binary_dilation(shifted)
    return shifted ^ (near & (rng.random(mask.shape) < 0.1))


def random_image(rng, num_pred_slots=24, num_gt_slots=10, crowded=False):
    height, width = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    gt = []                                                    # (mask, class, iscrowd)
    for _ in range(rng.integers(0, 6)):
        gt.append((ellipse(rng, height, width), rng.integers(0, 4), rng.random() < 0.15))
    if gt and rng.random() < 0.3:
        gt.append(gt[rng.integers(len(gt))])
    if rng.random() < 0.4:
        # A 4 x 5 rectangle: a prediction of j of its pixels has IoU j / 20, on a threshold.
        rect = np.zeros((height, width), bool)
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 5)
        rect[y:y + 4, x:x + 5] = True
        gt.append((rect, rng.integers(0, 4), rng.random() < 0.15))

    pred = []                                                  # (mask, class)
    for mask, category, _ in gt:
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            pred.append((perturb(rng, mask), category if rng.random() < 0.85 else rng.integers(0, 5)))
        if mask.sum() == 20:
            subset = np.flatnonzero(mask.ravel())[rng.permutation(20)[:rng.integers(10, 20)]]
            pred.append((np.isin(np.arange(mask.size), subset).reshape(mask.shape), category))
    for _ in range(rng.integers(0, 4)):
        pred.append((ellipse(rng, height, width), rng.integers(0, 5)))
    if crowded:
        pred += [(ellipse(rng, height, width), 0) for _ in range(110)]
        gt += [(ellipse(rng, height, width), 0, False) for _ in range(3)]
    if rng.random() < 0.2:
        pred.append((np.zeros((height, width), bool), rng.integers(0, 5)))
    num_pred_slots = max(num_pred_slots, len(pred))
    num_gt_slots = max(num_gt_slots, len(gt))
    assert len(pred) <= num_pred_slots and len(gt) <= num_gt_slots

    # Scores on a coarse grid tie within and across images.
    scores = rng.random(num_pred_slots).astype(np.float32)
    scores = np.where(rng.random(num_pred_slots) < 0.3, np.round(scores, 1), scores).astype(np.float32)
    # Unused slots hold garbage that must be ignored.
    image = {"pred_masks": rng.random((num_pred_slots, height, width)) < 0.5,
             "pred_classes": rng.integers(-3, 9, num_pred_slots), "pred_scores": scores,
             "pred_valid": np.arange(num_pred_slots) < len(pred),
             "gt_masks": rng.random((num_gt_slots, height, width)) < 0.5,
             "gt_classes": rng.integers(-3, 9, num_gt_slots),
             "gt_iscrowd": rng.random(num_gt_slots) < 0.5,
             "gt_valid": np.arange(num_gt_slots) < len(gt)}
    for i, (mask, category) in enumerate(pred):
        image["pred_masks"][i], image["pred_classes"][i] = mask, category
    for i, (mask, category, crowd) in enumerate(gt):
        image["gt_masks"][i], image["gt_classes"][i], image["gt_iscrowd"][i] = mask, category, crowd
    return image


def tie_image():
    """A detection with IoU 1/2 to two regular ground-truth masks takes the later one, as COCOeval
    does; the next detection then matches the earlier one at IoU 1 instead of being a false positive."""
    gt = np.zeros((2, 24, 32), bool)
    gt[0, :4, :4] = gt[1, :4, 6:10] = True
    pred = np.stack([gt[0] | gt[1], gt[0]])
    return {"pred_masks": pred, "pred_classes": np.array([1, 1]),
            "pred_scores": np.array([0.9, 0.8], np.float32), "pred_valid": np.ones(2, bool),
            "gt_masks": gt, "gt_classes": np.array([1, 1]), "gt_iscrowd": np.zeros(2, bool),
            "gt_valid": np.ones(2, bool)}


def random_dataset(seed, num_images=30):
    rng = np.random.default_rng(seed)
    images = [random_image(rng, crowded=(i == 3)) for i in range(num_images)]
    return [tie_image()] + images


def used(image, side):
    valid = image[f"{side}_valid"]
    return image[f"{side}_masks"][valid], image[f"{side}_classes"][valid], valid


def coco_eval(images, area_ranges):
    """pycocotools on the same dataset: image ids 1.., category ids k + 1, RLE masks."""
    categories = [{"id": k + 1, "name": str(k)} for k in range(NUM_CATEGORIES)]
    dataset = {"images": [], "annotations": [], "categories": categories}
    results = []
    for image_id, image in enumerate(images, 1):
        height, width = image["gt_masks"].shape[1:]
        dataset["images"].append({"id": image_id, "height": height, "width": width})
        masks, classes, valid = used(image, "gt")
        for mask, category, crowd in zip(masks, classes, image["gt_iscrowd"][valid]):
            rle = mask_utils.encode(np.asfortranarray(mask, np.uint8))
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": image_id,
                "category_id": int(category) + 1, "segmentation": rle, "area": int(mask.sum()),
                "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": int(crowd)})
        masks, classes, valid = used(image, "pred")
        for mask, category, score in zip(masks, classes, image["pred_scores"][valid]):
            results.append({"image_id": image_id, "category_id": int(category) + 1, "score": float(score),
                            "segmentation": mask_utils.encode(np.asfortranarray(mask, np.uint8))})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
        evaluator.params.areaRng = [list(r) for r in area_ranges]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def jaxseg_eval(images, area_ranges):
    accumulator = InstanceAccumulator(NUM_CATEGORIES)
    for image in images:
        accumulator.update(instance_stats(**image))
    return accumulator.evaluate(area_ranges)


@pytest.mark.parametrize("seed, area_ranges", [(0, COCO_AREA_RANGES), (1, SMALL_IMAGE_AREA_RANGES),
                                               (2, SMALL_IMAGE_AREA_RANGES)])
def test_matches_pycocotools(seed, area_ranges):
    images = random_dataset(seed)
    expected = coco_eval(images, area_ranges)
    got = jaxseg_eval(images, area_ranges)

    np.testing.assert_array_equal(got["precision"], expected.eval["precision"])
    np.testing.assert_array_equal(got["recall"], expected.eval["recall"])
    np.testing.assert_allclose([got[name] for name, *_ in SUMMARY], expected.stats, rtol=0, atol=TOL)
    precision = expected.eval["precision"][:, :, :, 0, 2]
    expected_per_class = [precision[:, :, k][precision[:, :, k] > -1].mean()
                          if (precision[:, :, k] > -1).any() else np.nan for k in range(NUM_CATEGORIES)]
    np.testing.assert_allclose(got["per_class_AP"], expected_per_class, rtol=0, atol=TOL)

    # The data reached the cases that matter: absent categories, detections matched to crowd ground
    # truth (ignored), and unmatched detections ignored for their area.
    assert np.isnan(got["per_class_AP"][4:]).all() and not np.isnan(got["per_class_AP"][:4]).any()
    all_range = [e for e in expected.evalImgs if e is not None and e["aRng"] == list(area_ranges[0])]
    assert any((e["dtIgnore"] & (e["dtMatches"] > 0)).any() for e in all_range)
    assert any((e["dtIgnore"] & (e["dtMatches"] == 0)).any() for e in expected.evalImgs if e is not None)
    if area_ranges == COCO_AREA_RANGES:
        assert got["APm"] == got["APl"] == -1
    else:
        assert min(got["APs"], got["APm"], got["APl"]) > 0


def test_tie_goes_to_the_later_ground_truth():
    got = jaxseg_eval([tie_image()], COCO_AREA_RANGES)
    assert got["precision"][0, :, 1, 0, 2].min() == 1.0  # both detections match at IoU 0.5
    assert got["AP50"] == 1.0


def test_batched_jit_matches_per_image():
    rng = np.random.default_rng(3)
    images = [image for image in (random_image(rng) for _ in range(40))
              if image["gt_masks"].shape[1:] == (48, 48) and image["pred_masks"].shape[0] == 24][:6]
    assert len(images) >= 3
    batch = {key: np.stack([image[key] for image in images]) for key in images[0]}
    accumulator = InstanceAccumulator(NUM_CATEGORIES)
    accumulator.update(jax.jit(jax.vmap(instance_stats))(**batch))
    got, expected = accumulator.evaluate(), jaxseg_eval(images, COCO_AREA_RANGES)
    np.testing.assert_array_equal(got["precision"], expected["precision"])
    np.testing.assert_array_equal(got["recall"], expected["recall"])


def test_empty_dataset():
    got = InstanceAccumulator(3).evaluate()
    assert all(got[name] == -1 for name, *_ in SUMMARY) and np.isnan(got["per_class_AP"]).all()


def test_bad_inputs():
    image = tie_image()
    with pytest.raises(ValueError, match=r"pred_masks must be \(instances, H, W\) bool"):
        instance_stats(**{**image, "pred_masks": image["pred_masks"].astype(np.uint8)})
    with pytest.raises(ValueError, match=r"gt_masks must be \(instances, H, W\) bool"):
        instance_stats(**{**image, "gt_masks": image["gt_masks"][0]})
    with pytest.raises(ValueError, match="differ in H, W"):
        instance_stats(**{**image, "gt_masks": image["gt_masks"][:, :, :8]})
    with pytest.raises(ValueError, match=r"pred_scores must have shape \(2,\)"):
        instance_stats(**{**image, "pred_scores": np.ones(3, np.float32)})
    with pytest.raises(TypeError, match="gt_classes must hold integer classes"):
        instance_stats(**{**image, "gt_classes": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match=r"gt_valid must have shape \(2,\)"):
        instance_stats(**{**image, "gt_valid": np.ones((2, 1), bool)})
    accumulator = InstanceAccumulator(2)
    with pytest.raises(ValueError, match=r"pred_classes of used slots must lie in \[0, 2\), found \[5\]"):
        accumulator.update(instance_stats(**{**image, "pred_classes": np.array([1, 5])}))
    with pytest.raises(ValueError, match="area_ranges must be 4"):
        accumulator.evaluate(area_ranges=COCO_AREA_RANGES[:3])


def test_image_without_ground_truth_counts_its_detections():
    accumulator = InstanceAccumulator(2)
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :2, :2] = True
    accumulator.update(instance_stats(masks, np.array([0]), np.array([0.9]), np.zeros((0, 4, 4), bool),
                                      np.zeros(0, np.int32), np.zeros(0, bool)))
    gt = masks.copy()  # a second image whose one instance is found
    accumulator.update(instance_stats(masks, np.array([0]), np.array([0.8]), gt, np.array([0]), np.array([0])))
    # The higher-scored detection is a false positive: precision 1/2 at full recall, as COCOeval.
    assert accumulator.evaluate()["AP"] == pytest.approx(0.5)
