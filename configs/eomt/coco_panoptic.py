"""EoMT on COCO panoptic 2017 (133 categories, 80 things), the published DINOv2 recipe: 640 crop, 200
queries, scale jitter 0.1-2.0, no colour jitter, 12 epochs (24 for S/B), batch 16, AdamW 1e-4 with
LLRD 0.8, two-stage warm-up (500, 1000) + poly, clipping 0.01. Evaluation: PQ (and mIoU).

    python tools/make_dataset.py coco_panoptic --manual_dir COCO --data_dir DATA
    python tools/convert_weights.py --input vit_large_patch14_reg4_dinov2.pth \
        --output dinov2_l16_grid40.msgpack --patch-size 16 --posemb-grid 40
    python tools/train.py --config configs/eomt/coco_panoptic.py:L --workdir RUN \
        --set data.data_dir=DATA --set train.init_checkpoint=dinov2_l16_grid40.msgpack

Argument: "S" | "B" | "L" (default) | "g", optionally ",runlocal" (tiny model and crops, a few steps
on a CPU over a small prepared dataset).
"""
import ml_collections

from configs.common import eomt_recipe, manual_data


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return eomt_recipe(arg, data=manual_data("jaxseg_coco_panoptic", "train"), eval_split="validation",
                       segmentation="panoptic", num_classes=133, num_things=80, crop=640, queries=200,
                       epochs=12, epochs_small=24, train_images=118_287, scale_range=(0.1, 2.0),
                       color_jitter=False, canvas=(640, 640))
