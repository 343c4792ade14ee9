"""WeakTr stage 2 on COCO: the Segmenter with the gradient-clipping decoder retrained on the stage-1
pseudo-labels (`configs/weaktr/coco_cam.py`); background + 80 thing classes; evaluated on val2017.

The recipe is the one the published 46.9 mIoU was produced with (`config.yml` before hustvl/WeakTr
87a3470): batch 16, 256 epochs, SGD-Nesterov lr 1e-3 poly to 1e-5, encoder 0.1x. (HEAD's command-line
defaults would give batch 4, 100 epochs, lr 1e-4.) Epochs count COCO 2017 train (118k images).

    python tools/train.py --config configs/weaktr/coco_seg.py --workdir RUN --set data.data_dir=DATA \
        --set data.pseudo_labels_dir=PSEUDO --set train.init_checkpoint=deit_s_grid30.msgpack

Argument: "" or "runlocal".
"""
import ml_collections

from configs.common import manual_data, weaktr_seg_recipe


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return weaktr_seg_recipe(arg, data=manual_data("jaxseg_coco_panoptic", "train"), eval_split="validation",
                             num_foreground=80, epochs=256, batch_size=16, lr=1e-3, train_images=118_287,
                             canvas=(640, 640))
