"""Segmenter trained on the generated scenes' ground truth in the WSSS label space (background + thing
classes): the fully supervised upper bound of the WeakTr pipeline (`configs/weaktr/scenes_*.py`).

    python tools/train.py --config configs/segmenter/scenes.py:runlocal --workdir /tmp/segmenter

Arguments: "runlocal" (tiny model, 64 px, minutes on a CPU) or ""; append ",linear" for the linear
decoder of the plain Segmenter baseline (e.g. "runlocal,linear").
"""
import ml_collections

from jaxseg.train.config_lib import scenes_segmenter


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    parts = [p for p in arg.split(",") if p]
    unknown = set(parts) - {"runlocal", "linear"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}; valid: 'runlocal', 'linear'")
    return scenes_segmenter("runlocal" in parts, "linear" if "linear" in parts else "mask_transformer")
