"""SETR trained on the generated scenes' ground truth (all categories, stuff and things), from scratch:

    python tools/train.py --config configs/setr/scenes.py:runlocal --workdir /tmp/setr_naive
    python tools/train.py --config configs/setr/scenes.py:runlocal,mla --workdir /tmp/setr_mla

Arguments: "runlocal" (tiny model, 64 px, minutes on a CPU) or "" (a ViT-Ti-width encoder on 128 px
scenes); append ",naive" (default), ",pup" or ",mla" for the decoder. The decoders are mmseg's (the
official configs' taps, the MLA encoder without its class token); departures from the official recipe
for a model trained from scratch on a CPU: AdamW with a warm-up instead of SGD, the decode head at the
encoder's rate, narrower decoder convs in the small form, mild augmentation (ratio 0.9-1.3, no colour
distortion: colour does not tell the default scenes' classes apart), no auxiliary heads.
"""
import ml_collections

from configs.common import (
    SCENES_CLASSES,
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
from jaxseg.models.setr import DECODERS


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    decoder, runlocal = parse_arg(arg, DECODERS, default="naive")
    width, depth, heads = (64, 4, 4) if runlocal else (192, 12, 3)
    crop = 64 if runlocal else 128
    channels, mla_channels = (64, 32) if runlocal else (256, 128)
    predictor = predictor_section("setr", "sliding", scales=(1.0,), canvas=(crop, crop), max_aspect=1.0)
    return make_config(
        method=method_section("setr", crop_size=crop, base_size=70 if runlocal else 138, ratio_range=(0.9, 1.3),
                              photometric=False),
        model=dict(encoder=dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width, patch_size=8,
                                posemb_grid=(crop // 8, crop // 8), final_norm=False,
                                drop_path_rate=0.0 if runlocal else 0.1),
                   num_classes=SCENES_CLASSES, decoder=decoder, taps=(), with_cls_token=decoder != "mla",
                   channels=channels, mla_channels=mla_channels),
        optimizer=optimizer_section("setr", name="adamw", lr=3e-3 if runlocal else 1e-3, min_lr=1e-6,
                                    head_multiplier=1.0, warmup_steps=100 if runlocal else 500),
        data=scenes_data(runlocal, **({"num_train": 2000} if runlocal else {})),
        evals=dict(val=evaluation("validation", predictor, metrics_section("setr", "semantic"))),
        train=train_section(runlocal, total_steps=1500 if runlocal else 20_000, batch_size=8),
        parallel=parallel_section())
