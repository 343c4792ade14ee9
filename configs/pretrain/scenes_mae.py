"""MAE pretraining of the scenes encoder (`configs.common.scenes_encoder`) on unlabelled generated scenes:
what the scenes configs of EoMT, WeakTr and the Segmenter start from (their `pretrained` section builds it
on first use and caches it, `jaxseg.train.pretrained`). Run it alone with

    python tools/train.py --config configs/pretrain/scenes_mae.py:runlocal --workdir /tmp/mae

Argument "runlocal": the encoder of the runlocal scenes configs on 64 px scenes; otherwise the larger
encoder on 128 px scenes. Evaluation: the reconstruction loss of the validation scenes (75% masked).
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
    total_steps = 2000 if runlocal else 40_000
    return make_config(
        method=method_section("mae", crop_size=crop, scale_range=(0.2, 1.0), mask_ratio=0.75, norm_pix_loss=True),
        model=dict(encoder=encoder, decoder_width=encoder["width"], decoder_depth=2,
                   decoder_heads=encoder["num_heads"], decoder_mlp_dim=4 * encoder["width"]),
        optimizer=optimizer_section("mae", lr=1.5e-3, warmup=0.05, weight_decay=0.05),
        data=scenes_data(runlocal, num_train=4000 if runlocal else 20_000),
        evals=dict(val=evaluation("validation", predictor_section("mae", "reconstruction"),
                                  metrics_section("mae", "reconstruction"))),
        train=train_section(runlocal, total_steps=total_steps, batch_size=64, num_overlays=0),
        parallel=parallel_section())
