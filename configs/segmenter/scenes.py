"""Segmenter trained on the generated scenes' ground truth in the WSSS label space (background + thing
classes), on the default scenes (shape and texture tell the classes apart, colour does not).

    python tools/train.py --config configs/segmenter/scenes.py:runlocal --workdir /tmp/segmenter

Arguments: "runlocal" (tiny model, 64 px, minutes on a CPU) or ""; append ",linear" for the linear
decoder of the plain Segmenter baseline (e.g. "runlocal,linear"). The fully supervised upper bound of
the WeakTr scenes pipeline (`configs/weaktr/scenes_*.py`) trains on its colour-coded scenes: add
`--set data.hue_spread=0.03 --set 'data.saturation_range=(0.5,0.9)'`.
"""
import ml_collections

from configs.common import scenes_segmenter


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return scenes_segmenter(arg)
