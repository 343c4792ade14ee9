"""CLIP-ES (Lin et al., "CLIP is Also an Efficient Segmenter", CVPR 2023): training-free CAMs from a frozen
CLIP, turned into WSSS pseudo-labels in WeakTr's layout (0 background, class c as c + 1, no ignore).

Per image, as linyq2117/CLIP-ES `generate_cams_{voc12,coco14}.py` does (read at `3893f81`):
  1. the image is resized (PIL bicubic, torchvision's `Resize`) up to the next multiple of the patch size on
     each side and CLIP-normalised; the position embedding is resampled bilinearly to that grid;
  2. text side: one prompt per class from a template ("a clean origami {}.") over synonym-expanded class
     names, plus a set of background words (sky, ground, ...); each text feature is the renormalised mean
     of its L2-normalised template features (a prompt ensemble when several templates are given);
  3. softmax-GradCAM: the image feature is the mean of the patch tokens after `ln_post`, projected; the
     scores are the softmax over [present classes, background words] of the scaled cosine similarities;
     for each present class, the gradient of its probability w.r.t. the last block's `ln_1` output, averaged
     over the patches, weighs that output's channels; ReLU, min-max normalisation (twice, as
     pytorch_grad_cam does per layer and after the layer mean);
  4. class-aware attention affinity (CAA): the head-mean attention of the last 8 blocks, patch rows and
     columns, averaged; Sinkhorn-normalised (column then row, three times), symmetrised and squared; its
     columns outside the boxes around the CAM's blobs are zeroed (the uint8 CAM above `box_threshold` x its
     maximum, the bounding box of each 8-connected blob, whose right and bottom edges stop one short of
     the map's last column and row, as `scoremap2bbox` clips them); refined = affinity . CAM, min-max
     normalised, upsampled bilinearly to the original size;
  5. pseudo-label: CLIP-ES puts the background score (1 - max_c CAM_c)^p in front of the present classes and
     takes the argmax; that is the constant background threshold t_p with t_p = (1 - t_p)^p
     (`power_background_threshold`: p = 1 -> 0.5, p = 2 -> 0.382), so the labels come from
     `jaxseg.wsss.cam.pseudo_label` and the CAM sweep (`CamSweepMetric`) like WeakTr's.
The gradient is taken in one jitted program by `jax.jacrev` over the present classes (padded to a power of
two), through a probe added to the patch tokens of the last `ln_1` output (`flax.linen.intercept_methods`).
Not reproduced: CLIP-ES runs the model in float16 (the resampled position embedding is cast to float16
even on CPU); here everything is float32. Its CRF post-processing (`eval_cam_with_crf.py`, confidence
< 0.95 -> 255) is not part of this module.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxseg.errors import MissingDependencyError, UserError
from jaxseg.models.clip import CLIP, l2_normalize, similarity_logits
from jaxseg.models.vit import ViT
from jaxseg.ops.image import normalize
from jaxseg.ops.resize import resize
from jaxseg.wsss.cam import pseudo_label, wsss_semantic

Array = jax.Array

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEMPLATES = ("a clean origami {}.",)

# CLIP-ES's class names (`clip_text.py` new_class_names*): VOC's and COCO's 80 things in their usual order,
# some widened with synonyms, which go into the template as they are.
VOC_CLASS_NAMES = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant", "sheep",
    "sofa", "train", "tvmonitor screen")
COCO_CLASS_NAMES = (
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird avian", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack,bag", "umbrella,parasol",
    "handbag,purse", "necktie", "suitcase", "frisbee", "skis", "sknowboard", "sports ball", "kite",
    "baseball bat", "glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "dessertspoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair seat", "sofa", "pottedplant", "bed", "diningtable", "toilet",
    "tvmonitor screen", "laptop", "mouse", "remote control", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hairdrier,blowdrier", "toothbrush")
# Background words: VOC's set has "keyboard" and "sign", which are COCO classes.
VOC_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea", "railway",
    "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street", "valley",
    "bridge", "sign")
COCO_BACKGROUND = tuple(w for w in VOC_BACKGROUND if w not in ("keyboard", "sign"))
# name -> (class names, background words, box threshold of the CAA mask).
DATASETS = {"voc": (VOC_CLASS_NAMES, VOC_BACKGROUND, 0.4), "coco": (COCO_CLASS_NAMES, COCO_BACKGROUND, 0.7)}
AFFINITY_LAYERS = 8
BACKGROUND_POWER = 1.0  # eval_cam_with_crf.py's, which made the released pseudo-masks


def power_background_threshold(power: float) -> float:
    """The constant background threshold equal to CLIP-ES's background score (1 - max CAM)^power: a class
    wins iff its CAM m > (1 - m)^power, i.e. m > t with t = (1 - t)^power (left side rising, right side
    falling in m)."""
    if not power > 0:
        raise UserError(f"the background power must be > 0, got {power}")
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if mid < (1 - mid) ** power else (low, mid)
    return (low + high) / 2


# ----------------------------------------------------------------------------------------------- text side

def prompt_texts(class_names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Class-major prompts: [t.format(name) for each name, for each template]."""
    if not templates or any("{}" not in t for t in templates):
        raise UserError(f"templates must be a non-empty list of strings with one '{{}}', got {list(templates)}")
    return [t.format(name) for name in class_names for t in templates]


def load_tokenizer(path: str | os.PathLike):
    """transformers' `CLIPTokenizer` from a local directory holding its `vocab.json` and `merges.txt` (e.g.
    a download of openai/clip-vit-base-patch16); nothing is fetched."""
    path = os.fspath(path)
    missing = [f for f in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise UserError(f"tokenizer directory {path!r} lacks {missing}: give a local CLIP tokenizer directory "
                        f"(vocab.json and merges.txt), or precomputed token ids")
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        raise MissingDependencyError("CLIP's tokenizer comes from transformers (pip install transformers); or "
                                     "give precomputed token ids") from None
    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str], context_length: int = 77) -> np.ndarray:
    """(len(texts), context_length) int32 ids: start token, text, end token (the largest id, which the text
    tower pools), padded; too long texts are cut, keeping the end token."""
    ids = tokenizer(list(texts), padding="max_length", max_length=context_length, truncation=True)["input_ids"]
    return np.asarray(ids, np.int32)


def text_features(model: CLIP, params: Any, token_ids: Array, num_templates: int = 1) -> Array:
    """(N * T, L) class-major prompt ids -> (N, E) unit features: each prompt's feature normalised, the
    T templates of a class averaged and normalised again (CLIP-ES's `zeroshot_classifier`)."""
    token_ids = jnp.asarray(token_ids)
    if token_ids.ndim != 2 or token_ids.shape[0] % num_templates:
        raise UserError(f"token ids must be (classes x {num_templates} templates, length), got shape "
                        f"{token_ids.shape}")
    # One compiled program: the text tower run op by op takes far longer.
    encode = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=CLIP.encode_text))
    features = l2_normalize(encode(params, token_ids))
    return l2_normalize(features.reshape(-1, num_templates, features.shape[-1]).mean(1))


# ---------------------------------------------------------------------------------------------- image side

def _scale(cams: Array) -> Array:
    """pytorch_grad_cam's `scale_cam_image` over the last two axes: x - min, divided by 1e-7 + its max."""
    shifted = cams - cams.min((-2, -1), keepdims=True)
    return shifted / (1e-7 + shifted.max((-2, -1), keepdims=True))


def grad_cams(model: CLIP, params: Any, images: Array, text: Array, present: Array,
              targets: Array) -> tuple[Array, list[Array]]:
    """Softmax-GradCAM of CLIP-ES at patch resolution.

    Args:
      images: (B, H, W, 3) CLIP-normalised, H and W multiples of the patch size.
      text: (C + K, E) unit text features, C classes then K background words.
      present: (B, C) multi-hot labels: the softmax runs over the present classes and the background words.
      targets: (B, T) class indices whose CAMs are computed.
    Returns:
      (CAMs (B, T, h, w) in [0, 1], each block's head-mean attention (B, N, N)).
    """
    visual = ViT(**model.vision)
    grid = visual.check_images(images)
    prefix = visual.num_prefix_tokens
    ln_1 = ("vision", f"blocks_{visual.depth - 1}", "norm1")
    num_classes = present.shape[1]
    allowed = jnp.concatenate([present > 0, jnp.ones((present.shape[0], text.shape[0] - num_classes), bool)], 1)

    def probabilities(probe):
        captured = []

        def add_probe(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and context.module.path == ln_1:
                captured.append(out)
                return out.at[:, prefix:].add(probe)
            return out

        with nn.intercept_methods(add_probe):
            features, out = model.apply({"params": params}, images, pool="patch_mean", return_attention=True,
                                        method=CLIP.encode_image)
        logits = similarity_logits(features, text, params["logit_scale"])
        probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
        # Images are independent: the sum over the batch leaves each image's gradient to its own probe.
        return jnp.take_along_axis(probs, targets, axis=1).sum(0), (captured[0], out["attn_probs"])

    probe = jnp.zeros((images.shape[0], 1, visual.width), jnp.float32)
    # d p / d probe = the gradient summed over the patch tokens; divided by their number, its mean.
    grads, (activations, attention) = jax.jacrev(probabilities, has_aux=True)(probe)
    weights = jnp.moveaxis(grads[:, :, 0], 0, 1) / (grid[0] * grid[1])  # (B, T, D)
    cams = nn.relu(jnp.einsum("btd,bpd->btp", weights, activations[:, prefix:]))
    cams = _scale(_scale(cams.reshape(*cams.shape[:2], *grid)))
    return cams, [probs.mean(1) for probs in attention]


def patch_affinity(attention: Sequence[Array], layers: int = AFFINITY_LAYERS, prefix: int = 1) -> Array:
    """The mean of the last `layers` blocks' head-mean attention between patches (of all blocks when there are
    fewer, as CLIP-ES's list slice takes them): (B, P, P)."""
    if layers < 1:
        raise UserError(f"affinity layers must be at least 1, got {layers}")
    return jnp.mean(jnp.stack([a[:, prefix:, prefix:] for a in attention[-layers:]]), axis=0)


def box_mask(cam: Array, threshold: float) -> Array:
    """(h, w) bool: the union of the bounding boxes of the 8-connected blobs of the uint8 CAM above
    floor(threshold x its maximum), each box's end row and column clipped to h - 1 and w - 1 (exclusive), as
    CLIP-ES's `scoremap2bbox` (OpenCV contours) cuts them. `cam` in [0, 1]."""
    rows, cols = cam.shape
    quantized = jnp.floor(cam * 255).astype(jnp.int32)
    # floor(threshold * m) for every uint8 maximum m, in float64 on the host as Python's int() takes it.
    cutoffs = jnp.asarray([int(threshold * m) for m in range(256)], jnp.int32)
    blob = quantized > cutoffs[quantized.max()]
    # Connected components by min-label propagation over the 8-neighbourhood.
    none = rows * cols
    labels0 = jnp.where(blob, jnp.arange(none).reshape(rows, cols), none)

    def spread(labels):
        padded = jnp.pad(labels, 1, constant_values=none)
        neighbours = [padded[1 + dy:1 + dy + rows, 1 + dx:1 + dx + cols] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        return jnp.where(blob, jnp.min(jnp.stack(neighbours), 0), none)

    def not_done(state):
        previous, labels = state
        return jnp.any(previous != labels)

    _, labels = jax.lax.while_loop(not_done, lambda s: (s[1], spread(s[1])), (labels0, spread(labels0)))
    flat = labels.reshape(-1)
    row, col = jnp.divmod(jnp.arange(none), cols)
    top = jax.ops.segment_min(row, flat, none + 1)[:none]
    left = jax.ops.segment_min(col, flat, none + 1)[:none]
    bottom = jnp.minimum(jax.ops.segment_max(row, flat, none + 1)[:none] + 1, rows - 1)
    right = jnp.minimum(jax.ops.segment_max(col, flat, none + 1)[:none] + 1, cols - 1)
    # A component exists where its label (its first pixel) labels itself; boxes add up through a
    # two-dimensional difference array.
    exists = (flat == jnp.arange(none)).astype(jnp.int32)
    top, left = jnp.where(exists > 0, top, 0), jnp.where(exists > 0, left, 0)
    bottom, right = jnp.where(exists > 0, bottom, 0), jnp.where(exists > 0, right, 0)
    corners = jnp.zeros((rows + 1, cols + 1), jnp.int32)
    corners = corners.at[top, left].add(exists).at[top, right].add(-exists)
    corners = corners.at[bottom, left].add(-exists).at[bottom, right].add(exists)
    return jnp.cumsum(jnp.cumsum(corners, 0), 1)[:rows, :cols] > 0


def caa_refine(cams: Array, affinity: Array, box_threshold: float) -> Array:
    """Class-aware attention affinity: (B, T, h, w) CAMs in [0, 1] and (B, P, P) patch affinity -> refined
    CAMs (B, T, h, w), each min-max normalised."""
    batch, targets, rows, cols = cams.shape
    transition = affinity / affinity.sum(-2, keepdims=True)
    transition = transition / transition.sum(-1, keepdims=True)
    for _ in range(2):
        transition = transition / transition.sum(-2, keepdims=True)
        transition = transition / transition.sum(-1, keepdims=True)
    transition = (transition + jnp.swapaxes(transition, -1, -2)) / 2
    transition = transition @ transition
    masks = jax.vmap(jax.vmap(lambda cam: box_mask(cam, box_threshold)))(cams)
    # Zeroing the affinity's columns outside the boxes = zeroing the CAM there before the product.
    masked = (cams * masks).reshape(batch, targets, rows * cols)
    refined = jnp.einsum("bij,btj->bti", transition, masked).reshape(cams.shape)
    return _scale(refined)


def present_targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(targets, valid): the present class indices, padded to a power of two (at most C) by repeating the
    first, so that images with similar label counts share one compiled program."""
    labels = np.asarray(labels)
    present = np.flatnonzero(labels > 0)
    size = min(len(labels), 1 << max(len(present) - 1, 0).bit_length())
    targets = np.full(size, present[0] if len(present) else 0, np.int32)
    targets[:len(present)] = present
    return targets, np.arange(size) < len(present)


def image_cams(model: CLIP, params: Any, images: Array, text: Array, present: Array, targets: Array,
               valid: Array, size: tuple[int, int], *, box_threshold: float,
               affinity_layers: int = AFFINITY_LAYERS) -> Array:
    """Steps 3-4 for a batch: refined CAMs (B, C, H, W) at the original `size`, 0 for absent classes.
    `images` are CLIP-normalised at the patch-multiple size; `targets`/`valid` from `present_targets`."""
    cams, attention = grad_cams(model, params, images, text, present, targets)
    refined = caa_refine(cams, patch_affinity(attention, affinity_layers), box_threshold)
    refined = resize(refined, size, method="bilinear", axes=(-2, -1))
    scatter = jax.nn.one_hot(targets, present.shape[1], dtype=refined.dtype) * valid[..., None]
    return jnp.einsum("btc,bthw->bchw", scatter, refined)


class ClipEsPredictor:
    """CLIP-ES pseudo-labels through the evaluator (`jaxseg.evaluate.Evaluator`), like WeakTr's
    `CamPredictor`: "cams" (C, H, W), "present" and the "semantic" label map at the background `threshold`.

    `text` holds the C class features then the background words' (`text_features`); the labels are the
    example's image-level "labels" (cut to C). The prepared example carries an empty (H, W, 0) array: the
    original size as a shape, so the evaluator batches images of one original size and the program sees
    it statically.
    """
    fixed_shape = False

    def __init__(self, model: CLIP, text: np.ndarray, num_classes: int, label_space: str, *,
                 box_threshold: float, threshold: float = power_background_threshold(BACKGROUND_POWER),
                 affinity_layers: int = AFFINITY_LAYERS):
        text = np.asarray(text, np.float32)
        if text.ndim != 2 or text.shape[0] <= num_classes:
            raise UserError(f"text features must be ({num_classes} classes + background words, embed), got "
                            f"shape {text.shape}")
        for name, value in (("threshold", threshold), ("box_threshold", box_threshold)):
            if not 0 <= value <= 1:
                raise UserError(f"the CLIP-ES {name} must lie in [0, 1], got {value}")
        self.model, self.text, self.num_classes, self.label_space = model, text, num_classes, label_space
        self.box_threshold, self.threshold, self.affinity_layers = box_threshold, threshold, affinity_layers
        self.patch = ViT(**model.vision).patch_size

    def canvas(self, example: dict) -> tuple[int, int]:
        return tuple(np.asarray(example["image"]).shape[:2])

    def prepare(self, example: dict) -> dict[str, np.ndarray]:
        image = np.asarray(example["image"])
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"CLIP-ES takes uint8 RGB images (H, W, 3), got {image.dtype} {image.shape}")
        if "labels" not in example:
            raise UserError("CLIP-ES takes the images' labels, and this example has none")
        height, width = image.shape[:2]
        size = (math.ceil(height / self.patch) * self.patch, math.ceil(width / self.patch) * self.patch)
        resized = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BICUBIC))
        labels = np.asarray(example["labels"][:self.num_classes], np.float32)
        targets, valid = present_targets(labels)
        return {"image": resized, "labels": labels, "targets": targets, "valid": valid,
                "size": np.zeros((height, width, 0), np.uint8)}

    def targets(self, example: dict) -> dict:
        return {"semantic": wsss_semantic(example, self.num_classes, self.label_space),
                "labels": np.asarray(example["labels"][:self.num_classes], np.float32)}

    def predict(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images = normalize(batch["image"].astype(jnp.float32) / 255, CLIP_MEAN, CLIP_STD)
        cams = image_cams(self.model, params, images, jnp.asarray(self.text), batch["labels"], batch["targets"],
                          batch["valid"], batch["size"].shape[1:3], box_threshold=self.box_threshold,
                          affinity_layers=self.affinity_layers)
        semantic = jax.vmap(lambda c, p: pseudo_label(c, p, self.threshold))(cams, batch["labels"])
        return {"cams": cams, "present": batch["labels"], "semantic": semantic}

    def finish(self, outputs: dict, example: dict) -> dict:
        return {"semantic": outputs["semantic"], "cams": outputs["cams"],
                "cam_classes": np.flatnonzero(outputs["present"])}
