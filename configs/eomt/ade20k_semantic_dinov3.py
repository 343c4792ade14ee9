"""EoMT semantic segmentation on ADE20K over DINOv3, the published recipe (tue-mps/eomt
configs/dinov3/ade20k/semantic/eomt_large_512.yaml): the DINOv2 recipe of ade20k_semantic.py with lr
2e-4, warm-up (2000, 3000), 16 epochs and no layer-wise decay at all (`llrd: 1.0`; its `lr_mult: 0.1`
reaches no parameter in the official code, whose multiplier branch is unreachable, so every encoder block
trains at the full lr). The annealing windows are the official table as written (starts [0, 6520, 9780,
13040], ends [3000, 9780, 13040, 16300]); they do not follow the T/6 rule for this run's 20,208 steps.

    python tools/convert_weights.py --input dinov3_vitl16_pretrain_lvd1689m.pth --output dinov3_l16.msgpack
    python tools/train.py --config configs/eomt/ade20k_semantic_dinov3.py:L --workdir RUN \
        --set data.data_dir=DATA --set train.init_checkpoint=dinov3_l16.msgpack

Argument: "L" (default), optionally ",runlocal".
"""
import ml_collections

from configs.common import DINOV3_RECIPE, eomt_recipe, manual_data

OFFICIAL_ANNEALING = dict(starts=(0, 6520, 9780, 13040), ends=(3000, 9780, 13040, 16300))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return eomt_recipe(arg, data=manual_data("jaxseg_ade20k", "train"), eval_split="validation",
                       segmentation="semantic", num_classes=150, num_things=0, crop=512, queries=100,
                       epochs=16, train_images=20_210, scale_range=(0.5, 2.0), color_jitter=True,
                       canvas=(2112, 2112), max_windows=4, backbone="dinov3",
                       optimizer=dict(DINOV3_RECIPE, layer_decay=1.0),
                       annealing=lambda total_steps, num_blocks: OFFICIAL_ANNEALING)
