"""End to end on CPU: a tiny EoMT trained from scratch on generated scenes through the real pipeline
(TFDS ArrayRecord build, grain, augmentation, masked-attention annealing, set loss, trainer) learns.

Measured (300 steps, batch 8, 64 px, ~100 s on 2 cores): the logged loss went from 29.6 to 23.3 and
validation mIoU over the 9 classes from 0.026 (untrained) to 0.147; the thresholds below leave room for
differences across machines."""
import flax.linen as nn
import jax
import pytest
import tensorflow_datasets as tfds

from jaxseg.data.builders.scenes import JaxsegScenes, scenes_config
from jaxseg.losses.mask_classification import SetLossConfig
from jaxseg.train.tasks import EomtTask
from jaxseg.train.trainer import TrainConfig, Trainer

MODEL = dict(encoder=dict(width=64, depth=4, num_heads=4, mlp_dim=256, patch_size=8, posemb_grid=(8, 8),
                          num_registers=4, posemb_covers_prefix=False),
             num_classes=9, num_queries=16, num_query_blocks=2)


@pytest.mark.slow
def test_eomt_learns_scenes(tmp_path):
    config = scenes_config(image_size=64, num_train=400, num_val=48)
    JaxsegScenes(config=config, data_dir=tmp_path / "data", num_workers=1).download_and_prepare(
        file_format="array_record")
    train, val = (tfds.data_source(f"jaxseg_scenes/{config.name}", data_dir=tmp_path / "data", split=split)
                  for split in ("train", "validation"))
    task = EomtTask(model=MODEL, source=train, total_steps=300, batch_size=8, crop_size=64,
                    scale_range=(0.8, 1.25), lr=1e-3, warmup=(20, 20), layer_decay=1.0, clip_norm=1.0,
                    loss_config=SetLossConfig(num_points=1024), eval_source=val)
    trainer = Trainer(task, TrainConfig(total_steps=300, log_every=25, checkpoint_every=10**6), tmp_path / "run")
    untrained_params = nn.unbox(task.init_params(jax.random.PRNGKey(0)))
    untrained = task.evaluate(untrained_params, trainer.mesh, trainer.config.rules)["mean_iou"]
    trainer.run()
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < 0.85 * losses[0], losses
    trained = trainer.eval_results["mean_iou"]
    assert trainer.eval_results["step"] == 300 and (tmp_path / "run" / "eval.json").is_file()
    assert (tmp_path / "run" / "eval_metrics.jsonl").is_file() and any((tmp_path / "run" / "tensorboard").iterdir())
    print(f"mIoU untrained {untrained:.3f} -> trained {trained:.3f}; loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    assert trained > 0.10 and trained > untrained + 0.05

