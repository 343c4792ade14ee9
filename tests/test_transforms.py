"""Joint augmentations keep image and targets aligned, pad with the right values, and are determined by
the generator alone."""
from types import SimpleNamespace

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from jaxseg.data.augment import common, eomt, mmseg, timm


def _scene(height=48, width=64):
    """Rectangles whose label is also written into the image colour, so alignment can be read back."""
    semantic = np.full((height, width), 0, np.uint8)
    semantic[5:30, 8:40] = 1
    semantic[20:45, 30:60] = 2
    semantic[0:3] = 255
    image = np.stack([semantic * 40, 255 - semantic * 40, np.full_like(semantic, 7)], -1).astype(np.uint8)
    image[semantic == 255] = (255, 0, 255)
    panoptic = np.zeros((height, width), np.int32)
    panoptic[5:30, 8:40] = 11
    panoptic[20:45, 30:60] = 12
    return {"image": image, "semantic": semantic, "panoptic": panoptic}


def _label_from_image(image):
    return np.where(image[..., 2] == 7, np.round(image[..., 0] / 40), 255)


def test_flip_crop_pad_keep_alignment_exactly():
    example = _scene()
    rng = np.random.default_rng(0)
    out = common.random_crop(common.pad_to(common.hflip(example), (64, 80)), rng, (56, 72))
    assert out["image"].shape == (56, 72, 3) and out["semantic"].shape == (56, 72)
    padded = out["image"].sum(-1) == 0
    assert np.all(out["semantic"][padded] == 255) and np.all(out["panoptic"][padded] == 0)
    inside = ~padded
    np.testing.assert_array_equal(_label_from_image(out["image"])[inside], out["semantic"][inside])


def test_scale_jitter_keeps_alignment_away_from_edges():
    example = _scene()
    for seed in range(5):
        out = eomt.scale_jitter(example, np.random.default_rng(seed), (96, 96), (0.5, 2.0))
        recovered = _label_from_image(out["image"])
        agree = (recovered == out["semantic"]).mean()
        assert agree > 0.9, agree  # bilinear image vs nearest labels differ only along edges
        assert set(np.unique(out["semantic"])) <= {0, 1, 2, 255}


def test_same_generator_same_result_and_masks_follow():
    example = _scene()
    example["masks"] = np.stack([example["semantic"] == 1, example["semantic"] == 2])
    a = eomt.eomt_train_example(example, np.random.default_rng(3), (32, 32), (0.5, 1.5), color=True,
                             max_segments=4)
    b = eomt.eomt_train_example(example, np.random.default_rng(3), (32, 32), (0.5, 1.5), color=True,
                             max_segments=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["masks"].shape == (4, 32, 32) and a["valid"].any()
    flipped = common.hflip(example)
    np.testing.assert_array_equal(flipped["masks"][0], example["masks"][0][:, ::-1])


def test_mask_targets_from_semantic_and_panoptic():
    example = _scene()
    targets = eomt.mask_targets(example["semantic"], max_segments=5)
    assert targets["valid"].tolist() == [True, True, True, False, False]
    assert sorted(targets["labels"][:3].tolist()) == [0, 1, 2]
    for mask, label in zip(targets["masks"][:3], targets["labels"][:3]):
        np.testing.assert_array_equal(mask, example["semantic"] == label)
    segments = {"id": np.array([11, 12]), "category_id": np.array([4, 9]), "iscrowd": np.array([False, True])}
    targets = eomt.mask_targets(panoptic=example["panoptic"], segments=segments, max_segments=3)
    assert targets["valid"].tolist() == [True, False, False] and targets["labels"][0] == 4
    with pytest.raises(ValueError, match="exactly one"):
        eomt.mask_targets(example["semantic"], example["panoptic"], max_segments=3)


def test_color_jitter_changes_only_the_image():
    example = _scene()
    out = eomt.color_jitter(example, np.random.default_rng(1), p=1.0)
    assert out["image"].dtype == np.uint8 and not np.array_equal(out["image"], example["image"])
    np.testing.assert_array_equal(out["semantic"], example["semantic"])


def test_bad_inputs_are_named():
    example = _scene()
    with pytest.raises(ValueError, match="unknown per-pixel keys"):
        common.hflip(dict(example, depth=np.zeros((48, 64))))
    with pytest.raises(ValueError, match="pad first"):
        common.random_crop(example, np.random.default_rng(0), (100, 100))
    empty = dict(example, semantic=np.full((48, 64), 255, np.uint8))
    with pytest.raises(ValueError, match="no segment survived"):
        eomt.eomt_train_example(empty, np.random.default_rng(0), (32, 32), (0.5, 1.0), color=False,
                             max_segments=2, max_attempts=3)


def test_panoptic_targets_through_the_eomt_chain():
    example = _scene()
    segments = {"id": np.array([11, 12]), "category_id": np.array([4, 9]), "iscrowd": np.array([False, True])}
    out = eomt.eomt_train_example(example, np.random.default_rng(0), (40, 40), (0.8, 1.2), color=False,
                               max_segments=3, segments=segments)
    assert out["labels"][out["valid"]].tolist() == [4]  # the crowd segment never becomes a target


def test_a_generated_scene_through_the_eomt_chain():
    from jaxseg.data.synthetic import SceneConfig, generate_scene
    scene = generate_scene(SceneConfig(image_size=64), 0)
    example = {"image": scene["image"], "semantic": scene["semantic"], "panoptic": scene["panoptic"]}
    out = eomt.eomt_train_example(example, np.random.default_rng(0), (48, 48), (0.5, 1.5), color=True,
                               max_segments=16, segments=scene["segments"])
    assert out["image"].shape == (48, 48, 3) and out["masks"].shape == (16, 48, 48)
    valid = out["valid"]
    assert set(out["labels"][valid].tolist()) <= set(np.asarray(scene["segments"]["category_id"]).tolist())
    assert not (out["masks"][valid].sum(0) > 1).any()  # segments do not overlap


# --- WeakTr augmentations -----------------------------------------------------------------------------

BLOCK = 8
RAND_AUGMENT_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# The ops that timm's magnitude-0 arguments make the identity (posterize still keeps 4 bits).
RAND_AUGMENT_IDENTITY_AT_ZERO = RAND_AUGMENT_GEOMETRIC + (
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing")


def _coordinate_scene(height=96, width=128):
    """Red and green are ramps 2x and 2y (bilinear and bicubic resampling reproduce linear ramps, so any
    output pixel reads back its source coordinates); the labels number 8 x 8 blocks of the same
    coordinates, and the panoptic ids and masks are derived from the labels."""
    y, x = np.mgrid[:height, :width]
    image = np.stack([2 * x, 2 * y, np.zeros_like(x)], -1).astype(np.uint8)
    semantic = ((y // BLOCK) * 16 + x // BLOCK).astype(np.uint8)
    return {"image": image, "semantic": semantic, "panoptic": semantic.astype(np.int32) * 1000 + 7,
            "masks": np.stack([semantic == 17, semantic == 42])}


def _assert_aligned(out, tolerance=1.0):
    """Every pixel away from fill (label 255) reads back coordinates within `tolerance` source pixels of
    its label's block, and the other targets still match the labels."""
    label = out["semantic"].astype(int)
    near_fill = (sliding_window_view(np.pad(label, 2, mode="edge"), (5, 5)) == 255).any((-2, -1))
    checked = ~near_fill
    assert checked.mean() > 0.3, checked.mean()
    x, y = out["image"][..., 0] / 2, out["image"][..., 1] / 2
    for coordinate, block in ((x, label % 16), (y, label // 16)):
        low, high = BLOCK * block - tolerance, BLOCK * (block + 1) - 1 + tolerance
        inside = (coordinate >= low) & (coordinate <= high)
        assert inside[checked].all(), np.argwhere(checked & ~inside)[:5]
    np.testing.assert_array_equal(out["panoptic"], np.where(label == 255, 0, label * 1000 + 7))
    np.testing.assert_array_equal(out["masks"], np.stack([label == 17, label == 42]))


GEOMETRIC_OPS = {
    "hflip": lambda x, rng: common.random_hflip(x, rng, p=1.0),
    "random_resized_crop": lambda x, rng: timm.random_resized_crop(x, rng, (48, 40)),
    "ratio_rescale": lambda x, rng: mmseg.ratio_rescale(x, rng, img_scale=(8 * 64, 64)),
    "random_crop_cat_max": lambda x, rng: mmseg.random_crop_cat_max(x, rng, (40, 56)),
    "pad_to": lambda x, rng: common.pad_to(x, (100, 140)),
    **{name: lambda x, rng, name=name: timm.rand_augment_op(x, name, 10.0, rng)
       for name in RAND_AUGMENT_GEOMETRIC},
}


@pytest.mark.parametrize("op", GEOMETRIC_OPS)
def test_weaktr_geometric_ops_keep_every_target_aligned(op):
    # OpenCV's nearest is top-left aligned: on downscaling by s it reads (s - 1) / 2 source pixels before
    # the bilinear sample (1 at s = 3, the smallest ratio_rescale here), as in mmseg.
    tolerance = 2.0 if op == "ratio_rescale" else 1.0
    for seed in range(4):
        _assert_aligned(GEOMETRIC_OPS[op](_coordinate_scene(), np.random.default_rng(seed)), tolerance)


class _PythonRandom:
    """The calls timm makes on Python's `random` module, answered from a numpy Generator with the draws
    jaxseg makes, so that both sides see the same random numbers."""

    def __init__(self, rng):
        self.rng = rng

    def random(self):
        return self.rng.random()

    def uniform(self, low, high):
        return self.rng.uniform(low, high)

    def randint(self, low, high):  # inclusive, as Python's
        return int(self.rng.integers(low, high + 1))

    def gauss(self, mu, sigma):
        return self.rng.normal(mu, sigma)


@pytest.fixture
def timm_data(monkeypatch):
    """timm's data modules, with `route(seed)` sending all their randomness to default_rng(seed)."""
    pytest.importorskip("timm")
    import torch
    from timm.data import auto_augment, random_erasing, transforms

    def route(seed):
        rng = np.random.default_rng(seed)
        for module in (auto_augment, random_erasing, transforms):
            monkeypatch.setattr(module, "random", _PythonRandom(rng))
        monkeypatch.setattr(np.random, "choice", lambda ops, n, replace, p: [
            ops[i] for i in rng.integers(0, len(ops), size=n)])
        monkeypatch.setattr(random_erasing, "_get_pixels", lambda per_pixel, rand_color, shape, dtype, device:
                            torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)))

    return SimpleNamespace(auto_augment=auto_augment, random_erasing=random_erasing, transforms=transforms,
                           route=route)


def _photo(height=40, width=56, seed=0):
    """A smooth colour image (blurred noise), so equalise, autocontrast and posterize see real content."""
    noise = np.random.default_rng(seed).integers(0, 256, (height // 4, width // 4, 3), np.uint8)
    return np.asarray(Image.fromarray(noise).resize((width, height), Image.BICUBIC))


# timm's create_transform hyper-parameters for WeakTr (224 input, bicubic).
TIMM_AA_HPARAMS = dict(translate_const=100, img_mean=timm.RAND_AUGMENT_FILL, interpolation=Image.BICUBIC)


@pytest.mark.parametrize("name", timm.RAND_AUGMENT_OPS)
def test_rand_augment_ops_match_timm(timm_data, name):
    image = _photo()
    semantic = _coordinate_scene(40, 56)["semantic"]
    for magnitude in (0.0, 3.3, 9.0, 10.0):
        for seed in (0, 2):  # the sign draw: rng(0).random() > 0.5, rng(2).random() < 0.5
            timm_data.route(seed)
            op = timm_data.auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude,
                                                  hparams=TIMM_AA_HPARAMS)
            try:
                expected = np.asarray(op(Image.fromarray(image)))
            except ValueError:  # posterize to 0 bits: recent Pillow refuses, older Pillow gave black
                assert name == "PosterizeIncreasing" and magnitude == 10
                expected = np.zeros_like(image)
            out = timm.rand_augment_op({"image": image, "semantic": semantic}, name, magnitude,
                                    np.random.default_rng(seed))
            assert out["image"].dtype == np.uint8 and out["image"].shape == image.shape
            np.testing.assert_array_equal(out["image"], expected, err_msg=f"{name} at {magnitude}")
            if name not in RAND_AUGMENT_GEOMETRIC:
                np.testing.assert_array_equal(out["semantic"], semantic)


@pytest.mark.parametrize("name", RAND_AUGMENT_IDENTITY_AT_ZERO)
def test_rand_augment_ops_are_the_identity_at_magnitude_zero(name):
    example = _coordinate_scene(40, 56)
    example["image"] = _photo()
    out = timm.rand_augment_op(example, name, 0.0, np.random.default_rng(0))
    for key in example:
        np.testing.assert_array_equal(out[key], example[key])


def test_rand_augment_policy_matches_timm(timm_data):
    transform = timm_data.auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(TIMM_AA_HPARAMS))
    image = _photo()
    for seed in range(30):
        timm_data.route(seed)
        expected = np.asarray(transform(Image.fromarray(image)))
        np.testing.assert_array_equal(timm.rand_augment({"image": image}, np.random.default_rng(seed))["image"],
                                      expected)


def test_random_resized_crop_matches_timm_and_pil(timm_data):
    image = _photo(60, 90)
    crop = timm_data.transforms.RandomResizedCropAndInterpolation((32, 24), interpolation="bicubic")
    for seed in range(20):
        timm_data.route(seed)
        expected = np.asarray(crop(Image.fromarray(image)))
        out = timm.random_resized_crop({"image": image}, np.random.default_rng(seed), (32, 24))["image"]
        np.testing.assert_array_equal(out, expected)
    # No box of 1.5 to 2 times the area fits: the fallback is the centre crop at the largest aspect
    # ratio, 40 x round(40 * 4 / 3) = 53, from column (100 - 53) // 2 = 23.
    wide = _photo(40, 100)
    out = timm.random_resized_crop({"image": wide}, np.random.default_rng(0), (20, 30), scale=(1.5, 2.0))
    expected = Image.fromarray(wide).crop((23, 0, 76, 40)).resize((30, 20), Image.BICUBIC)
    np.testing.assert_array_equal(out["image"], np.asarray(expected))


def test_random_erasing_matches_timm(timm_data):
    import torch
    image = common.normalize_image(_photo())
    for seed in range(20):
        timm_data.route(seed)
        erase = timm_data.random_erasing.RandomErasing(0.5, mode="pixel", device="cpu")
        expected = erase(torch.from_numpy(image.transpose(2, 0, 1).copy())).numpy().transpose(1, 2, 0)
        out = timm.random_erasing({"image": image}, np.random.default_rng(seed), p=0.5)["image"]
        np.testing.assert_array_equal(out, expected)


def test_random_erasing_statistics():
    size = 64
    blank = {"image": np.zeros((size, size, 3), np.float32)}
    erased = [timm.random_erasing(blank, np.random.default_rng(seed))["image"] for seed in range(2000)]
    changed = [e for e in erased if e.any()]
    assert abs(len(changed) / len(erased) - 0.25) < 0.04  # p = 0.25; 4 standard deviations
    noise = []
    for e in changed:
        rows, cols = np.nonzero(e.any(-1))
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert e[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one full rectangle
        assert h < size and w < size
        # Area fraction in [0.02, 1/3] and aspect ratio in [0.3, 1 / 0.3], up to the rounding of h and w.
        assert 0.02 * 0.85 <= h * w / size ** 2 <= 1 / 3 * 1.06, (h, w)
        assert 0.3 * 0.8 <= h / w <= 1 / 0.3 / 0.8, (h, w)
        noise.append(e[rows.min():rows.max() + 1, cols.min():cols.max() + 1].ravel())
    noise = np.concatenate(noise)
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01


def test_weaktr_stage1_example():
    example = {"image": _photo(60, 90), "labels": np.array([0, 1, 1], np.float32)}
    outs = [timm.weaktr_stage1_example(example, np.random.default_rng(seed), size=32) for seed in (0, 0, 1)]
    assert outs[0]["image"].shape == (32, 32, 3) and outs[0]["image"].dtype == np.float32
    np.testing.assert_array_equal(outs[0]["image"], outs[1]["image"])
    assert not np.array_equal(outs[0]["image"], outs[2]["image"])
    np.testing.assert_array_equal(outs[0]["labels"], example["labels"])
    # "flip": the whole image resized, mirrored or not, normalised.
    resized = common.normalize_image(common.resize({"image": example["image"]}, (32, 32))["image"])
    flips = [timm.weaktr_stage1_example(example, np.random.default_rng(seed), size=32, augmentation="flip")["image"]
             for seed in range(8)]
    assert all(np.array_equal(f, resized) or np.array_equal(f, resized[:, ::-1]) for f in flips)
    assert any(np.array_equal(f, resized) for f in flips) and any(np.array_equal(f, resized[:, ::-1]) for f in flips)
    with pytest.raises(ValueError, match="augmentation must be one of"):
        timm.weaktr_stage1_example(example, np.random.default_rng(0), size=32, augmentation="none")


def test_ratio_rescale_follows_mmcv_rule():
    for seed in range(10):
        ratio = np.random.default_rng(seed).random() * 1.5 + 0.5  # the first draw, as mmseg's
        # A 30 x 40 image: the short-side bound int(52 r) binds and sets the short side exactly.
        out = mmseg.ratio_rescale({"image": np.zeros((30, 40, 3), np.uint8)}, np.random.default_rng(seed),
                              img_scale=(8 * 52, 52))
        short = int(52 * ratio)
        assert out["image"].shape[:2] == (short, int(40 * short / 30 + 0.5))
        # A 10 x 100 image is longer than 8:1, so the long-side bound int(416 r) binds instead.
        out = mmseg.ratio_rescale({"image": np.zeros((10, 100, 3), np.uint8)}, np.random.default_rng(seed),
                              img_scale=(8 * 52, 52))
        long = int(416 * ratio)
        assert out["image"].shape[:2] == (int(10 * long / 100 + 0.5), long)


def test_mmcv_resize_matches_opencv():
    image = np.random.default_rng(0).integers(0, 256, (3, 5, 3), np.uint8)
    # Known answers from cv2.resize(INTER_LINEAR) (OpenCV 5.0, x86), red channel.
    up = [[95, 148, 204, 78, 77, 202, 233, 248], [79, 136, 199, 96, 61, 95, 102, 105],
          [65, 106, 154, 107, 87, 95, 62, 36], [59, 69, 83, 108, 147, 202, 127, 64]]
    np.testing.assert_array_equal(mmseg.mmcv_resize({"image": image}, (4, 8))["image"][..., 0], up)
    np.testing.assert_array_equal(mmseg.mmcv_resize({"image": image}, (2, 3))["image"][..., 0],
                                  [[130, 27, 183], [78, 105, 90]])
    # Upsampling has no antialiasing to differ in: PIL's bilinear agrees up to OpenCV's fixed point.
    photo = _photo()
    ours = mmseg.mmcv_resize({"image": photo}, (100, 130))["image"].astype(int)
    assert np.abs(ours - np.asarray(Image.fromarray(photo).resize((130, 100), Image.BILINEAR))).max() <= 1
    # OpenCV's nearest takes source floor(i * in / out), not the pixel centre as PIL does.
    labels = {"image": np.zeros((2, 8, 3), np.uint8),
              "semantic": np.arange(8, dtype=np.uint8)[None].repeat(2, 0)}
    assert mmseg.mmcv_resize(labels, (2, 4))["semantic"][0].tolist() == [0, 2, 4, 6]
    assert mmseg.mmcv_resize(labels, (2, 12))["semantic"][0].tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7]


def test_random_crop_honours_cat_max_ratio_when_feasible():
    # Rows 0-31: columns alternate classes 0 and 1. Rows 32-95: per 8 columns, 4 ignore, 3 of class 0,
    # 1 of class 1, so class 0 holds 3/4 of the counted pixels there; crops mostly in those rows fail.
    semantic = np.tile(np.array([255] * 4 + [0] * 3 + [1], np.uint8), (96, 8))
    semantic[:32] = np.arange(64) % 2
    example = {"image": np.zeros((96, 64, 3), np.uint8), "semantic": semantic}

    def dominant_share(crop):
        counts = np.bincount(crop[crop != 255], minlength=2)
        return counts.max() / counts.sum()

    capped = [mmseg.random_crop_cat_max(example, np.random.default_rng(s), (32, 32))["semantic"]
              for s in range(40)]
    assert all(c.shape == (32, 32) and dominant_share(c) < 0.75 for c in capped)
    free = [mmseg.random_crop_cat_max(example, np.random.default_rng(s), (32, 32), cat_max_ratio=1.0)["semantic"]
            for s in range(40)]
    assert any(dominant_share(c) >= 0.75 for c in free)
    # Infeasible (one class): the last box drawn is kept. Smaller images give smaller crops.
    single = {"image": np.zeros((20, 24, 3), np.uint8), "semantic": np.zeros((20, 24), np.uint8)}
    assert mmseg.random_crop_cat_max(single, np.random.default_rng(0), (16, 32))["semantic"].shape == (16, 24)


def test_opencv_hsv_conversions():
    # Known answers from cv2.cvtColor (OpenCV 5.0, x86): RGB -> HSV ...
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [12, 200, 77], [250, 250, 250], [3, 2, 1],
                     [200, 60, 40]]], np.uint8)
    hsv = [[[0, 255, 255], [60, 255, 255], [120, 255, 255], [70, 240, 200], [0, 0, 250], [15, 170, 3],
            [4, 204, 200]]]
    np.testing.assert_array_equal(mmseg._cv2_rgb_to_hsv(rgb), hsv)
    # ... and HSV -> RGB, where the first two land on integers that only the fused 1 - s * x keeps.
    hsv = np.array([[[1, 90, 85], [1, 90, 170], [100, 200, 50], [179, 255, 255], [0, 0, 77], [60, 128, 200]]],
                   np.uint8)
    rgb = [[[85, 56, 55], [170, 112, 110], [10, 36, 50], [255, 0, 8], [77, 77, 77], [99, 200, 99]]]
    np.testing.assert_array_equal(mmseg._cv2_hsv_to_rgb(hsv), rgb)


def test_photometric_distortion_ranges():
    # Grey has no saturation or hue: only brightness (+-32) and contrast (x 0.5 to 1.5) act, uniformly.
    grey = {"image": np.full((8, 8, 3), 100, np.uint8), "semantic": np.zeros((8, 8), np.uint8)}
    values = []
    for seed in range(300):
        out = mmseg.photometric_distortion(grey, np.random.default_rng(seed))
        assert out["image"].dtype == np.uint8 and (out["image"] == out["image"][0, 0, 0]).all()
        np.testing.assert_array_equal(out["semantic"], grey["semantic"])
        values.append(int(out["image"][0, 0, 0]))
    assert 34 <= min(values) < 50 and 160 < max(values) <= 198  # (100 - 32) / 2 and (100 + 32) * 1.5
    assert np.mean(np.array(values) == 100) > 0.2  # neither step, p = 1/4
    # Hue moves by an integer in [-18, 18) half-degrees; brightness, contrast and saturation keep it up
    # to rounding for a colour that no step clips ((130 + 32) * 1.5 < 255, 60 - 32 > 0).
    colour = {"image": np.tile(np.array([130, 75, 60], np.uint8), (8, 8, 1))}
    hue = int(mmseg._cv2_rgb_to_hsv(colour["image"])[0, 0, 0])
    shifts = []
    for seed in range(300):
        out = mmseg.photometric_distortion(colour, np.random.default_rng(seed))["image"]
        shifts.append((int(mmseg._cv2_rgb_to_hsv(out)[0, 0, 0]) - hue + 90) % 180 - 90)
    assert max(np.abs(shifts)) <= 18 + 2 and min(shifts) < -12 and max(shifts) > 12
    again = mmseg.photometric_distortion(colour, np.random.default_rng(7))["image"]
    np.testing.assert_array_equal(again, mmseg.photometric_distortion(colour, np.random.default_rng(7))["image"])


def test_weaktr_stage2_example():
    rng = np.random.default_rng(0)
    example = {"image": _photo(40, 50), "semantic": rng.integers(0, 3, (40, 50)).astype(np.uint8)}
    padded = 0
    for seed in range(12):
        out = mmseg.weaktr_stage2_example(example, np.random.default_rng(seed), crop=48, base=44)
        assert set(out) == {"image", "semantic"}
        assert out["image"].shape == (48, 48, 3) and out["image"].dtype == np.float32
        assert out["semantic"].shape == (48, 48) and set(np.unique(out["semantic"])) <= {0, 1, 2, 255}
        pad = out["semantic"] == 255
        assert (out["image"][pad] == 0).all()
        padded += pad.any()
        again = mmseg.weaktr_stage2_example(example, np.random.default_rng(seed), crop=48, base=44)
        np.testing.assert_array_equal(out["image"], again["image"])
    assert 0 < padded < 12  # short sides 22 to 88 around the 48 crop
