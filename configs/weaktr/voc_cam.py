"""WeakTr stage 1 on PASCAL VOC 2012 (train_aug, 10,582 images, 20 classes), the published recipe:
DeiT-S/16 with 20 class tokens, AAF, batch 64, 60 epochs, AdamW lr 6e-4 * 64 / 512, wd 0.03; the CAM
check of each epoch runs on VOC train (1,464 images with masks), as the original selects its model.

    python tools/make_dataset.py voc --manual_dir VOC_AND_SBD --data_dir DATA
    # ImageNet DeiT-S (the DeiT release's file) with its class token and that token's position entry
    # copied 20 times, without the final norm that stage 1 never applies:
    python tools/convert_weights.py --input deit_small_patch16_224-cd65a155.pth \
        --output deit_s_cls20.msgpack --num-cls-tokens 20 --no-final-norm
    python tools/train.py --config configs/weaktr/voc_cam.py --workdir RUN \
        --set data.data_dir=DATA --set train.init_checkpoint=deit_s_cls20.msgpack
    python tools/make_pseudo_labels.py --checkpoint RUN --data_dir DATA --dataset jaxseg_voc \
        --split train_aug --out_dir PSEUDO --scales 1.0 1.2 --threshold 0.43

Pseudo-labels from the official released VOC checkpoint instead of a run (the file has no run config, so
give the label space):

    python tools/convert_weights.py --input WeakTr_checkpoint_best_mIoU.pth --output weaktr_voc.msgpack
    python tools/make_pseudo_labels.py --checkpoint weaktr_voc.msgpack --data_dir DATA --dataset jaxseg_voc \
        --split train_aug --ground_truth wsss --out_dir PSEUDO --scales 1.0 1.2 --threshold 0.43

Argument: "" or "runlocal" (tiny encoder, a few steps on a CPU over a small prepared dataset).
"""
import ml_collections

from configs.common import manual_data, weaktr_cam_recipe


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return weaktr_cam_recipe(arg, data=manual_data("jaxseg_voc", "train_aug", ground_truth="wsss"), eval_split="train",
                             num_classes=20, base_lr=6e-4, train_images=10_582)
