"""EoMT on the built-in generated scenes (jaxseg's embedded default job).

    python tools/train.py --config configs/eomt/scenes.py:runlocal --workdir /tmp/jaxseg-scenes

Argument "runlocal": a tiny model on 64 px scenes, under 10 minutes on 2 CPU cores; otherwise a small model
on 128 px scenes. The encoder starts from MAE pretraining on unlabelled scenes (`configs/pretrain/scenes_mae.py`,
built on first use and cached; `--set pretrained.config=` trains from scratch). 400 scenes are overfitted
long before the model segments things, so the runlocal job trains on 4,000 (benchmarks/pretrain_cpu.md).
"""
import ml_collections

from configs.common import (
    SCENES_CLASSES,
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
    scenes_encoder,
    scenes_pretrained,
    train_section,
)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    _, runlocal = parse_arg(arg)
    crop = 64 if runlocal else 128
    return make_config(
        method=method_section("eomt", segmentation="panoptic", num_things=SCENES_THINGS, crop_size=crop,
                              scale_range=(0.8, 1.25) if runlocal else (0.5, 2.0), color_jitter=not runlocal,
                              max_segments=32, set_loss=dict(num_points=1024 if runlocal else 4096)),
        model=dict(encoder=scenes_encoder(runlocal),
                   num_classes=SCENES_CLASSES, num_queries=16 if runlocal else 32, num_query_blocks=2),
        optimizer=optimizer_section("eomt", lr=1e-3 if runlocal else 5e-4, warmup=(20, 20) if runlocal else (500, 1000),
                                    layer_decay=1.0, clip_norm=1.0),
        data=scenes_data(runlocal, num_train=4000 if runlocal else 2000),
        evals=dict(val=evaluation("validation", predictor_section("eomt", "panoptic", canvas=(crop, crop)),
                                  metrics_section("eomt", "panoptic", "semantic"))),
        train=train_section(runlocal, total_steps=2000 if runlocal else 20_000, batch_size=8 if runlocal else 16,
                            init_into="encoder"),
        pretrained=scenes_pretrained(runlocal),
        parallel=parallel_section())
