"""The shipped train step (`Trainer.make_step`) stays lean across a run: one compilation for 100 steps with
the masked-attention annealing passing through its whole window, and no host transfer inside the step
(`jax.transfer_guard("disallow")`: the state, the batch and the annealing step live on the device)."""
import flax.linen as nn
import jax
import numpy as np

from configs.common import SCENES_CLASSES, SCENES_THINGS
from jaxseg.data.datasets import DataConfig
from jaxseg.data.synthetic import SceneConfig, generate_scene
from jaxseg.losses.mask_classification import SetLossConfig
from jaxseg.methods.eomt import Annealing, EomtMethod, EomtOptimizer
from jaxseg.parallel import DEFAULT_RULES, MeshConfig, global_batch
from jaxseg.train.trainer import TrainConfig, Trainer

SIZE, BATCH, STEPS = 32, 2, 100
MODEL = dict(encoder=dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(4, 4)),
             num_classes=SCENES_CLASSES, num_queries=8, num_query_blocks=2)


def test_one_compilation_and_no_host_transfer_over_100_annealed_steps(tmp_path):
    # Both query blocks anneal inside the 100 steps, so the masking probabilities take every value from 1
    # to 0: as data of the step, never as constants of a new program.
    method = EomtMethod(model=MODEL, optimizer=EomtOptimizer(lr=1e-3, warmup=(5, 5)), total_steps=STEPS,
                        batch_size=BATCH, data=DataConfig(name="jaxseg_scenes"), crop_size=SIZE,
                        num_things=SCENES_THINGS, max_segments=8, set_loss=SetLossConfig(num_points=64),
                        annealing=Annealing((10, 40), (50, 90)))
    rng = np.random.default_rng(0)
    scenes = [generate_scene(SceneConfig(image_size=SIZE), i) for i in range(BATCH)]
    examples = [method.train_transform(dict(s, semantic=s["semantic"][..., None]), rng) for s in scenes]
    mesh = MeshConfig().make_mesh(jax.devices()[:1])
    trainer = Trainer(method, TrainConfig(total_steps=STEPS, batch_size=BATCH), tmp_path, [], mesh=mesh)
    init, _, shardings = trainer.abstract_state()
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        state = trainer.initial_state(init, shardings)
        batch = global_batch({k: np.stack([e[k] for e in examples]) for k in examples[0]}, mesh)
        step = trainer.make_step(shardings)
        losses = []
        with jax.transfer_guard("disallow"):
            for _ in range(STEPS):
                state, metrics = step(state, batch)
                losses.append(metrics["loss"])
    assert step._cache_size() == 1
    assert int(jax.device_get(state.step)) == STEPS
    assert np.isfinite(jax.device_get(losses)).all()
