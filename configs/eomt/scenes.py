"""EoMT on the built-in generated scenes (jaxseg's embedded default job).

    python tools/train.py --config configs/eomt/scenes.py:runlocal --workdir /tmp/jaxseg-scenes

Argument "runlocal": a tiny model on 64 px scenes for a few minutes on a CPU; otherwise a small model on
128 px scenes. The model is trained from scratch (no pretrained backbone is downloadable here).
"""
import ml_collections

from jaxseg.train.sharding import DEFAULT_RULES


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    runlocal = arg == "runlocal"
    if arg not in ("", "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; valid: '' or 'runlocal'")
    config = ml_collections.ConfigDict()
    config.task = "eomt"
    config.seed = 0
    config.dataset = ml_collections.ConfigDict(dict(
        name="jaxseg_scenes", data_dir="", image_size=64 if runlocal else 128,
        num_train=400 if runlocal else 2000, num_val=48 if runlocal else 500))
    width, depth = (64, 4) if runlocal else (192, 8)
    config.model = ml_collections.ConfigDict(dict(
        encoder=dict(width=width, depth=depth, num_heads=4 if runlocal else 6, mlp_dim=4 * width,
                     patch_size=8, posemb_grid=(8, 8) if runlocal else (16, 16), num_registers=4,
                     posemb_covers_prefix=False),
        num_classes=9, num_queries=16 if runlocal else 32, num_query_blocks=2))
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
    config.log_every = 25 if runlocal else 100
    config.checkpoint_every = 100 if runlocal else 1000
    config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    config.sharding_rules = DEFAULT_RULES
    return config
