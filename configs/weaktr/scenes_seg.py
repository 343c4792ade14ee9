"""WeakTr stage 2 on the generated scenes: the Segmenter retrained on stage-1 pseudo-labels with the
gradient-clipping loss, on the colour-coded scenes of `configs/weaktr/scenes_cam.py`, evaluated against
their ground truth (background + thing classes).

    python tools/train.py --config configs/weaktr/scenes_cam.py:runlocal --workdir /tmp/cam
    python tools/make_pseudo_labels.py --checkpoint /tmp/cam --data_dir /tmp/cam/data \
        --dataset jaxseg_scenes/64px-400-48-seed0-hue0.03-sat0.5-0.9 --out_dir /tmp/pseudo
    python tools/train.py --config configs/weaktr/scenes_seg.py:runlocal,linear --workdir /tmp/seg \
        --set data.pseudo_labels_dir=/tmp/pseudo --set data.data_dir=/tmp/cam/data

Arguments as in `configs/segmenter/scenes.py`: "runlocal" or "", and ",linear" for the linear decoder.
At runlocal size the mask-transformer decoder stays at the background prior on 400 pseudo-labelled
scenes within 1500 steps (mIoU 0.125), the linear decoder learns (table in tests/test_configs.py).
"""
import ml_collections

from configs.common import scenes_segmenter


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return scenes_segmenter(arg, colour_coded=True, clipping=True)
