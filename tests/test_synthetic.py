"""The synthetic scenes: determinism, label consistency against independent recomputations, colour not
identifying the class while texture does, and the TFDS ArrayRecord build / read-back and its CLI
without TensorFlow."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage

from jaxseg.data import synthetic
from jaxseg.data.synthetic import SceneConfig, categories, generate_scene
from jaxseg.testing.limits import hang_guard

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = SceneConfig(image_size=64)


def assert_scenes_equal(a, b):
    for key in ("image", "semantic", "panoptic", "labels"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in a["segments"]:
        np.testing.assert_array_equal(a["segments"][key], b["segments"][key], err_msg=key)


def test_scenes_are_deterministic():
    scene = generate_scene(SMALL, 7)
    assert_scenes_equal(scene, generate_scene(SMALL, 7))
    assert_scenes_equal(scene, generate_scene(SceneConfig(image_size=64, seed=0), np.int64(7)))
    assert not np.array_equal(scene["image"], generate_scene(SMALL, 8)["image"])
    assert not np.array_equal(scene["image"], generate_scene(SceneConfig(image_size=64, seed=1), 7)["image"])
    with pytest.raises(ValueError, match="index"):
        generate_scene(SMALL, -1)


@pytest.mark.parametrize("config", [
    SMALL,
    SceneConfig(image_size=48, num_thing_classes=8, num_stuff_classes=5, objects_per_image=(0, 12),
                stuff_per_image=(2, 5), ignore_border=2, seed=3),
], ids=["default-64px", "all-classes"])
def test_labels_are_consistent(config):
    things, num_classes = config.num_thing_classes, config.num_classes
    table = categories(config)
    assert [c["id"] for c in table] == list(range(num_classes))
    assert [c["isthing"] for c in table] == [True] * things + [False] * config.num_stuff_classes
    for index in range(12):
        scene = generate_scene(config, index)
        size = config.image_size
        semantic, panoptic, segments = scene["semantic"], scene["panoptic"], scene["segments"]
        assert scene["image"].shape == (size, size, 3) and scene["image"].dtype == np.uint8
        assert semantic.shape == (size, size) and semantic.dtype == np.uint8
        assert panoptic.shape == (size, size) and panoptic.dtype == np.int32
        n = len(segments["id"])
        np.testing.assert_array_equal(segments["id"], np.arange(1, n + 1))
        assert set(np.unique(panoptic)) <= set(range(n + 1))
        # Void in one map is ignore in the other; elsewhere the semantic label is the segment's category.
        np.testing.assert_array_equal(panoptic == 0, semantic == 255)
        counted = panoptic > 0
        np.testing.assert_array_equal(semantic[counted], segments["category_id"][panoptic[counted] - 1])
        np.testing.assert_array_equal(segments["is_thing"], segments["category_id"] < things)
        assert not segments["iscrowd"].any()
        # Stuff is merged per class: at most one segment per stuff category.
        stuff = segments["category_id"][~segments["is_thing"]]
        assert len(stuff) == len(set(stuff.tolist())) >= 1
        for i in range(n):
            ys, xs = np.nonzero(panoptic == i + 1)
            assert segments["area"][i] == len(ys) > 0
            np.testing.assert_array_equal(
                segments["bbox"][i], [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
        present = np.zeros(num_classes, np.uint8)
        present[np.unique(semantic[counted])] = 1
        np.testing.assert_array_equal(scene["labels"], present)


@pytest.mark.parametrize("width", [1, 2])
def test_ignore_border_is_exactly_the_band_around_segment_edges(width):
    """The border draws no random numbers, so the scene without it is the same scene; its void pixels
    must be those whose (2 width + 1)^2 window (clamped at the image edge) holds another segment."""
    for index in range(6):
        bordered = generate_scene(SceneConfig(image_size=64, ignore_border=width), index)
        plain = generate_scene(SceneConfig(image_size=64, ignore_border=0), index)
        np.testing.assert_array_equal(bordered["image"], plain["image"])
        assert (plain["panoptic"] > 0).all() and (plain["semantic"] != 255).all()
        window = 2 * width + 1
        high = scipy.ndimage.maximum_filter(plain["panoptic"], size=window, mode="nearest")
        low = scipy.ndimage.minimum_filter(plain["panoptic"], size=window, mode="nearest")
        np.testing.assert_array_equal(bordered["panoptic"] == 0, high != low)
        # Outside the band nothing changes but the numbering of segments that lost all their pixels.
        kept = bordered["panoptic"] > 0
        np.testing.assert_array_equal(bordered["semantic"][kept], plain["semantic"][kept])


@pytest.mark.parametrize("kwargs,message", [
    (dict(image_size=8), "image_size"), (dict(num_thing_classes=9), "num_thing_classes"),
    (dict(num_stuff_classes=0), "num_stuff_classes"), (dict(objects_per_image=(3, 2)), "objects_per_image"),
    (dict(stuff_per_image=(1, 4)), "stuff_per_image"), (dict(scale_range=0.2), "scale_range"),
    (dict(scale_range=(0.0, 0.2)), "scale_range"), (dict(min_visible_fraction=1.5), "min_visible"),
    (dict(ignore_border=-1), "ignore_border"), (dict(seed=-1), "seed"), (dict(seed=np.int64(1)), "seed"),
    (dict(hue_spread=0.6), "hue_spread"), (dict(hue_spread="0.1"), "hue_spread"),
    (dict(saturation_range=(0.5, 1.2)), "saturation_range"), (dict(saturation_range=(0.9, 0.5)), "saturation_range"),
])
def test_bad_config_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SceneConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------
# Colour alone does not tell the classes apart; shape and texture do.

def _box_mean(x, radius):
    return scipy.ndimage.uniform_filter(x, size=2 * radius + 1, mode="nearest")


def _texture_features(image, mask):
    """Colour-blind per-segment texture descriptor: band-pass energies of the luminance at four scales
    (normalised by the segment's contrast) and the mean orientation coherence, over the interior."""
    luminance = image.astype(np.float64) @ [0.299, 0.587, 0.114]
    interior = _box_mean(mask.astype(np.float64), 2) > 0.999
    if interior.sum() < 20:
        return None
    blurs = [luminance] + [_box_mean(luminance, r) for r in (1, 2, 4, 8)]
    contrast = luminance[interior].std() + 1e-6
    bands = [np.abs(a - b)[interior].mean() / contrast for a, b in zip(blurs, blurs[1:])]
    gy, gx = np.gradient(luminance)
    jxx, jyy, jxy = _box_mean(gx * gx, 2), _box_mean(gy * gy, 2), _box_mean(gx * gy, 2)
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy + 1e-6)
    return bands + [coherence[interior].mean()]


def _segments(scenes):
    """Mean colour, texture features and category of the segments with an interior to measure."""
    colours, textures, labels = [], [], []
    for scene in scenes:
        for segment_id, category in zip(scene["segments"]["id"], scene["segments"]["category_id"]):
            mask = scene["panoptic"] == segment_id
            features = _texture_features(scene["image"], mask)
            if features is not None:
                colours.append(scene["image"][mask].mean(0))
                textures.append(features)
                labels.append(category)
    return np.array(colours), np.array(textures), np.array(labels)


def _mean_class_accuracy(predicted, labels, num_classes):
    return np.mean([np.mean(predicted[labels == c] == c) for c in range(num_classes) if (labels == c).any()])


def _knn(train_x, train_y, test_x, num_classes, k=5):
    scale = train_x.std(0)
    distances = (((test_x[:, None] - train_x[None]) / scale) ** 2).sum(-1)
    votes = train_y[np.argsort(distances, axis=1)[:, :k]]
    return np.array([np.bincount(v, minlength=num_classes).argmax() for v in votes])


def test_colour_alone_does_not_identify_the_class_but_texture_does():
    """Mean class accuracies measured on the default 128x128 scenes (100 train / 50 test scenes, 254
    test segments, 9 classes, chance 0.11): from colour alone 0.18 per pixel for the best per-pixel
    colour classifier (class-balanced Bayes on a 16^3 RGB histogram), 0.21 for the nearest mean colour
    per pixel and 0.21 for a 5-NN on segment mean colours; from texture alone (a colour-blind 5-NN on
    five band-pass energies and the orientation coherence of a segment) 0.94, every class >= 0.86."""
    config = SceneConfig()
    num_classes = config.num_classes
    train = [generate_scene(config, i) for i in range(100)]
    test = [generate_scene(config, 10_000 + i) for i in range(50)]

    def pixels(scenes):
        rgb = np.concatenate([s["image"].reshape(-1, 3) for s in scenes]).astype(np.int64)
        labels = np.concatenate([s["semantic"].ravel() for s in scenes])
        return rgb[labels != 255], labels[labels != 255]

    train_rgb, train_labels = pixels(train)
    test_rgb, test_labels = pixels(test)
    bins = (train_rgb // 16) @ [256, 16, 1], (test_rgb // 16) @ [256, 16, 1]
    counts = np.zeros((16 ** 3, num_classes))
    np.add.at(counts, (bins[0], train_labels), 1)
    bayes = (counts / counts.sum(0))[bins[1]].argmax(1)
    means = np.stack([train_rgb[train_labels == c].mean(0) for c in range(num_classes)])
    nearest = ((test_rgb[:, None] - means[None]) ** 2).sum(-1).argmin(1)

    train_colour, train_texture, train_y = _segments(train)
    test_colour, test_texture, test_y = _segments(test)
    by_colour = _knn(train_colour, train_y, test_colour, num_classes)
    by_texture = _knn(train_texture, train_y, test_texture, num_classes)

    accuracy = {"bayes colour": _mean_class_accuracy(bayes, test_labels, num_classes),
                "nearest colour": _mean_class_accuracy(nearest, test_labels, num_classes),
                "knn colour": _mean_class_accuracy(by_colour, test_y, num_classes),
                "knn texture": _mean_class_accuracy(by_texture, test_y, num_classes)}
    assert max(accuracy["bayes colour"], accuracy["nearest colour"], accuracy["knn colour"]) < 0.3, accuracy
    assert accuracy["knn texture"] > 0.8, accuracy


def test_colour_coded_scenes_make_colour_a_cue():
    """The WSSS scenes' colours (`configs.common.COLOUR_CODED`): a 5-NN on segment mean colours reaches a mean
    class accuracy of 0.87 (measured, 64 px, 150 / 60 scenes; 0.18 on the default scenes at 64 px)."""
    from configs.common import COLOUR_CODED

    config = SceneConfig(image_size=64, **COLOUR_CODED)
    train_colour, _, train_y = _segments([generate_scene(config, i) for i in range(150)])
    test_colour, _, test_y = _segments([generate_scene(config, 10_000 + i) for i in range(60)])
    by_colour = _knn(train_colour, train_y, test_colour, config.num_classes)
    assert _mean_class_accuracy(by_colour, test_y, config.num_classes) > 0.75


def test_silhouettes_differ():
    """Every pair of thing classes, at the same position, size and rotation, overlaps by IoU < 0.8;
    every silhouette fits the window that the generator computes it over."""
    y, x = np.mgrid[-1.2:1.2:241j, -1.2:1.2:241j]
    masks = [synthetic._shape_distance(shape, x, y) < 0 for shape in synthetic.THING_SHAPES]
    for mask in masks:
        assert mask.any() and not (mask & (np.hypot(x, y) > synthetic._EXTENT)).any()
    for i in range(len(masks)):
        for j in range(i):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.8, (synthetic.THING_SHAPES[i], synthetic.THING_SHAPES[j], iou)


# ---------------------------------------------------------------------------------------------------
# TFDS ArrayRecord: build, read back, CLI.

def test_tfds_build_and_read_back(tmp_path):
    import tensorflow_datasets as tfds

    from jaxseg.data.builders.scenes import VALIDATION_OFFSET, JaxsegScenes, scenes_config

    had_tensorflow = "tensorflow" in sys.modules
    config = scenes_config(image_size=64, num_train=16, num_val=8)
    assert config.name == "64px-16-8-seed0"
    # Non-default colours are part of the name, so a build of other colours is never read for them.
    coded = scenes_config(image_size=64, num_train=16, num_val=8, hue_spread=0.03, saturation_range=(0.5, 0.9))
    assert coded.name == "64px-16-8-seed0-hue0.03-sat0.5-0.9"
    assert coded.parameters()["scene"]["hue_spread"] == 0.03
    # Two worker processes: the examples must come out in order and equal to the generator's.
    JaxsegScenes(config=config, data_dir=tmp_path, num_workers=2).download_and_prepare(
        file_format="array_record")
    for split, first, count in [("train", 0, 16), ("validation", VALIDATION_OFFSET, 8)]:
        source = tfds.data_source(f"jaxseg_scenes/{config.name}", data_dir=tmp_path, split=split)
        assert len(source) == count
        for i in range(count):
            example = source[i]
            assert example["image_id"] == first + i
            expected = generate_scene(config.scene, first + i)
            example = dict(example, semantic=example["semantic"][..., 0],
                           segments={k: np.asarray(v) for k, v in example["segments"].items()})
            assert_scenes_equal(example, expected)
            for key in expected["segments"]:
                assert example["segments"][key].dtype == expected["segments"][key].dtype, key
    metadata = json.loads((tmp_path / "jaxseg_scenes" / config.name / "1.0.0" / "metadata.json").read_text())
    assert metadata["parameters"] == config.parameters()
    assert metadata["categories"] == categories(config.scene)
    assert had_tensorflow or "tensorflow" not in sys.modules


# Runs the CLI in a Python where every import of TensorFlow fails, even where it is installed. The
# finder answers for "tensorflow" with a loader that raises: probes such as find_spec still work, and
# nothing lands in sys.modules (TFDS takes any "tensorflow" key there for TensorFlow).
_WITHOUT_TENSORFLOW = """
import importlib.abc, importlib.machinery, runpy, sys
class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError("TensorFlow is blocked in this test")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, NoTensorFlow())
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def _cli(*args):
    code = _WITHOUT_TENSORFLOW.format(script=str(ROOT / "tools" / "make_dataset.py"))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=hang_guard(120), cwd=ROOT)


def test_make_dataset_cli(tmp_path):
    args = ["scenes", "--data_dir", str(tmp_path), "--image_size", "32", "--num_train", "6",
            "--num_val", "3", "--workers", "1"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "built in" in first.stdout and "train 6, validation 3" in first.stdout
    assert "MiB on disk" in first.stdout
    folder = tmp_path / "jaxseg_scenes" / "32px-6-3-seed0" / "1.0.0"
    files = {p.name: p.read_bytes() for p in folder.iterdir()}

    again = _cli(*args)
    assert again.returncode == 0 and "already built" in again.stdout, again.stderr[-3000:]

    # Same config name, other parameters: refused, nothing touched; --overwrite rebuilds it.
    other = ["scenes", "--data_dir", str(tmp_path), "--image_size", "32", "--num_train", "4",
             "--num_val", "3", "--workers", "1", "--name", "32px-6-3-seed0"]
    refused = _cli(*other)
    assert refused.returncode == 2 and "num_train: 6 there, 4 requested" in refused.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    rebuilt = _cli(*other, "--overwrite")
    assert rebuilt.returncode == 0 and "train 4, validation 3" in rebuilt.stdout, rebuilt.stderr[-3000:]

    bad = _cli("scenes", "--data_dir", str(tmp_path), "--image_size", "8")
    assert bad.returncode == 2 and "image_size must be an integer >= 16" in bad.stderr
