"""WeakTr stage 1 on PASCAL VOC 2012 (train_aug, 10,582 images, 20 classes), the published recipe:
DeiT-S/16 with 20 class tokens, AAF, batch 64, 60 epochs, AdamW lr 6e-4 * 64 / 512, wd 0.03; the CAM
check of each epoch runs on VOC train (1,464 images with masks), as the original selects its model.

    python tools/make_dataset.py voc --manual_dir VOC_AND_SBD --data_dir DATA
    # NOT YET AVAILABLE: tools/convert_weights.py cannot yet copy DeiT's class token C times; an
    # official WeakTr checkpoint converts (--layout weaktr) and can serve as init_checkpoint.
    python tools/train.py --config configs/weaktr/voc_cam.py --workdir RUN \
        --set dataset.data_dir=DATA --set init_checkpoint=deit_s_cls20.msgpack
    python tools/make_pseudo_labels.py --checkpoint RUN --data_dir DATA --dataset jaxseg_voc \
        --split train_aug --out_dir PSEUDO --scales 1.0 1.2 --threshold 0.43

Argument: "" or "runlocal" (tiny encoder, a few steps on a CPU over a small prepared dataset).
"""
import ml_collections

from jaxseg.train.config_lib import manual_dataset, weaktr_cam_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return weaktr_cam_config(arg, dataset=manual_dataset("jaxseg_voc", "train_aug", "train", ground_truth="wsss"),
                             num_classes=20, base_lr=6e-4, train_images=10_582)
