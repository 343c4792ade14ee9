"""EoMT instance segmentation on COCO 2017 over DINOv3, the published recipe (tue-mps/eomt
configs/dinov3/coco/instance/*.yaml): the DINOv2 recipe of coco_instance.py with lr 2e-4, warm-up
(2000, 3000) and the query blocks outside the layer-wise decay; the annealing keeps the T/6 windows;
640 or 1280 crop, 12 epochs. The instances are the thing segments of COCO panoptic (see coco_instance.py).

    python tools/convert_weights.py --input dinov3_vitl16_pretrain_lvd1689m.pth --output dinov3_l16.msgpack
    python tools/train.py --config configs/eomt/coco_instance_dinov3.py:L --workdir RUN \
        --set data.data_dir=DATA --set train.init_checkpoint=dinov3_l16.msgpack

Argument: "L" (default, 640) | "L1280", optionally ",runlocal".
"""
import ml_collections

from configs.common import DINOV3_RECIPE, eomt_recipe, manual_data, parse_arg

VARIANTS = {"L": 640, "L1280": 1280}  # variant -> crop


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variant, runlocal = parse_arg(arg, tuple(VARIANTS), default="L")
    crop = VARIANTS[variant]
    return eomt_recipe("L,runlocal" if runlocal else "L", data=manual_data("jaxseg_coco_panoptic", "train"),
                       eval_split="validation", segmentation="instance", num_classes=80, num_things=80,
                       crop=crop, queries=200, epochs=12, train_images=118_287, scale_range=(0.1, 2.0),
                       color_jitter=False, canvas=(crop, crop), backbone="dinov3", optimizer=DINOV3_RECIPE)
