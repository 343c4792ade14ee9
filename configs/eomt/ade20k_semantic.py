"""EoMT semantic segmentation on ADE20K (150 classes), the published DINOv2 recipe: 512 crop, 100
queries, scale jitter 0.5-2.0, colour jitter on, 31 epochs (~39k steps), batch 16, AdamW 1e-4 with
LLRD 0.8, two-stage warm-up (500, 1000) + poly, clipping 0.01. Evaluation: mIoU, sliding windows.

    python tools/make_dataset.py ade20k --manual_dir ADE --data_dir DATA
    python tools/convert_weights.py --input vit_large_patch14_reg4_dinov2.pth \
        --output dinov2_l16_grid32.msgpack --patch-size 16 --posemb-grid 32
    python tools/train.py --config configs/eomt/ade20k_semantic.py:L --workdir RUN \
        --set data.data_dir=DATA --set train.init_checkpoint=dinov2_l16_grid32.msgpack

Argument: "S" | "B" | "L" (default) | "g", optionally ",runlocal".
"""
import ml_collections

from configs.common import eomt_recipe, manual_data


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    # ADE20K images reach about 2,100 px on a side, at most about 3:1.
    return eomt_recipe(arg, data=manual_data("jaxseg_ade20k", "train"), eval_split="validation",
                       segmentation="semantic", num_classes=150, num_things=0, crop=512, queries=100,
                       epochs=31, train_images=20_210, scale_range=(0.5, 2.0), color_jitter=True,
                       canvas=(2112, 2112), max_windows=4)
