"""EoMT semantic segmentation on Cityscapes (19 train ids), the published DINOv2 recipe: 1024 crop, 100
queries, scale jitter 0.5-2.0, colour jitter on, 107 epochs (~20k steps), batch 16, AdamW 1e-4 with
LLRD 0.8, two-stage warm-up (500, 1000) + poly, clipping 0.01. Evaluation: mIoU, sliding windows
(two 1024 windows per 1024 x 2048 image).

    python tools/make_dataset.py cityscapes --manual_dir CITYSCAPES --data_dir DATA
    python tools/convert_weights.py --input vit_large_patch14_reg4_dinov2.pth \
        --output dinov2_l16_grid64.msgpack --patch-size 16 --posemb-grid 64
    python tools/train.py --config configs/eomt/cityscapes_semantic.py:L --workdir RUN \
        --set data.data_dir=DATA --set train.init_checkpoint=dinov2_l16_grid64.msgpack

Argument: "S" | "B" | "L" (default) | "g", optionally ",runlocal".
"""
import ml_collections

from configs.common import eomt_recipe, manual_data


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return eomt_recipe(arg, data=manual_data("jaxseg_cityscapes", "train"), eval_split="validation",
                       segmentation="semantic", num_classes=19, num_things=0, crop=1024, queries=100,
                       epochs=107, train_images=2975, scale_range=(0.5, 2.0), color_jitter=True,
                       canvas=(2048, 2048), max_windows=2)
