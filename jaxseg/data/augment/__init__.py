"""Joint image / target augmentations on host numpy arrays, for grain `random_map`s, one module per
recipe family; each function draws every random number from the `np.random.Generator` it is given.

  - `common`: what the families share (per-pixel key helpers and fill values, flips, PIL helpers,
    resize, padding, random crop, ImageNet normalisation);
  - `eomt`: EoMT's torchvision-v2 chain (`eomt_train_example`);
  - `timm`: timm's DeiT training recipe, WeakTr stage 1 (`weaktr_stage1_example`);
  - `mmseg`: the mmseg 0.x / mmcv pipeline, WeakTr stage 2 (`weaktr_stage2_example`).
"""
