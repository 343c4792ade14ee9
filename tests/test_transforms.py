"""Joint augmentations keep image and targets aligned, pad with the right values, and are determined by
the generator alone."""
import numpy as np
import pytest

from jaxseg.data import transforms as T


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
    out = T.random_crop(T.pad_to(T.hflip(example), (64, 80)), rng, (56, 72))
    assert out["image"].shape == (56, 72, 3) and out["semantic"].shape == (56, 72)
    padded = out["image"].sum(-1) == 0
    assert np.all(out["semantic"][padded] == 255) and np.all(out["panoptic"][padded] == 0)
    inside = ~padded
    np.testing.assert_array_equal(_label_from_image(out["image"])[inside], out["semantic"][inside])


def test_scale_jitter_keeps_alignment_away_from_edges():
    example = _scene()
    for seed in range(5):
        out = T.scale_jitter(example, np.random.default_rng(seed), (96, 96), (0.5, 2.0))
        recovered = _label_from_image(out["image"])
        agree = (recovered == out["semantic"]).mean()
        assert agree > 0.9, agree  # bilinear image vs nearest labels differ only along edges
        assert set(np.unique(out["semantic"])) <= {0, 1, 2, 255}


def test_same_generator_same_result_and_masks_follow():
    example = _scene()
    example["masks"] = np.stack([example["semantic"] == 1, example["semantic"] == 2])
    a = T.eomt_train_example(example, np.random.default_rng(3), (32, 32), (0.5, 1.5), color=True,
                             max_segments=4)
    b = T.eomt_train_example(example, np.random.default_rng(3), (32, 32), (0.5, 1.5), color=True,
                             max_segments=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["masks"].shape == (4, 32, 32) and a["valid"].any()
    flipped = T.hflip(example)
    np.testing.assert_array_equal(flipped["masks"][0], example["masks"][0][:, ::-1])


def test_mask_targets_from_semantic_and_panoptic():
    example = _scene()
    targets = T.mask_targets(example["semantic"], max_segments=5)
    assert targets["valid"].tolist() == [True, True, True, False, False]
    assert sorted(targets["labels"][:3].tolist()) == [0, 1, 2]
    for mask, label in zip(targets["masks"][:3], targets["labels"][:3]):
        np.testing.assert_array_equal(mask, example["semantic"] == label)
    segments = {"id": np.array([11, 12]), "category_id": np.array([4, 9]), "iscrowd": np.array([False, True])}
    targets = T.mask_targets(panoptic=example["panoptic"], segments=segments, max_segments=3)
    assert targets["valid"].tolist() == [True, False, False] and targets["labels"][0] == 4
    with pytest.raises(ValueError, match="exactly one"):
        T.mask_targets(example["semantic"], example["panoptic"], max_segments=3)


def test_color_jitter_changes_only_the_image():
    example = _scene()
    out = T.color_jitter(example, np.random.default_rng(1), p=1.0)
    assert out["image"].dtype == np.uint8 and not np.array_equal(out["image"], example["image"])
    np.testing.assert_array_equal(out["semantic"], example["semantic"])


def test_bad_inputs_are_named():
    example = _scene()
    with pytest.raises(ValueError, match="unknown per-pixel keys"):
        T.hflip(dict(example, depth=np.zeros((48, 64))))
    with pytest.raises(ValueError, match="pad first"):
        T.random_crop(example, np.random.default_rng(0), (100, 100))
    empty = dict(example, semantic=np.full((48, 64), 255, np.uint8))
    with pytest.raises(ValueError, match="no segment survived"):
        T.eomt_train_example(empty, np.random.default_rng(0), (32, 32), (0.5, 1.0), color=False,
                             max_segments=2, max_attempts=3)


def test_panoptic_targets_through_the_eomt_chain():
    example = _scene()
    segments = {"id": np.array([11, 12]), "category_id": np.array([4, 9]), "iscrowd": np.array([False, True])}
    out = T.eomt_train_example(example, np.random.default_rng(0), (40, 40), (0.8, 1.2), color=False,
                               max_segments=3, segments=segments)
    assert out["labels"][out["valid"]].tolist() == [4]  # the crowd segment never becomes a target


def test_a_generated_scene_through_the_eomt_chain():
    from jaxseg.data.synthetic import SceneConfig, generate_scene
    scene = generate_scene(SceneConfig(image_size=64), 0)
    example = {"image": scene["image"], "semantic": scene["semantic"], "panoptic": scene["panoptic"]}
    out = T.eomt_train_example(example, np.random.default_rng(0), (48, 48), (0.5, 1.5), color=True,
                               max_segments=16, segments=scene["segments"])
    assert out["image"].shape == (48, 48, 3) and out["masks"].shape == (16, 48, 48)
    valid = out["valid"]
    assert set(out["labels"][valid].tolist()) <= set(np.asarray(scene["segments"]["category_id"]).tolist())
    assert not (out["masks"][valid].sum(0) > 1).any()  # segments do not overlap
