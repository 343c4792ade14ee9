"""EoMT instance segmentation on COCO 2017 (80 thing classes), the published DINOv2 recipe: 640 crop,
200 queries, scale jitter 0.1-2.0, no colour jitter, 12 epochs, batch 16, AdamW 1e-4 with LLRD 0.8,
two-stage warm-up (500, 1000) + poly, clipping 0.01. Evaluation: COCO mask AP.

The instances are the thing segments of COCO panoptic 2017 (`jaxseg_coco_panoptic`): the same images
and classes as the instances json, but non-overlapping masks (the official recipe reads the
overlapping instance annotations; AP on these is close but not the same number).

    python tools/convert_weights.py --input vit_large_patch14_reg4_dinov2.pth \
        --output dinov2_l16_grid40.msgpack --patch-size 16 --posemb-grid 40
    python tools/train.py --config configs/eomt/coco_instance.py:L --workdir RUN \
        --set data.data_dir=DATA --set train.init_checkpoint=dinov2_l16_grid40.msgpack

Argument: "S" | "B" | "L" (default) | "g", optionally ",runlocal".
"""
import ml_collections

from configs.common import eomt_recipe, manual_data


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return eomt_recipe(arg, data=manual_data("jaxseg_coco_panoptic", "train"), eval_split="validation",
                       segmentation="instance", num_classes=80, num_things=80, crop=640, queries=200,
                       epochs=12, train_images=118_287, scale_range=(0.1, 2.0), color_jitter=False,
                       canvas=(640, 640))
