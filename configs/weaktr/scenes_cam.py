"""WeakTr stage 1 (CAMs from image-level labels) on the generated scenes: the thing classes are the
foreground, stuff is background.

    python tools/train.py --config configs/weaktr/scenes_cam.py:runlocal --workdir /tmp/weaktr-cam

Argument "runlocal": a tiny DeiT-style encoder on 64 px scenes (minutes on a CPU); otherwise ViT-Ti
width on 128 px scenes. Trained from scratch with WeakTr's recipe (AdamW wd 0.03, per-epoch cosine,
timm augmentation), lr raised for training from scratch. Evaluation: CAM mIoU over a background
threshold sweep on the validation split. `fusion="mctformer"` gives the MCTformer baseline.
"""
import ml_collections

from jaxseg.train.config_lib import SCENES_THINGS, add_training_defaults, scenes_dataset


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; valid: '' or 'runlocal'")
    runlocal = arg == "runlocal"
    config = ml_collections.ConfigDict()
    config.task = "weaktr_cam"
    config.dataset = scenes_dataset(runlocal)
    width, depth, heads = (64, 4, 4) if runlocal else (192, 12, 3)
    grid = (8, 8) if runlocal else (16, 16)
    config.model = ml_collections.ConfigDict(dict(
        encoder=dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width, patch_size=8,
                     posemb_grid=grid, num_cls_tokens=SCENES_THINGS, final_norm=False,
                     posemb_resize="dino", drop_path_rate=0.0 if runlocal else 0.1),
        num_classes=SCENES_THINGS, fusion="aaf", pool="max", feat_reduction=8,
        reduction=4 if runlocal else 8))
    config.crop_size = 64 if runlocal else 128
    config.batch_size = 8 if runlocal else 32
    config.steps_per_epoch = config.dataset.num_train // config.batch_size
    config.total_steps = config.steps_per_epoch * (24 if runlocal else 60)
    config.lr = 3e-3 if runlocal else 5e-4
    config.weight_decay = 0.03
    config.warmup_epochs = 1 if runlocal else 5
    config.warmup_lr = 1e-6
    config.min_lr = 1e-5
    config.eval_scales = (1.0, 1.2)
    add_training_defaults(config, runlocal=runlocal)
    return config
