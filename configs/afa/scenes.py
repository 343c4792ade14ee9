"""AFA (affinity from attention, single-stage WSSS) on the generated scenes: the thing classes are the
foreground, stuff is background; trained from image-level labels alone, evaluated on the validation
split's ground truth by the CAM sweep and by the segmentation head's mIoU.

    python tools/train.py --config configs/afa/scenes.py:runlocal --workdir /tmp/afa

Evaluations on the validation split: "cams" (CAM mIoU over a background threshold sweep), "random_walk" (those
CAMs propagated with the learned affinity, mIoU) and "seg" (the segmentation head, mIoU).

Argument "runlocal": a tiny DeiT-style encoder (width 64, 4 blocks of 4 heads, patch 8) on 64 px scenes;
otherwise ViT-Ti width on 128 px scenes. AFA's loss, schedule and optimiser recipe (docs/afa.md), with the
departures that training from scratch on small scenes needs:
  - the colour-coded scenes (`configs.common.COLOUR_CODED`), as WeakTr's scenes configs, for the same reason
    (from image-level labels alone a from-scratch ViT does not leave the label prior on the default scenes);
  - lr 1e-3 (the recipe's 6e-5 fine-tunes an ImageNet encoder), the heads at the recipe's 10x;
  - a milder rescale range: at U(0.5, 2) a 64 px scene is either mostly black padding or cropped to a
    quarter whose objects the image labels still name;
  - LargeFOV narrowed to 64 channels at dilation 1 (the 8 x 8 patch grid), the affinity radius 4 patches
    (8 on the official 20 x 20 grid).
The schedule keeps the recipe's fractions: classification alone for the first 10%, the random-walk labels
from 30%.
"""
import ml_collections

from configs.common import (
    SCENES_THINGS,
    evaluation,
    make_config,
    method_section,
    metrics_section,
    optimizer_section,
    parallel_section,
    parse_arg,
    predictor_section,
    scenes_data,
    train_section,
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    _, runlocal = parse_arg(arg)
    width, depth, heads = (64, 4, 4) if runlocal else (192, 12, 3)
    crop = 64 if runlocal else 128
    total_steps = 1200 if runlocal else 8000
    data = scenes_data(runlocal, colour_coded=True)
    radius = 4 if runlocal else 8
    cams = predictor_section("afa", "cams", scales=(1.0, 0.5, 1.5))
    random_walk = predictor_section("afa", "random_walk", scales=(1.0, 0.5, 1.5), radius=radius)
    segmentation = predictor_section("afa", "semantic", scales=(1.0,), flip=False)
    return make_config(
        method=method_section("afa", crop_size=crop, scale_range=(0.75, 1.25), cam_scales=(1.0, 0.5, 1.5),
                              radius=radius),
        model=dict(encoder=dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width, patch_size=8,
                                posemb_grid=(8, 8) if runlocal else (16, 16), drop_path_rate=0.0 if runlocal else 0.1),
                   num_classes=SCENES_THINGS, pooling="gmp", affinity_layers=None,
                   decoder_width=64 if runlocal else 256, decoder_dilation=1 if runlocal else 2),
        optimizer=optimizer_section("afa", lr=1e-3, weight_decay=0.01, warmup_steps=round(0.075 * total_steps),
                                    head_multiplier=10.0),
        data=data,
        evals=dict(cams=evaluation("validation", cams, metrics_section("afa", "cam_sweep")),
                   random_walk=evaluation("validation", random_walk, metrics_section("afa", "semantic")),
                   seg=evaluation("validation", segmentation, metrics_section("afa", "semantic"))),
        train=train_section(runlocal, total_steps=total_steps, batch_size=8 if runlocal else 16),
        parallel=parallel_section())
