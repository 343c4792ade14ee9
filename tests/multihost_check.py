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
~110 s on 2 cores, so the test uses the MLP only. `--eval-meshes` evaluates, through the trainer's
end-of-run evaluation with the params laid out by the mesh, a tiny untrained EoMT (panoptic and semantic,
fixed-shape global batches of 5 scenes; the panoptic score threshold at 0 so that an untrained model
forms segments) and a tiny untrained WeakTr (CAM mIoU over a threshold sweep on 5 scenes, each host on
its own devices), into `DIR/eval_<mesh>/process_<I>.json` or `reference.json`, with the indices of the
images each process predicted.
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
from jaxseg.data.datasets import DataConfig  # noqa: E402
from jaxseg.data.pipeline import train_dataset  # noqa: E402
from jaxseg.data.synthetic import SceneConfig, generate_scene  # noqa: E402
from jaxseg.evaluate import EvalConfig, build_evaluator  # noqa: E402
from jaxseg.losses.mask_classification import SetLossConfig  # noqa: E402
from jaxseg.methods.eomt import Annealing, EomtMethod, EomtOptimizer  # noqa: E402
from jaxseg.methods.weaktr import WeakTrMethod, WeakTrOptimizer  # noqa: E402
from jaxseg.parallel import MeshConfig  # noqa: E402
from jaxseg.train.trainer import Evaluation, TrainConfig, Trainer  # noqa: E402

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
class MlpMethod:
    def __post_init__(self):
        self.network = TinyMlp()

    def init_params(self, rng):
        return self.network.init(rng, jnp.zeros((1, 8)))["params"]

    def optimizer_for(self, params):
        return optax.sgd(0.02, momentum=0.9)

    def loss(self, params, batch, rng, step):
        error = self.network.apply({"params": params}, batch["x"]) - batch["y"]
        return jnp.mean(error ** 2), {"mae": jnp.mean(jnp.abs(error))}

    def train_transform(self, example, rng):
        return example


def mlp_source():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = np.sin(x @ rng.standard_normal(8).astype(np.float32))
    return [{"x": xi, "y": yi} for xi, yi in zip(x, y)]


def scenes(count: int) -> list[dict]:
    return [dict(s, semantic=s["semantic"][..., None])  # as TFDS gives them
            for s in (generate_scene(SceneConfig(image_size=32), i) for i in range(count))]


class SgdEomtMethod(EomtMethod):
    """The EoMT of `trainer_sharding_check.py` with plain SGD (Adam would blow round-off in near-zero
    gradients up to full-size steps)."""

    def optimizer_for(self, params):
        return optax.sgd(0.1)


def eomt_method():
    model = dict(encoder=dict(width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=8, posemb_grid=(4, 4),
                              num_registers=4, posemb_covers_prefix=False),
                 num_classes=9, num_queries=8, num_query_blocks=1)
    # Masking fully annealed, as in trainer_sharding_check.py: a mask thresholded at 0 would turn
    # round-off of another reduction order into different attention masks.
    return SgdEomtMethod(model=model, optimizer=EomtOptimizer(), total_steps=30, batch_size=BATCH_PER_PROCESS,
                         data=DataConfig(name="jaxseg_scenes"), crop_size=32, scale_range=(0.9, 1.1),
                         num_things=6, set_loss=SetLossConfig(num_points=256), annealing=Annealing((-2,), (-1,)))


TASKS = {"mlp": lambda: (MlpMethod(), mlp_source()), "eomt": lambda: (eomt_method(), scenes(16))}


class OneProcessTrainer(Trainer):
    """Training on the global batches that `num_processes` processes would assemble."""

    num_processes = ARGS.num_processes

    def train_data(self):
        per_process = [train_dataset(self.train_source, self.method.train_transform, seed=self.config.seed,
                                     batch_size=self.config.batch_size, process_index=i,
                                     process_count=self.num_processes) for i in range(self.num_processes)]
        concatenate = lambda batches: jax.tree_util.tree_map(lambda *rows: np.concatenate(rows), *batches)
        return iter(grain.experimental.ZipIterDataset(per_process).map(concatenate))


def cam_method():
    encoder = dict(width=64, depth=2, num_heads=4, mlp_dim=256, patch_size=8, posemb_grid=(4, 4),
                   num_cls_tokens=6, final_norm=False, posemb_resize="dino")
    return WeakTrMethod(model=dict(encoder=encoder, num_classes=6, reduction=2), optimizer=WeakTrOptimizer(),
                        total_steps=1, batch_size=BATCH_PER_PROCESS, data=DataConfig(name="jaxseg_scenes"),
                        crop_size=32)


def evaluate_untrained(mesh_name, workdir):
    """The trainer's end-of-run evaluation of an untrained EoMT and WeakTr: {name: results} and the indices
    each predicted here."""
    mesh = MeshConfig(MESHES[mesh_name]).make_mesh()
    eomt, cam = eomt_method(), cam_method()
    evals = {"eomt": (eomt, EvalConfig(split="validation", predictor=dict(kind="panoptic", score_threshold=0.0),
                                       metrics={"panoptic": {}, "semantic": {}}, batch_size=2)),
             "cam": (cam, EvalConfig(split="validation", predictor=dict(kind="cams", refine=True),
                                     metrics={"cam_sweep": {}}, batch_size=2))}
    results, predicted = {}, {}
    for name, (method, config) in evals.items():
        source = scenes(13)[8:]
        evaluator = build_evaluator(method, config, mesh=mesh)
        indices = []
        original = evaluator.run

        def run(params, source, original=original, indices=indices):
            return original(params, source, on_prediction=lambda index, example, prediction: indices.append(index))
        evaluator.run = run
        trainer = Trainer(method, TrainConfig(total_steps=0), workdir / name, scenes(4), mesh=mesh,
                          evaluations={"val": Evaluation(evaluator, source)})
        trainer.run()
        results[name] = trainer.eval_results["val"]
        predicted[name] = sorted(int(i) for i in indices)
    return {"results": results, "predicted": predicted}


def train(method, source, mesh, workdir, steps=ARGS.steps, reference=False):
    config = TrainConfig(total_steps=steps, batch_size=BATCH_PER_PROCESS, log_every=1,
                         checkpoint_every=ARGS.checkpoint_every)
    started = time.perf_counter()
    trainer = (OneProcessTrainer if reference else Trainer)(method, config, workdir, source,
                                                            mesh=MeshConfig(MESHES[mesh]).make_mesh())
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
        out = ARGS.out / f"eval_{mesh}"
        name = f"process_{ARGS.process_id}" if WORKER else "reference"
        results = evaluate_untrained(mesh, out / name)
        (out / f"{name}.json").write_text(json.dumps(results))
    for task_name in filter(None, ARGS.tasks.split(",")):
        for mesh in ARGS.meshes.split(","):
            out = ARGS.out / f"{task_name}_{mesh}"
            out.mkdir(parents=True, exist_ok=True)
            if not WORKER:
                losses, params = train(*TASKS[task_name](), mesh, out / "reference", reference=True)
                save_params(params, out / "reference.npz")
                # All runs start from these (same seed), so differences can be measured on the updates.
                _, initial = train(*TASKS[task_name](), mesh, out / "initial", steps=0)
                save_params(initial, out / "initial.npz")
                (out / "reference.json").write_text(json.dumps({"losses": losses}))
                continue
            losses, params = train(*TASKS[task_name](), mesh, out / "run")
            save_params(params, out / f"process_{ARGS.process_id}.npz")
            result = {"losses": losses, "layout": layout(params)}
            if jax.process_index() == 0:
                shutil.copytree(out / "run" / "checkpoints" / str(ARGS.checkpoint_every),
                                out / "resume" / "checkpoints" / str(ARGS.checkpoint_every))
            multihost_utils.sync_global_devices(f"{task_name}_{mesh} checkpoint copied")
            result["resumed_losses"], params = train(*TASKS[task_name](), mesh, out / "resume")
            save_params(params, out / f"process_{ARGS.process_id}_resumed.npz")
            (out / f"process_{ARGS.process_id}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
