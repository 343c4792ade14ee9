"""Pieces the config files share (big_vision's `configs/common.py` idea): the generated-scenes dataset
block and the training defaults (logging, checkpoints, mesh and logical-axis rules). Configs stay plain
ml_collections; this module only builds parts of them."""
from __future__ import annotations

import ml_collections

from jaxseg.data.synthetic import SceneConfig
from jaxseg.train.sharding import DEFAULT_RULES

# The scenes' foreground for weakly supervised segmentation: their thing classes (categories 0..T-1).
SCENES_THINGS = SceneConfig().num_thing_classes


def scenes_dataset(runlocal: bool, *, ground_truth: str = "categories") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="jaxseg_scenes", data_dir="", image_size=64 if runlocal else 128,
        num_train=400 if runlocal else 2000, num_val=48 if runlocal else 500,
        train_split="train", eval_split="validation", ground_truth=ground_truth))


def add_training_defaults(config: ml_collections.ConfigDict, *, runlocal: bool) -> None:
    """Seed, logging, checkpointing and the data-parallel mesh with the default rules table."""
    config.seed = 0
    config.log_every = 25 if runlocal else 100
    config.checkpoint_every = 100 if runlocal else 1000
    config.eval_every = 0 if runlocal else 5000
    config.eval_batch_size = 8
    config.init_checkpoint = ""
    config.init_into = ""
    config.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
    config.sharding_rules = DEFAULT_RULES


def scenes_segmenter(runlocal: bool, decoder: str) -> ml_collections.ConfigDict:
    """The scenes Segmenter of `configs/segmenter/scenes.py` (ground truth) and
    `configs/weaktr/scenes_seg.py` (pseudo-labels): same model, WeakTr's stage-2 optimiser and
    augmentation."""
    config = ml_collections.ConfigDict()
    config.task = "segmenter"
    config.dataset = scenes_dataset(runlocal)
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
    config.total_steps = 300 if runlocal else 20_000
    # From scratch the encoder cannot learn at 0.1x of a rate tuned for fine-tuning: rates raised.
    config.lr = 3e-2 if runlocal else 1e-2
    config.min_lr = 1e-4
    config.encoder_multiplier = 1.0
    config.clipping = False
    config.clip_cell_size = 32 if runlocal else 64
    config.start_value = 1.2
    config.pseudo_labels_dir = ""
    config.readout_weights = (0.8, 1.0) if decoder == "mask_transformer" else (1.0,)
    add_training_defaults(config, runlocal=runlocal)
    return config
