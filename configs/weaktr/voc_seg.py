"""WeakTr stage 2 on PASCAL VOC 2012: the Segmenter with the gradient-clipping decoder retrained on the
stage-1 pseudo-labels of train_aug (`configs/weaktr/voc_cam.py`), the published recipe: batch 4, 100
epochs (264.6k steps), SGD-Nesterov lr 1e-4 poly to 1e-5, encoder 0.1x; evaluated on VOC val.

    python tools/convert_weights.py --input deit_small_patch16_224-cd65a155.pth \
        --output deit_s_grid30.msgpack --posemb-grid 30
    python tools/train.py --config configs/weaktr/voc_seg.py --workdir RUN --set data.data_dir=DATA \
        --set data.pseudo_labels_dir=PSEUDO --set train.init_checkpoint=deit_s_grid30.msgpack

Argument: "" or "runlocal".
"""
import ml_collections

from configs.common import manual_data, weaktr_seg_recipe


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return weaktr_seg_recipe(arg, data=manual_data("jaxseg_voc", "train_aug", ground_truth="wsss"),
                             eval_split="validation", num_foreground=20, epochs=100, batch_size=4, lr=1e-4,
                             train_images=10_582, canvas=(500, 500))
