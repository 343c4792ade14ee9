"""WeakTr stage 1 on COCO (80 thing classes), the published recipe: DeiT-S/16 with 80 class tokens,
AAF, batch 64, 60 epochs, AdamW lr 2e-4 * 64 / 512, wd 0.03.

Data: COCO 2017 panoptic (`jaxseg_coco_panoptic`: image labels = its 80 thing classes, dense ground
truth = background + things) stands in for the original's COCO 2014 lists (same classes; train2017 has
118k images against train2014's 82k). The CAM check runs on the validation split (5,000 images; the
original uses a 1,250-image train subset).

    # ImageNet DeiT-S with its class token (and that token's position entry) copied 80 times, no final norm:
    python tools/convert_weights.py --input deit_small_patch16_224-cd65a155.pth \
        --output deit_s_cls80.msgpack --num-cls-tokens 80 --no-final-norm
    python tools/train.py --config configs/weaktr/coco_cam.py --workdir RUN \
        --set data.data_dir=DATA --set train.init_checkpoint=deit_s_cls80.msgpack
    python tools/make_pseudo_labels.py --checkpoint RUN --data_dir DATA --dataset jaxseg_coco_panoptic \
        --split train --out_dir PSEUDO --scales 1.0 0.8 1.2 --threshold 0.42

The official COCO checkpoint has 90 class tokens (COCO category ids 1..90), not this config's 80, so it
neither initialises this config nor makes pseudo-labels for `jaxseg_coco_panoptic`.

Argument: "" or "runlocal".
"""
import ml_collections

from configs.common import manual_data, weaktr_cam_recipe


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return weaktr_cam_recipe(arg, data=manual_data("jaxseg_coco_panoptic", "train"), eval_split="validation",
                             num_classes=80, base_lr=2e-4, train_images=118_287)
