"""WeakTr stage 1 (CAMs from image-level labels) on the generated scenes: the thing classes are the
foreground, stuff is background.

    python tools/train.py --config configs/weaktr/scenes_cam.py:runlocal --workdir /tmp/weaktr-cam

Argument "runlocal": a tiny DeiT-style encoder on 64 px scenes (a minute on a CPU); otherwise ViT-Ti
width on 128 px scenes. Trained from scratch with WeakTr's loss, optimiser and schedule (AdamW wd 0.03,
per-epoch cosine; lr raised for training from scratch), with three departures that training from
scratch on small scenes needs, each measured on 2 CPU cores after 1200 steps of runlocal:
  - the colour-coded scenes (`config_lib.COLOUR_CODED`): on the default scenes, where only shape and
    texture tell the classes apart, the class losses stay at the label prior (0.68 vs 0.69 after 3125
    steps of batch 32 over 20,000 scenes);
  - flip-only augmentation: timm's random resized crops keep objects out of the crop that the labels
    still name, and RandAugment's colour operations hide the colour cue (image-label accuracy 0.71 vs
    0.86 with flips only; CAM mIoU 0.22 vs 0.30);
  - CAMs not refined by the patch attention: a small ViT's patch-to-patch attention trained from scratch
    is spread over the whole image, and R = PA . M falls to the background level (CAM mIoU 0.12 refined
    vs 0.30 unrefined). The DeiT-initialised recipes keep refinement.
Evaluation: CAM mIoU over a background threshold sweep on the validation split. `fusion="mctformer"`
gives the MCTformer baseline.
"""
import ml_collections

from jaxseg.train.config_lib import SCENES_THINGS, add_training_defaults, scenes_dataset


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "runlocal"):
        raise ValueError(f"unknown config argument {arg!r}; valid: '' or 'runlocal'")
    runlocal = arg == "runlocal"
    config = ml_collections.ConfigDict()
    config.task = "weaktr_cam"
    config.dataset = scenes_dataset(runlocal, colour_coded=True)
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
    config.augmentation = "flip"
    config.refine_cams = False
    add_training_defaults(config, runlocal=runlocal)
    return config
