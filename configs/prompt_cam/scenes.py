"""Prompt-CAM on the generated scenes (the colour-coded ones of WeakTr stage 1; the thing classes are the
classes, several per image): class prompts and a shared scorer trained on a frozen backbone from the
image-level labels, trait maps scored as CAMs and by the share of their attention inside each class.

The backbone is the encoder of a WeakTr stage-1 run on the same scenes (`configs/weaktr/scenes_cam.py`,
the same form: its encoder section is this config's), taken from the run with `train.init_from=encoder`:

    python tools/train.py --config configs/weaktr/scenes_cam.py:runlocal --workdir /tmp/pc_backbone
    python tools/train.py --config configs/prompt_cam/scenes.py:runlocal --workdir /tmp/pc_run \\
        --set train.init_checkpoint=/tmp/pc_backbone --set train.init_from=encoder \\
        --set data.data_dir=/tmp/pc_backbone/data
    python benchmarks/bench_prompt_cam.py measure --run /tmp/pc_run       # trait maps vs class tokens
    python tools/predict.py --workdir /tmp/pc_run --dataset_split validation --out_dir /tmp/pc_traits

Arguments: "runlocal" (the tiny runlocal encoder, 64 px) or "" (the ViT-Ti-width one, 128 px); append
",shallow" for VPT-shallow instead of VPT-deep. Any other ViT converted with jaxseg-convert serves as
backbone if the encoder section is set to match it. Without a pretrained backbone,
`--set optimizer.freeze_encoder=False --set train.requires_init_checkpoint=False` trains the encoder too,
from scratch.

Departures from the official recipe (docs/prompt_cam.md): the multi-label soft-margin loss (a scene holds
several classes), ImageNet pixel statistics (those of the WeakTr backbone), a shorter schedule, and the
learning rate raised for the short run.
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
from configs.weaktr import scenes_cam


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    mode, runlocal = parse_arg(arg, ("deep", "shallow"), default="deep")
    backbone = scenes_cam.get_config("runlocal" if runlocal else "")
    data = scenes_data(runlocal, colour_coded=True)
    batch_size = 8 if runlocal else 32
    steps_per_epoch = data["num_train"] // batch_size
    epochs = 12 if runlocal else 60
    cams = predictor_section("prompt_cam", "cams", scales=(1.0,))
    return make_config(
        method=method_section("prompt_cam", steps_per_epoch=steps_per_epoch, crop_size=backbone.method.crop_size,
                              classification="multilabel", pixel_stats="imagenet"),
        model=dict(encoder=backbone.model.encoder.to_dict(), num_classes=SCENES_THINGS, vpt=mode,
                   prompt_dropout=0.0 if runlocal else 0.1),
        optimizer=optimizer_section("prompt_cam", name="sgd", lr=5e-2, weight_decay=1e-3, momentum=0.9,
                                    warmup_epochs=1 if runlocal else 5, warmup_lr=0.0, min_lr=1e-6,
                                    freeze_encoder=True),
        data=data,
        evals=dict(val=evaluation("validation", cams, metrics_section("prompt_cam", "cam_sweep", "attention_mass"))),
        train=train_section(runlocal, total_steps=steps_per_epoch * epochs, batch_size=batch_size,
                            init_into="encoder", requires_init_checkpoint=True),
        parallel=parallel_section())
