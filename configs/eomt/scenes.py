"""EoMT on the built-in generated scenes (jaxseg's embedded default job).

    python tools/train.py --config configs/eomt/scenes.py:runlocal --workdir /tmp/jaxseg-scenes

Argument "runlocal": a tiny model on 64 px scenes for a few minutes on a CPU; otherwise a small model on
128 px scenes. The model is trained from scratch (no pretrained backbone is downloadable here).
"""
import ml_collections

from jaxseg.train.config_lib import SCENES_CLASSES, SCENES_THINGS, add_training_defaults, scenes_dataset


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    runlocal = arg == "runlocal"
    if arg not in ("", "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; valid: '' or 'runlocal'")
    config = ml_collections.ConfigDict()
    config.task = "eomt"
    config.dataset = scenes_dataset(runlocal)
    width, depth = (64, 4) if runlocal else (192, 8)
    config.model = ml_collections.ConfigDict(dict(
        encoder=dict(width=width, depth=depth, num_heads=4 if runlocal else 6, mlp_dim=4 * width,
                     patch_size=8, posemb_grid=(8, 8) if runlocal else (16, 16), num_registers=4,
                     posemb_covers_prefix=False),
        num_classes=SCENES_CLASSES, num_queries=16 if runlocal else 32, num_query_blocks=2))
    config.segmentation = "panoptic"
    config.num_things = SCENES_THINGS
    config.max_segments = 32
    config.total_steps = 300 if runlocal else 20_000
    config.batch_size = 8 if runlocal else 16
    config.crop_size = 64 if runlocal else 128
    config.scale_range = (0.8, 1.25) if runlocal else (0.5, 2.0)
    config.color_jitter = not runlocal
    config.num_points = 1024 if runlocal else 4096
    config.lr = 1e-3 if runlocal else 5e-4
    config.warmup = (20, 20) if runlocal else (500, 1000)
    config.layer_decay = 1.0
    config.clip_norm = 1.0
    add_training_defaults(config, runlocal=runlocal)
    return config
