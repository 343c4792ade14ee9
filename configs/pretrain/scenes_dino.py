"""DINO pretraining of the scenes encoder (`configs.common.scenes_encoder`) on unlabelled generated scenes,
the alternative to `configs/pretrain/scenes_mae.py` (name it in a scenes config's `pretrained.config`).

    python tools/train.py --config configs/pretrain/scenes_dino.py:runlocal --workdir /tmp/dino

Argument "runlocal": the encoder of the runlocal scenes configs on 64 px scenes (global views 64 px, local
views 32 px); otherwise the larger encoder on 128 px scenes. Evaluation: the loss on a fixed pair of views
(image, mirror image) of the validation scenes and the teacher's output entropy.
"""
import ml_collections

from configs.common import (
    evaluation,
    make_config,
    method_section,
    metrics_section,
    optimizer_section,
    parallel_section,
    parse_arg,
    predictor_section,
    scenes_data,
    scenes_encoder,
    train_section,
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    _, runlocal = parse_arg(arg)
    encoder = scenes_encoder(runlocal)
    crop = 64 if runlocal else 128
    return make_config(
        method=method_section("dino", crop_size=crop, local_crop_size=crop // 2, num_local_crops=4,
                              teacher_temp=0.04, warmup_teacher_temp=0.04),
        model=dict(encoder=encoder, out_dim=1024 if runlocal else 4096, head_hidden_dim=4 * encoder["width"],
                   head_bottleneck_dim=encoder["width"], head_layers=3),
        optimizer=optimizer_section("dino", lr=1e-3, warmup=0.1, teacher_momentum=0.99),
        data=scenes_data(runlocal, num_train=4000 if runlocal else 20_000),
        evals=dict(val=evaluation("validation", predictor_section("dino", "agreement"),
                                  metrics_section("dino", "agreement"))),
        train=train_section(runlocal, total_steps=2000 if runlocal else 40_000, batch_size=32, num_overlays=0),
        parallel=parallel_section())
