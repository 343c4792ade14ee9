"""Pieces the config files share (big_vision's `configs/common.py` idea): the generated-scenes dataset
block and the training defaults (logging, checkpoints, mesh and logical-axis rules). Configs stay plain
ml_collections; this module only builds parts of them."""
from __future__ import annotations

import ml_collections

from jaxseg.data.synthetic import SceneConfig
from jaxseg.models.vit import vit_config
from jaxseg.parallel import DEFAULT_RULES

# The scenes' foreground for weakly supervised segmentation: their thing classes (categories 0..T-1).
SCENES_THINGS = SceneConfig().num_thing_classes
SCENES_CLASSES = SceneConfig().num_classes
# The scenes' colours for weakly supervised training: each class keeps close to its own saturated hue.
# In the default scenes only shape and texture tell the classes apart, and a ViT trained from scratch on
# image-level labels alone stays at the label prior there for thousands of CPU steps.
COLOUR_CODED = dict(hue_spread=0.03, saturation_range=(0.5, 0.9))


def scenes_dataset(runlocal: bool, *, colour_coded: bool = False) -> ml_collections.ConfigDict:
    """The generated scenes (`jaxseg.data.synthetic`); `colour_coded`: the COLOUR_CODED variant."""
    colours = COLOUR_CODED if colour_coded else dict(hue_spread=SceneConfig.hue_spread,
                                                      saturation_range=SceneConfig.saturation_range)
    return ml_collections.ConfigDict(dict(
        name="jaxseg_scenes", data_dir="", image_size=64 if runlocal else 128,
        num_train=400 if runlocal else 2000, num_val=48 if runlocal else 500,
        train_split="train", eval_split="validation", ground_truth="categories", **colours))


def add_training_defaults(config: ml_collections.ConfigDict, *, runlocal: bool) -> None:
    """Seed, logging, checkpointing and the data-parallel mesh with the default rules table."""
    config.seed = 0
    config.log_every = 25 if runlocal else 100
    config.checkpoint_every = 100 if runlocal else 1000
    config.eval_every = 0 if runlocal else 5000
    config.num_overlays = 8  # eval examples drawn to WORKDIR/overlays/step_<N>/ after training; 0: none
    config.init_checkpoint = ""
    config.init_into = ""
    config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    config.sharding_rules = DEFAULT_RULES


def scenes_segmenter(arg: str, *, colour_coded: bool = False) -> ml_collections.ConfigDict:
    """The scenes Segmenter of `configs/segmenter/scenes.py` (ground truth) and
    `configs/weaktr/scenes_seg.py` (pseudo-labels, on the colour-coded scenes of stage 1): same model,
    WeakTr's stage-2 optimiser and augmentation. `arg`: "runlocal" (tiny model, 64 px) or "", with
    ",linear" for the linear decoder of the plain Segmenter instead of the mask transformer."""
    choice, runlocal = parse_arg(arg, ("linear",))
    decoder = "linear" if choice else "mask_transformer"
    config = ml_collections.ConfigDict()
    config.task = "segmenter"
    config.dataset = scenes_dataset(runlocal, colour_coded=colour_coded)
    width, depth, heads = (64, 4, 4) if runlocal else (192, 12, 3)
    config.model = ml_collections.ConfigDict(dict(
        encoder=dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width, patch_size=8,
                     posemb_grid=(8, 8) if runlocal else (16, 16), drop_path_rate=0.0 if runlocal else 0.1),
        num_classes=SCENES_THINGS + 1, decoder=decoder, decoder_depth=2, decoder_heads=heads,
        decoder_mlp_dim=4 * width, decoder_dropout=0.0 if runlocal else 0.1))
    config.num_foreground = SCENES_THINGS
    config.crop_size = 64 if runlocal else 128
    config.base_size = 70 if runlocal else 138  # WeakTr's 520 / 480 ratio of rescale base to crop
    config.batch_size = 8
    config.total_steps = 1500 if runlocal else 20_000
    # 400 default scenes are overfitted before the model leaves the background prior; the colour-coded
    # ones are stage 1's dataset, whose pseudo-labels stage 2 reads.
    if runlocal and not colour_coded:
        config.dataset.num_train = 2000
    # From scratch, SGD (the recipe's, tuned for fine-tuning) stays at the background prior: AdamW with a
    # warm-up, the encoder at full rate, and a milder augmentation (no colour distortion: colour does
    # not tell the scenes' classes apart) learn.
    config.optimizer = "adamw"
    config.warmup_steps = 100 if runlocal else 500
    config.lr = 3e-3 if runlocal else 1e-3
    config.min_lr = 1e-6
    config.encoder_multiplier = 1.0
    config.ratio_range = (0.9, 1.3)
    config.photometric = False
    config.clipping = False
    config.clip_cell_size = 32 if runlocal else 64
    config.start_value = 1.2
    config.pseudo_labels_dir = ""
    config.readout_weights = (0.8, 1.0) if decoder == "mask_transformer" else (1.0,)
    add_training_defaults(config, runlocal=runlocal)
    return config


def parse_arg(arg: str, choices: tuple[str, ...] = (), default: str = "") -> tuple[str, bool]:
    """A config argument "[choice][,runlocal]" (e.g. "L", "S,runlocal", "runlocal") -> (choice, runlocal);
    anything else is an error listing the valid parts."""
    parts = [p for p in arg.split(",") if p]
    picked = [p for p in parts if p in choices]
    unknown = [p for p in parts if p not in choices and p != "runlocal"]
    if unknown or len(picked) > 1:
        raise ValueError(f"unknown config argument {arg!r}: give at most one of {list(choices)} and "
                         "optionally 'runlocal', comma-separated")
    return (picked[0] if picked else default), "runlocal" in parts


def manual_dataset(name: str, train_split: str, eval_split: str, *,
                   ground_truth: str = "categories") -> ml_collections.ConfigDict:
    """A dataset read from its prepared TFDS build in `data_dir` (`jaxseg.data.datasets`), prepared from
    `manual_dir` (the extracted official downloads) on first use when given."""
    return ml_collections.ConfigDict(dict(name=name, data_dir="", manual_dir="", train_split=train_split,
                                          eval_split=eval_split, ground_truth=ground_truth))


# The encoder of the real configs' runlocal forms: seconds of compilation, for tests over tiny datasets.
TINY_ENCODER = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(8, 8))

# Query-processing blocks L2 of EoMT per DINOv2 size (spec §1.2): 3 for the 12-layer S/B, 4 for L, 5 for g.
EOMT_QUERY_BLOCKS = {"S": 3, "B": 3, "L": 4, "g": 5}


def eomt_config(arg: str, *, dataset: ml_collections.ConfigDict, segmentation: str, num_classes: int,
                num_things: int, crop: int, queries: int, epochs: int, train_images: int,
                scale_range: tuple[float, float], color_jitter: bool,
                epochs_small: int | None = None) -> ml_collections.ConfigDict:
    """An EoMT config with the published DINOv2 recipe (spec §4): AdamW 1e-4, wd 0.05, LLRD 0.8,
    warm-up (500, 1000) + poly 0.9, clipping 0.01, global batch 16, Mask2Former loss with 12,544 points;
    `epochs` of `train_images` images (drop_last), `epochs_small` for S/B where the recipe trains longer.
    `arg`: "S" | "B" | "L" (default) | "g", plus ",runlocal" for a tiny model on tiny crops that runs
    on a CPU (give it a small prepared dataset)."""
    size, runlocal = parse_arg(arg, tuple(EOMT_QUERY_BLOCKS), default="L")
    config = ml_collections.ConfigDict()
    config.task = "eomt"
    config.dataset = dataset
    config.segmentation = segmentation
    config.num_things = num_things
    if runlocal:
        encoder = dict(TINY_ENCODER, num_registers=4, posemb_covers_prefix=False)
        config.model = ml_collections.ConfigDict(dict(encoder=encoder, num_classes=num_classes,
                                                      num_queries=8, num_query_blocks=1))
        config.crop_size, config.batch_size, config.total_steps = 64, 2, 6
        config.warmup, config.num_points, config.max_segments = (2, 2), 256, 8
    else:
        encoder = vit_config(f"{size}/16", "dinov2_reg", posemb_grid=(crop // 16, crop // 16))
        config.model = ml_collections.ConfigDict(dict(encoder=encoder, num_classes=num_classes,
                                                      num_queries=queries,
                                                      num_query_blocks=EOMT_QUERY_BLOCKS[size]))
        config.crop_size, config.batch_size = crop, 16
        if epochs_small and size in ("S", "B"):
            epochs = epochs_small
        config.total_steps = epochs * (train_images // config.batch_size)
        config.warmup, config.num_points, config.max_segments = (500, 1000), 12544, 100
    config.scale_range = scale_range
    config.color_jitter = color_jitter
    config.lr = 1e-4
    config.layer_decay = 0.8
    config.clip_norm = 0.01
    add_training_defaults(config, runlocal=runlocal)
    # The recipe fine-tunes DINOv2: convert its weights (tools/convert_weights.py) and set init_checkpoint.
    config.init_into = "encoder"
    config.requires_init_checkpoint = not runlocal
    if size == "g" and not runlocal:  # 1.1 B parameters: shard them (FSDP) instead of replicating
        config.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1))
    return config


def weaktr_cam_config(arg: str, *, dataset: ml_collections.ConfigDict, num_classes: int, base_lr: float,
                      train_images: int) -> ml_collections.ConfigDict:
    """WeakTr stage 1 with the published recipe (spec §3): DeiT-S/16 with C class tokens, AAF (reduction
    8, feat-reduction 8, max pooling), 224 crops with timm's augmentation, batch 64, 60 epochs, AdamW
    (lr = base_lr * 64 / 512, wd 0.03 on all parameters), timm per-epoch cosine with 5 warm-up epochs
    from 1e-6 and minimum 1e-5; per-epoch check: CAM mIoU at scale 1.0 + flip. `arg`: "" or "runlocal"
    (a tiny encoder on 64 px crops for a CPU, over a small prepared dataset)."""
    _, runlocal = parse_arg(arg)
    config = ml_collections.ConfigDict()
    config.task = "weaktr_cam"
    config.dataset = dataset
    if runlocal:
        encoder = dict(TINY_ENCODER)
        config.crop_size, config.batch_size, steps_per_epoch, epochs = 64, 2, 2, 2
    else:
        encoder = vit_config("S/16", "deit", drop_path_rate=0.1)
        config.crop_size, config.batch_size, epochs = 224, 64, 60
        steps_per_epoch = train_images // config.batch_size
    encoder.update(num_cls_tokens=num_classes, final_norm=False, posemb_resize="dino")
    config.model = ml_collections.ConfigDict(dict(encoder=encoder, num_classes=num_classes, fusion="aaf",
                                                  pool="max", feat_reduction=8,
                                                  reduction=4 if runlocal else 8))
    config.steps_per_epoch = steps_per_epoch
    config.total_steps = steps_per_epoch * epochs
    config.lr = base_lr * 64 / 512
    config.weight_decay = 0.03
    config.warmup_epochs = 1 if runlocal else 5
    config.warmup_lr = 1e-6
    config.min_lr = 1e-5
    config.eval_scales = (1.0,)
    config.augmentation = "timm"
    config.refine_cams = True
    add_training_defaults(config, runlocal=runlocal)
    config.eval_every = 0 if runlocal else steps_per_epoch
    # Initialised from ImageNet DeiT-S with its class token (and its position) copied C times.
    config.init_into = "encoder"
    config.requires_init_checkpoint = not runlocal
    return config


def weaktr_seg_config(arg: str, *, dataset: ml_collections.ConfigDict, num_foreground: int, epochs: int,
                      batch_size: int, lr: float, train_images: int) -> ml_collections.ConfigDict:
    """WeakTr stage 2 (spec §5, §7): a Segmenter (DeiT-S/16 encoder with its final norm, 2-layer mask
    transformer decoder, dropout 0.1, drop-path 0.1) on 480 crops of the stage-1 pseudo-labels with the
    gradient-clipping loss (start value 1.2, 120 px cells), mmseg augmentation (short side 520 x
    U(0.5, 2)), SGD-Nesterov poly (lr, min 1e-5, encoder 0.1x), `epochs` of ceil(train_images /
    batch_size) steps; evaluation with the read-out 0.8 P1 + P2."""
    _, runlocal = parse_arg(arg)
    config = ml_collections.ConfigDict()
    config.task = "segmenter"
    config.dataset = dataset
    if runlocal:
        encoder = dict(TINY_ENCODER)
        config.crop_size, config.base_size, config.batch_size, config.total_steps = 64, 70, 2, 4
        config.clip_cell_size = 32
    else:
        crop = 480
        encoder = vit_config("S/16", "deit", posemb_grid=(crop // 16, crop // 16), drop_path_rate=0.1)
        config.crop_size, config.base_size, config.batch_size = crop, 520, batch_size
        config.total_steps = epochs * -(-train_images // batch_size)
        config.clip_cell_size = 120
    width, heads = encoder["width"], encoder["num_heads"]
    config.model = ml_collections.ConfigDict(dict(
        encoder=encoder, num_classes=num_foreground + 1, decoder="mask_transformer", decoder_depth=2,
        decoder_heads=heads, decoder_mlp_dim=4 * width, decoder_dropout=0.1))
    config.num_foreground = num_foreground
    config.lr = lr
    config.min_lr = 1e-5
    config.encoder_multiplier = 0.1
    config.optimizer = "sgd"
    config.warmup_steps = 0
    config.ratio_range = (0.5, 2.0)
    config.photometric = True
    config.clipping = True
    config.start_value = 1.2
    config.pseudo_labels_dir = ""
    config.readout_weights = (0.8, 1.0)
    add_training_defaults(config, runlocal=runlocal)
    config.init_into = "encoder"  # a fresh ImageNet DeiT-S, not the stage-1 network
    config.requires_init_checkpoint = not runlocal
    return config
