"""EoMT on COCO panoptic 2017 over DINOv3, the published recipe (tue-mps/eomt
configs/dinov3/coco/panoptic/*.yaml): the DINOv2 recipe of coco_panoptic.py with lr 2e-4, warm-up
(2000, 3000), the query blocks outside the layer-wise decay, and the first query block's masking annealed
over steps [0, 3000); 640 crop (12 epochs; S and B: 24 epochs, L2 = 3) or 1280 crop for L.

    python tools/make_dataset.py coco_panoptic --manual_dir COCO --data_dir DATA
    python tools/convert_weights.py --input dinov3_vitl16_pretrain_lvd1689m.pth --output dinov3_l16.msgpack
    python tools/train.py --config configs/eomt/coco_panoptic_dinov3.py:L --workdir RUN \
        --set data.data_dir=DATA --set train.init_checkpoint=dinov3_l16.msgpack

A released DINOv3 EoMT checkpoint (the difference from the DINOv3 weights) converts with its backbone:
`tools/convert_weights.py --input coco_panoptic_eomt_large_640_dinov3.bin --base
dinov3_vitl16_pretrain_lvd1689m.pth --num-query-blocks 4 --output eomt.msgpack`, then
`--set train.init_checkpoint=eomt.msgpack --set train.init_into=` to start from all of it.

Argument: "S" | "B" | "L" (default, 640) | "L1280", optionally ",runlocal".
"""
import ml_collections

from configs.common import DINOV3_RECIPE, eomt_recipe, first_block_from_start, manual_data, parse_arg

# variant -> (backbone size, crop, epochs)
VARIANTS = {"S": ("S", 640, 24), "B": ("B", 640, 24), "L": ("L", 640, 12), "L1280": ("L", 1280, 12)}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variant, runlocal = parse_arg(arg, tuple(VARIANTS), default="L")
    size, crop, epochs = VARIANTS[variant]
    return eomt_recipe(f"{size},runlocal" if runlocal else size, data=manual_data("jaxseg_coco_panoptic", "train"),
                       eval_split="validation", segmentation="panoptic", num_classes=133, num_things=80,
                       crop=crop, queries=200, epochs=epochs, train_images=118_287, scale_range=(0.1, 2.0),
                       color_jitter=False, canvas=(crop, crop), backbone="dinov3", optimizer=DINOV3_RECIPE,
                       annealing=first_block_from_start)
