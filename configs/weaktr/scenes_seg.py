"""WeakTr stage 2 on the generated scenes: the Segmenter retrained on stage-1 pseudo-labels with the
gradient-clipping loss, evaluated against the scenes' ground truth (background + thing classes).

    python tools/train.py --config configs/weaktr/scenes_cam.py:runlocal --workdir /tmp/cam
    python tools/make_pseudo_labels.py --checkpoint /tmp/cam --data_dir /tmp/cam/data \
        --dataset jaxseg_scenes/<build name> --out_dir /tmp/pseudo
    python tools/train.py --config configs/weaktr/scenes_seg.py:runlocal --workdir /tmp/seg \
        --set pseudo_labels_dir=/tmp/pseudo --set dataset.data_dir=/tmp/cam/data

Argument "runlocal" or "" as in `configs/segmenter/scenes.py`.
"""
import ml_collections

from jaxseg.train.config_lib import scenes_segmenter


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; valid: '' or 'runlocal'")
    config = scenes_segmenter(arg == "runlocal", "mask_transformer")
    config.clipping = True
    return config
