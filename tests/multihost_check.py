"""The real `Trainer` as one process of a local multi-process CPU run, or as its single-process reference.

    python multihost_check.py --out DIR --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I
    python multihost_check.py --out DIR --num-processes 2          # the reference: one process

Every run has 8 CPU devices in all (8 / N per process). For each task and mesh, a worker trains
`--steps` steps in `DIR/<task>_<mesh>/run` (checkpoints every `--checkpoint-every`), then copies that
run's first checkpoint into `DIR/<task>_<mesh>/resume` and trains that directory to the end again (the
resume path). It writes `process_<I>.json` (per-step losses of both runs, the device layout of the
parameters) and `process_<I>.npz` / `process_<I>_resumed.npz` (final parameters, gathered).

The reference trains one process on all 8 devices and writes `reference.json` / `reference.npz` (and
`initial.npz`, the parameters every run starts from). It must see the global batches the N processes
assemble: process i feeds elements i, i+N, ... of the augmented stream and the global array puts process
0's rows first, so a global batch holds the examples of the one-process batch of N x the size, but in
another row order, under which per-row randomness (EoMT's point sampling) and the order of sums would
differ. Hence the reference reads each process's own pipeline and concatenates their batches, as
`make_array_from_process_local_data` does.

`--tasks eomt` trains the tiny EoMT of `trainer_sharding_check.py`; its compilation makes one run take
~110 s on 2 cores, so the test uses the MLP only. `--eval-meshes` evaluates a tiny untrained WeakTr
(`cam_task`: CAM mIoU over a threshold sweep on 4 scenes, through the trainer's end-of-run evaluation,
params laid out by the mesh) into `DIR/cam_eval_<mesh>/process_<I>.json` or `reference.json`.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time

GLOBAL_DEVICES = 8


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--process-id", type=int, help="run as this process (default: the reference)")
    parser.add_argument("--coordinator", help="host:port of process 0's coordinator")
    parser.add_argument("--tasks", default="mlp", help="comma-separated: mlp, eomt")
    parser.add_argument("--meshes", default="dp,fsdp", help="comma-separated names in MESHES")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--eval-meshes", default="", help="comma-separated names in MESHES")
    return parser.parse_args()


ARGS = parse_args()
WORKER = ARGS.process_id is not None
# The device count is fixed when JAX's CPU backend starts, so it is set before JAX is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                           f"{GLOBAL_DEVICES // ARGS.num_processes if WORKER else GLOBAL_DEVICES}")
os.environ["JAX_PLATFORMS"] = "cpu"

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxseg import parallel  # noqa: E402
from jaxseg.data.pipeline import train_dataset  # noqa: E402
from jaxseg.data.synthetic import SceneConfig, generate_scene  # noqa: E402
from jaxseg.losses.mask_classification import SetLossConfig  # noqa: E402
from jaxseg.train.tasks import EomtTask  # noqa: E402
from jaxseg.train.trainer import TrainConfig, Trainer  # noqa: E402
from jaxseg.train.wsss_tasks import WeakTrCamTask  # noqa: E402

# "fsdp" splits parameters over the 4 devices of each process and the batch over both processes;
# "fsdp8" splits parameters over all 8 devices, so each process holds only half of every split array.
MESHES = {"dp": (("data", -1), ("fsdp", 1), ("tensor", 1)),
          "fsdp": (("data", 2), ("fsdp", 4), ("tensor", 1)),
          "fsdp8": (("data", 1), ("fsdp", 8), ("tensor", 1))}
BATCH_PER_PROCESS = 4


class TinyMlp(nn.Module):
    """A residual MLP block with the ViT's logical parameter axes, so that FSDP splits `embed`."""

    @nn.compact
    def __call__(self, x):
        def dense(features, axes, name):
            return nn.Dense(features, name=name,
                            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))
        h = dense(16, (None, "embed"), "stem")(x)
        h = h + dense(16, ("mlp", "embed"), "fc2")(nn.gelu(dense(64, ("embed", "mlp"), "fc1")(h)))
        return dense(1, ("embed", None), "head")(h)[..., 0]


@dataclasses.dataclass
class MlpTask:
    source: list
    batch_size: int

    def __post_init__(self):
        self.network = TinyMlp()

    def init_params(self, rng):
        return self.network.init(rng, jnp.zeros((1, 8)))["params"]

    def optimizer(self, params):
        return optax.sgd(0.02, momentum=0.9)

    def loss(self, params, batch, rng, step):
        error = self.network.apply({"params": params}, batch["x"]) - batch["y"]
        return jnp.mean(error ** 2), {"mae": jnp.mean(jnp.abs(error))}

    def transform(self, example, rng):
        return example

    def train_data(self, seed):
        return iter(train_dataset(self.source, self.transform, seed=seed, batch_size=self.batch_size))


def mlp_source():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = np.sin(x @ rng.standard_normal(8).astype(np.float32))
    return [{"x": xi, "y": yi} for xi, yi in zip(x, y)]


class SgdEomtTask(EomtTask):
    """The EoMT of `trainer_sharding_check.py` with plain SGD (Adam would blow round-off in near-zero
    gradients up to full-size steps)."""

    def optimizer(self, params):
        return optax.sgd(0.1)


def eomt_task(batch_size):
    scenes = [generate_scene(SceneConfig(image_size=32), i) for i in range(16)]
    model = dict(encoder=dict(width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=8, posemb_grid=(4, 4),
                              num_registers=4, posemb_covers_prefix=False),
                 num_classes=9, num_queries=8, num_query_blocks=1)
    # Masking fully annealed, as in trainer_sharding_check.py: a mask thresholded at 0 would turn
    # round-off of another reduction order into different attention masks.
    return SgdEomtTask(model=model, source=[dict(s, semantic=s["semantic"][..., None]) for s in scenes],
                       total_steps=30, batch_size=batch_size, crop_size=32, scale_range=(0.9, 1.1),
                       warmup=(2, 2), clip_norm=1.0, loss_config=SetLossConfig(num_points=256),
                       annealing_windows=([-2], [-1]))


TASKS = {"mlp": lambda: MlpTask(mlp_source(), BATCH_PER_PROCESS), "eomt": lambda: eomt_task(BATCH_PER_PROCESS)}


class AsOneProcess:
    """`task` training on the global batches that `num_processes` processes would assemble."""

    def __init__(self, task, num_processes):
        self.task, self.num_processes = task, num_processes

    def __getattr__(self, name):
        return getattr(self.task, name)

    def train_data(self, seed):
        per_process = [train_dataset(self.task.source, self.task.transform, seed=seed,
                                     batch_size=self.task.batch_size, process_index=i,
                                     process_count=self.num_processes) for i in range(self.num_processes)]
        concatenate = lambda batches: jax.tree_util.tree_map(lambda *rows: np.concatenate(rows), *batches)
        return iter(grain.experimental.ZipIterDataset(per_process).map(concatenate))


def cam_task():
    """A tiny WeakTr stage 1 whose evaluation is a CAM mIoU curve over 18 thresholds: continuous in the
    CAM values, so nonzero and sensitive even for an untrained model."""
    scenes = [generate_scene(SceneConfig(image_size=32), i) for i in range(8)]
    scenes = [dict(s, semantic=s["semantic"][..., None]) for s in scenes]  # as TFDS gives them
    encoder = dict(width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=8, posemb_grid=(4, 4),
                   num_cls_tokens=6, final_norm=False, posemb_resize="dino")
    return WeakTrCamTask(model=dict(encoder=encoder, num_classes=6, reduction=2), source=scenes[:4],
                         total_steps=1, steps_per_epoch=1, batch_size=BATCH_PER_PROCESS, crop_size=32, lr=1e-3,
                         eval_source=scenes[4:])


def evaluate_untrained(mesh, workdir):
    trainer = Trainer(cam_task(), TrainConfig(total_steps=0, mesh=MESHES[mesh]), workdir)
    trainer.run()
    return trainer.eval_results


def train(task, mesh, workdir, steps=ARGS.steps):
    config = TrainConfig(total_steps=steps, log_every=1, checkpoint_every=ARGS.checkpoint_every,
                         mesh=MESHES[mesh])
    started = time.perf_counter()
    trainer = Trainer(task, config, workdir)
    params = trainer.run().params
    print(f"process {jax.process_index()}: {workdir.parent.name}/{workdir.name} trained in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return [m["loss"] for m in trainer.history], params


def save_params(params, path):
    # Gathering works whether or not each process holds whole arrays (fsdp8 splits them across processes).
    gathered = multihost_utils.process_allgather(params, tiled=True)
    np.savez(path, **flax.traverse_util.flatten_dict(jax.device_get(gathered), sep="/"))


def layout(params):
    """Per parameter: the share of its elements on this process's devices, and in how many distinct
    pieces (replicas on several local devices count once)."""
    result = {}
    for name, leaf in flax.traverse_util.flatten_dict(params, sep="/").items():
        held = {tuple((s.start, s.stop) for s in shard.index): shard.data.size
                for shard in leaf.addressable_shards}
        result[name] = {"local_fraction": sum(held.values()) / leaf.size, "local_shards": len(held)}
    return result


def main():
    if WORKER:
        parallel.initialize(coordinator_address=ARGS.coordinator, num_processes=ARGS.num_processes,
                               process_id=ARGS.process_id)
    assert jax.device_count() == GLOBAL_DEVICES and jax.process_count() == (ARGS.num_processes if WORKER else 1)
    for mesh in filter(None, ARGS.eval_meshes.split(",")):
        out = ARGS.out / f"cam_eval_{mesh}"
        name = f"process_{ARGS.process_id}" if WORKER else "reference"
        results = evaluate_untrained(mesh, out / name)
        (out / f"{name}.json").write_text(json.dumps(results))
    for task_name in filter(None, ARGS.tasks.split(",")):
        for mesh in ARGS.meshes.split(","):
            out = ARGS.out / f"{task_name}_{mesh}"
            out.mkdir(parents=True, exist_ok=True)
            if not WORKER:
                task = AsOneProcess(TASKS[task_name](), ARGS.num_processes)
                losses, params = train(task, mesh, out / "reference")
                save_params(params, out / "reference.npz")
                # All runs start from these (same seed), so differences can be measured on the updates.
                _, initial = train(task, mesh, out / "initial", steps=0)
                save_params(initial, out / "initial.npz")
                (out / "reference.json").write_text(json.dumps({"losses": losses}))
                continue
            losses, params = train(TASKS[task_name](), mesh, out / "run")
            save_params(params, out / f"process_{ARGS.process_id}.npz")
            result = {"losses": losses, "layout": layout(params)}
            if jax.process_index() == 0:
                shutil.copytree(out / "run" / "checkpoints" / str(ARGS.checkpoint_every),
                                out / "resume" / "checkpoints" / str(ARGS.checkpoint_every))
            multihost_utils.sync_global_devices(f"{task_name}_{mesh} checkpoint copied")
            result["resumed_losses"], params = train(TASKS[task_name](), mesh, out / "resume")
            save_params(params, out / f"process_{ARGS.process_id}_resumed.npz")
            (out / f"process_{ARGS.process_id}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
