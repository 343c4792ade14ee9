"""CLIP-ES (`jaxseg.wsss.clip_es`) against the PyTorch reference written from the official code
(`jaxseg/testing/references/clip_es.py`): random tiny CLIP, CPU float32. The text features, the
softmax-GradCAMs, the attention affinity and the CAA-refined CAMs agree within 1e-5 relative; the box masks
and the pseudo-labels exactly. Also the predictor through the evaluator and the pseudo-label writer, the
background power rule as a threshold, the target padding and the offline tokenizer."""
import json
import string

import jax
import numpy as np
import pytest
import torch
from test_tools import NUM_THINGS, scenes  # noqa: F401  (the tiny scenes build, a fixture)

from jaxseg.convert import from_clip
from jaxseg.errors import UserError
from jaxseg.evaluate import Evaluator
from jaxseg.metrics.accumulators import CamSweepMetric
from jaxseg.models.clip import CLIP
from jaxseg.ops.resize import resize
from jaxseg.testing.references import clip_es as reference
from jaxseg.testing.references.timm_vit import rel_err
from jaxseg.visualize import label_png
from jaxseg.wsss import clip_es
from jaxseg.wsss.cam import pseudo_label

TOL = 1e-5
NUM_CLASSES, NUM_BACKGROUND, NUM_TEMPLATES = 5, 5, 2
BOX_THRESHOLD = 0.4


def _token_ids(count, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 39, (count, 12))
    for row, end in enumerate(rng.integers(3, 12, count)):
        ids[row, end], ids[row, end + 1:] = 39, 0
    return ids.astype(np.int32)


@pytest.fixture(scope="module")
def setup():
    torch_model = reference.random_clip(seed=3)
    config, params = from_clip(torch_model.state_dict(), vision_num_heads=4, text_num_heads=2)
    model = CLIP(**config)
    # A prompt ensemble of two templates for the classes and the background words alike (one shape, one
    # compilation).
    fg_ids, bg_ids = _token_ids(NUM_CLASSES * NUM_TEMPLATES, 5), _token_ids(NUM_BACKGROUND * NUM_TEMPLATES, 6)
    fg = reference.zeroshot_classifier(torch_model, torch.from_numpy(fg_ids).long(), NUM_TEMPLATES)
    bg = reference.zeroshot_classifier(torch_model, torch.from_numpy(bg_ids).long(), NUM_TEMPLATES)
    text = np.concatenate([clip_es.text_features(model, params, ids, NUM_TEMPLATES) for ids in (fg_ids, bg_ids)])
    return dict(torch_model=torch_model, model=model, params=params, fg=fg, bg=bg, text=text)


def _image(size, seed):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3)).astype(np.uint8)


def _reference(setup, image, label_ids):
    normalized = reference.preprocess(image, 8)
    return normalized, reference.clip_es_cams(setup["torch_model"], normalized, setup["fg"], setup["bg"],
                                              label_ids, image.shape[:2], BOX_THRESHOLD)


def test_text_features_match_reference(setup):
    expected = np.concatenate([setup["fg"].numpy(), setup["bg"].numpy()])
    error = rel_err(setup["text"], expected)
    print(f"text features: {error:.1e}")
    assert error <= TOL


def test_cams_and_refinement_match_reference(setup):
    """A 37 x 45 image (resized to 40 x 48, a 5 x 6 grid) with classes 0, 2 and 4 (padded to 4 targets):
    GradCAMs, affinity and refined CAMs at the original size (`image_cams` composes these steps; the
    predictor test runs it)."""
    image, label_ids = _image((37, 45), 7), [0, 2, 4]
    normalized, expected = _reference(setup, image, label_ids)
    labels = np.zeros(NUM_CLASSES, np.float32)
    labels[label_ids] = 1
    targets, _ = clip_es.present_targets(labels)
    assert targets.tolist() == [0, 2, 4, 0]
    model = setup["model"]

    @jax.jit
    def run(params, images, text):
        cams, attention = clip_es.grad_cams(model, params, images, text, labels[None], targets[None])
        affinity = clip_es.patch_affinity(attention)
        refined = clip_es.caa_refine(cams, affinity, BOX_THRESHOLD)
        return cams, affinity, resize(refined, image.shape[:2], method="bilinear", axes=(-2, -1))

    cams, affinity, refined = run(setup["params"], normalized[None], setup["text"])
    errors = {"grad_cam": rel_err(cams[0, :len(label_ids)], expected["cams"]),
              "affinity": rel_err(affinity[0], expected["affinity"]),
              "refined": rel_err(refined[0, :len(label_ids)], expected["refined"])}
    print(errors)
    assert max(errors.values()) <= TOL, errors
    assert all(np.ptp(c) > 0.5 for c in expected["refined"])  # no degenerate (all-zero) map


def test_box_mask_matches_scoremap2bbox():
    """Random maps of blobs (several per map, touching the borders, diagonal neighbours), an all-zero map
    and a constant one, against CLIP-ES's boxes (clipped one short of the last row and column)."""
    rng = np.random.default_rng(0)
    maps = np.concatenate([rng.random((20, 9, 11)) ** 3, np.zeros((1, 9, 11)), np.full((1, 9, 11), 0.5)])
    maps = maps.astype(np.float32)
    for threshold in (0.4, 0.7):
        masks = jax.jit(jax.vmap(lambda cam, t=threshold: clip_es.box_mask(cam, t)))(maps)
        for cam, mask in zip(maps, masks):
            boxes, count = reference.scoremap2bbox(cam, threshold)
            expected = np.zeros(cam.shape, bool)
            for x0, y0, x1, y1 in boxes[:count]:
                expected[y0:y1, x0:x1] = True
            np.testing.assert_array_equal(mask, expected)


def test_background_power_is_a_threshold():
    """argmax over [(1 - max CAM)^p, present CAMs] (CLIP-ES's eval) = `pseudo_label` at the threshold t_p."""
    assert clip_es.power_background_threshold(1) == pytest.approx(0.5)
    assert clip_es.power_background_threshold(2) == pytest.approx((3 - 5 ** 0.5) / 2)
    rng = np.random.default_rng(1)
    cams = rng.random((4, 30, 40)).astype(np.float32)
    labels = np.asarray([1, 0, 1, 1], np.float32)
    cams[labels == 0] = 0
    for power in (1, 2, 3.5):
        keys = np.flatnonzero(labels)
        present = cams[keys]
        scores = np.concatenate([(1 - present.max(0, keepdims=True)) ** power, present])
        expected = np.concatenate([[0], keys + 1])[scores.argmax(0)]
        actual = pseudo_label(cams, labels, clip_es.power_background_threshold(power))
        np.testing.assert_array_equal(actual, expected)
    with pytest.raises(UserError, match="power"):
        clip_es.power_background_threshold(0)


def test_present_targets_pad_to_a_power_of_two():
    targets, valid = clip_es.present_targets(np.asarray([0, 1, 0, 1, 1, 0, 0], np.float32))
    assert targets.tolist() == [1, 3, 4, 1] and valid.tolist() == [True, True, True, False]
    targets, valid = clip_es.present_targets(np.zeros(3, np.float32))
    assert targets.tolist() == [0] and valid.tolist() == [False]
    assert len(clip_es.present_targets(np.ones(5, np.float32))[0]) == 5  # capped at C


def test_predictor_through_the_evaluator_writes_reference_labels(setup, tmp_path):
    """Two images (one batch) through `Evaluator` with the CAM sweep: the CAMs and the label PNGs (WeakTr's
    layout, `label_png`) equal the reference's CAMs and CLIP-ES's argmax with the background (1 - max)^1."""
    images = [_image((37, 45), 7), _image((37, 45), 9)]
    label_sets = [[1, 3], [2, 4]]
    source = []
    for image, label_ids in zip(images, label_sets):
        labels = np.zeros(NUM_CLASSES, np.int64)
        labels[label_ids] = 1
        semantic = np.random.default_rng(0).integers(0, NUM_CLASSES + 1, (*image.shape[:2], 1))
        source.append({"image": image, "labels": labels, "semantic": semantic})
    predictor = clip_es.ClipEsPredictor(setup["model"], setup["text"], NUM_CLASSES, "wsss",
                                        box_threshold=BOX_THRESHOLD)
    written = {}

    def write(index, example, prediction):
        label_png(np.asarray(prediction["semantic"])).save(tmp_path / f"{index}.png")
        written[index] = prediction

    results = Evaluator(predictor, lambda: {"cam_sweep": CamSweepMetric(NUM_CLASSES, (0.3, 0.5))},
                        batch_size=2).run(setup["params"], source, on_prediction=write)
    assert results["examples"] == 2 and len(results["cam_miou_curve"]) == 2
    from PIL import Image

    for index, (image, label_ids) in enumerate(zip(images, label_sets)):
        _, expected = _reference(setup, image, label_ids)
        prediction = written[index]
        assert rel_err(prediction["cams"][label_ids], expected["refined"]) <= TOL
        np.testing.assert_array_equal(np.delete(prediction["cams"], label_ids, axis=0), 0)  # absent classes
        assert prediction["cam_classes"].tolist() == label_ids
        scores = np.concatenate([1 - expected["refined"].max(0, keepdims=True), expected["refined"]])
        labels = np.concatenate([[0], np.asarray(label_ids) + 1])[scores.argmax(0)]
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{index}.png")), labels)


def test_prepare(setup):
    """The resized image (PIL bicubic, as torchvision's Resize) and the original size as a shape: images that
    resize alike but differ in size are not batched together. Bad examples are UserErrors."""
    predictor = clip_es.ClipEsPredictor(setup["model"], setup["text"], NUM_CLASSES, "wsss",
                                        box_threshold=BOX_THRESHOLD)
    labels = np.asarray([0, 1, 0, 0, 1])
    first = predictor.prepare({"image": _image((37, 45), 7), "labels": labels})
    second = predictor.prepare({"image": _image((33, 41), 7), "labels": labels})
    assert first["image"].shape == second["image"].shape == (40, 48, 3)
    assert (first["size"].shape, second["size"].shape) == ((37, 45, 0), (33, 41, 0))
    expected = reference.preprocess(_image((37, 45), 7), 8)
    normalized = (first["image"] / np.float32(255) - np.asarray(clip_es.CLIP_MEAN, np.float32)) / np.asarray(
        clip_es.CLIP_STD, np.float32)
    np.testing.assert_allclose(normalized, expected, atol=1e-5)
    with pytest.raises(UserError, match="labels"):
        predictor.prepare({"image": _image((16, 16), 0)})
    with pytest.raises(UserError, match="uint8"):
        predictor.prepare({"image": np.zeros((16, 16, 3), np.float32), "labels": np.ones(NUM_CLASSES)})
    with pytest.raises(UserError, match="text features"):
        clip_es.ClipEsPredictor(setup["model"], setup["text"][:NUM_CLASSES], NUM_CLASSES, "wsss", box_threshold=0.4)


def test_tokenizer_from_a_local_directory(tmp_path):
    """A tiny BPE vocabulary in transformers' CLIPTokenizer files: start token, text, end token (the largest
    id, which the text tower pools) and end-token padding; a directory without the files is a UserError."""
    chars = list(string.ascii_lowercase + ".,")
    merges = ["c l", "cl e", "cle a", "clea n</w>", "o r", "a t</w>"]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = clip_es.load_tokenizer(tmp_path)
    texts = clip_es.prompt_texts(["cat", "person with clothes,people,human"], ("a clean origami {}.", "a {}."))
    assert texts[:2] == ["a clean origami cat.", "a cat."]
    ids = clip_es.tokenize(tokenizer, texts, context_length=16)
    assert ids.shape == (4, 16) and ids.dtype == np.int32
    start, end = len(vocab) - 2, len(vocab) - 1
    assert (ids[:, 0] == start).all() and (ids.max(1) == end).all()
    assert tokenizer.convert_ids_to_tokens(ids[0, 1:3].tolist()) == ["a</w>", "clean</w>"]
    assert ids[2, -1] == end  # cut to 16, the end token kept
    with pytest.raises(UserError, match="vocab.json"):
        clip_es.load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="templates"):
        clip_es.prompt_texts(["cat"], ("no placeholder",))


def test_clip_es_tool_end_to_end(scenes, tmp_path):  # noqa: F811  (the imported fixture)
    """`jaxseg-clip-es` on a tiny scenes build (its first image: one compilation): a converted CLIP file, class
    names, background words and precomputed token ids -> a palette PNG per image (named as
    jaxseg-pseudo-labels names them) and the sweep report; a non-empty output directory, and class names
    without background words, are refused."""
    from PIL import Image

    from jaxseg.cli import clip_es as tool
    from jaxseg.convert.params_io import save_params

    # One block per tower: the tool's programs compile in half the time.
    torch_model = reference.random_clip(seed=3, vision_layers=1, transformer_layers=1)
    config, params = from_clip(torch_model.state_dict(), vision_num_heads=4, text_num_heads=2)
    save_params(tmp_path / "clip.msgpack", config, params)
    (tmp_path / "classes.txt").write_text("\n".join(f"thing {i}" for i in range(NUM_THINGS)))
    (tmp_path / "background.txt").write_text("sky\nground\n")
    np.savez(tmp_path / "ids.npz", classes=_token_ids(NUM_THINGS, 1), background=_token_ids(2, 2))
    data_dir, dataset = scenes
    common = ["--clip", str(tmp_path / "clip.msgpack"), "--token_ids", str(tmp_path / "ids.npz"), "--classes",
              str(tmp_path / "classes.txt"), "--box_threshold", "0.4", "--data_dir", str(data_dir), "--dataset",
              dataset, "--sweep", "0.3", "0.5", "--limit", "1"]
    args = [*common, "--background", str(tmp_path / "background.txt"), "--out_dir", str(tmp_path / "out")]
    assert tool.main(args) == 0
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).mode == "P" and Image.open(pngs[0]).size == (32, 32)
    assert np.asarray(Image.open(pngs[0])).max() <= NUM_THINGS
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["thresholds"] == [0.3, 0.5] and report["threshold"] == pytest.approx(0.5)
    assert tool.main(args) == 2  # not empty
    assert tool.main([*common, "--out_dir", str(tmp_path / "other")]) == 2  # no background words
    assert not (tmp_path / "other").exists()
