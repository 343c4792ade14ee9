"""The overlays `PredictionWriter` writes for people (enlarged, with a legend) beside the raw files it writes
for programs (native size), and the class names a dataset config gives them."""
import json

import numpy as np
import pytest
from PIL import Image

from jaxseg.data.datasets import DataConfig
from jaxseg.data.synthetic import SceneConfig, categories
from jaxseg.visualize import (
    LEGEND_BACKGROUND,
    PredictionWriter,
    annotated,
    legend_height,
    panoptic_legend,
    segment_colors,
    semantic_legend,
    swatch_box,
    voc_palette,
)

PALETTE = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
HEIGHT, WIDTH = 40, 32  # short side 32: enlarged 8 times to 256
NAMES = ["background", "aeroplane", "bicycle", "bird"]


def _semantic() -> np.ndarray:
    """Classes 0 | 3 left | right, a band of 255 (ignored) and a patch of class 7 (beyond NAMES)."""
    semantic = np.zeros((HEIGHT, WIDTH), np.int32)
    semantic[:, WIDTH // 2:] = 3
    semantic[30:34] = 255
    semantic[36:, :4] = 7
    return semantic


def _write(tmp_path, prediction: dict, class_names=None) -> dict:
    example = {"image": np.zeros((HEIGHT, WIDTH, 3), np.uint8), "image_id": b"im"}
    PredictionWriter(tmp_path, class_names=class_names)(0, example, prediction)
    return {p.name: np.asarray(Image.open(p)) for p in tmp_path.glob("*.png")}


def _swatch(strip: np.ndarray, index: int) -> np.ndarray:
    left, top, right, bottom = swatch_box(index, strip.shape[1])
    return strip[top:bottom, left:right]


def test_overlay_is_enlarged_with_thin_borders_and_the_raw_png_is_not(tmp_path):
    semantic = _semantic()
    files = _write(tmp_path, {"semantic": semantic}, NAMES)
    out = files["im_overlay.png"]
    assert out.shape == (320 + legend_height(3, 256), 256, 3) and min(out.shape[:2]) >= 256
    picture = out[:320]
    # Black image, alpha 0.5: half the palette colour; the 0 | 3 border is the one column before the change.
    assert (picture[:200, 100] == PALETTE[0] // 2).all() and (picture[:200, 200] == PALETTE[3] // 2).all()
    assert (picture[:200, 127] == 255).all()
    assert not (picture[:200, 126] == 255).all(axis=-1).any() and not (picture[:200, 128] == 255).all(axis=-1).any()
    np.testing.assert_array_equal(files["im_semantic.png"], semantic)


def test_legend_lists_the_present_classes_in_their_palette_colours(tmp_path):
    semantic = _semantic()
    entries = semantic_legend(semantic, NAMES)
    assert [text for _, text in entries] == ["background", "bird", "class 7"]
    out = _write(tmp_path, {"semantic": semantic}, NAMES)["im_overlay.png"]
    strip = out[320:]
    for index, label in enumerate((0, 3, 7)):
        assert (_swatch(strip, index) == PALETTE[label]).all()
    assert (_swatch(strip, 3) == LEGEND_BACKGROUND).all()  # nothing for the ignored 255
    # The names are what `annotated` draws for these entries.
    np.testing.assert_array_equal(strip, annotated(np.zeros((1, 256, 3), np.uint8), entries)[1:])


def test_without_names_classes_are_numbered():
    semantic = _semantic()
    assert [text for _, text in semantic_legend(semantic)] == ["class 0", "class 3", "class 7"]
    assert [text for _, text in semantic_legend(semantic, NAMES[:2])] == ["background", "class 3", "class 7"]
    named = annotated(np.zeros((1, 256, 3), np.uint8), semantic_legend(semantic, NAMES))
    numbered = annotated(np.zeros((1, 256, 3), np.uint8), semantic_legend(semantic))
    left, top, right, bottom = swatch_box(1, 256)
    text = (slice(top, bottom), slice(right, right + 60))
    assert (named[1:][text] != LEGEND_BACKGROUND).any() and (named[1:][text] != numbered[1:][text]).any()


def test_panoptic_legend_lists_present_categories(tmp_path):
    panoptic = np.zeros((HEIGHT, WIDTH), np.int32)
    panoptic[:, :10], panoptic[:, 10:20], panoptic[:, 20:] = 1, 2, 3
    segments = [{"id": 1, "category_id": 2, "is_thing": True, "score": 0.9},
                {"id": 2, "category_id": 2, "is_thing": True, "score": 0.8},
                {"id": 3, "category_id": 7, "is_thing": False, "score": 0.7},
                {"id": 4, "category_id": 5, "is_thing": False, "score": 0.6}]  # not in the map
    prediction = {"semantic": np.zeros((HEIGHT, WIDTH), np.int32), "panoptic": panoptic, "segments": segments}
    files = _write(tmp_path, prediction, NAMES)
    assert [text for _, text in panoptic_legend(panoptic, segments, NAMES)] == ["bicycle", "class 7"]
    out = files["im_panoptic_overlay.png"]
    assert out.shape == (320 + legend_height(2, 256), 256, 3)
    strip, colors = out[320:], segment_colors(segments)
    thing = _swatch(strip, 0)  # the category's two segments, side by side
    assert (thing[:, 0] == np.round(colors[1])).all() and (thing[:, -1] == np.round(colors[2])).all()
    assert (_swatch(strip, 1) == PALETTE[7]).all()
    assert (_swatch(strip, 2) == LEGEND_BACKGROUND).all()
    np.testing.assert_array_equal(files["im_panoptic.png"][..., 0], panoptic)  # ids < 256: R alone
    assert len(json.loads((tmp_path / "im_segments.json").read_text())) == 4


def test_cam_overlays_are_enlarged_and_titled_with_the_wsss_name(tmp_path):
    cams = np.zeros((3, HEIGHT, WIDTH), np.float32)
    cams[2] = np.linspace(0, 1, WIDTH)
    prediction = {"semantic": np.zeros((HEIGHT, WIDTH), np.int32), "cams": cams, "cam_classes": np.array([0, 2])}
    out = _write(tmp_path, prediction, NAMES)
    blank = np.zeros((1, 256, 3), np.uint8)
    for c, title in ((0, "class aeroplane"), (2, "class bird")):  # CAM class c is wsss label c + 1
        cam = out[f"im_cam_{c}.png"]
        assert cam.shape == (320 + legend_height(1, 256), 256, 3)
        np.testing.assert_array_equal(cam[320:], annotated(blank, [((), title)])[1:])
    ramp = out["im_cam_2.png"][100, :256, 0].astype(int)  # red rises with the CAM, smoothly once enlarged
    assert ramp[-1] > ramp[0] and np.abs(np.diff(ramp)).max() <= 8
    unnamed = _write(tmp_path / "unnamed", prediction)["im_cam_2.png"]
    np.testing.assert_array_equal(unnamed[320:], annotated(blank, [((), "class 2")])[1:])


def test_large_images_are_not_resized(tmp_path):
    example = {"image": np.zeros((300, 260, 3), np.uint8), "image_id": 5}
    PredictionWriter(tmp_path)(0, example, {"semantic": np.ones((300, 260), np.int32)})
    assert Image.open(tmp_path / "5_overlay.png").size == (260, 300 + legend_height(1, 260))


def test_data_config_class_names():
    assert DataConfig(name="jaxseg_scenes").class_names() == [c["name"] for c in categories(SceneConfig())]
    assert DataConfig(name="jaxseg_scenes").class_names("wsss")[1:] == DataConfig(name="jaxseg_scenes").class_names()
    voc = DataConfig(name="jaxseg_voc", ground_truth="wsss").class_names()
    assert len(voc) == 21 and voc[0] == "background" and voc[1] == "aeroplane" and voc[20] == "tvmonitor"
    assert DataConfig(name="jaxseg_voc").class_names("categories") == voc[1:]
    assert len(DataConfig(name="jaxseg_cityscapes").class_names()) == 19
    assert DataConfig(name="jaxseg_ade20k").class_names() is None
    with pytest.raises(ValueError, match="label space"):
        DataConfig(name="jaxseg_voc").class_names("voc")
