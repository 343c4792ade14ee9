"""One evaluator for every method, split, metric and number of hosts.

Each host takes its own slice of the split (every process_count-th image) and runs it in padded batches of
`batch_size` images; every host runs the same number of batches, the padding is marked invalid and
dropped. Per batch, one compiled program predicts and computes each metric's sums (`stats`); the host adds
them to its accumulators, and at the end the accumulators of all hosts are merged, in host order, so that
every host holds the same result.

Two ways to batch, chosen by the predictor:
  fixed shape  (`predictor.fixed_shape`): `prepare` pads every image to one canvas, so the batch is a
               global array over the whole mesh and the parameters stay in their training shardings (a
               model too big for one device evaluates as it trains);
  own shape    a model whose input size follows the image (WeakTr's multi-scale CAMs at each image's
               size): each host runs its slice on its own devices, consecutive images of one shape
               batched together, with the parameters gathered once onto every host.

The predictor (`jaxseg.methods.base.Predictor`) turns an example into arrays (`prepare`), a batch into
outputs inside jit (`predict`), and one image's outputs into its prediction at its own size (`finish`, only
when predictions are asked for: tools/predict.py, pseudo-label writing). Metrics:
`jaxseg.metrics.accumulators`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxseg import parallel
from jaxseg.config import check_rules, setting
from jaxseg.errors import UserError
from jaxseg.metrics.accumulators import Metric

# (source index, example, prediction) of one image, on the host that predicted it.
PredictionCallback = Callable[[int, dict, dict], None]


def host_slices(num_examples: int, batch_size: int, process_index: int, process_count: int) -> list[list[int]]:
    """This host's batches of source indices: every process_count-th example from `process_index`, cut into
    ceil(ceil(n / hosts) / batch_size) batches on every host (the last ones short or empty)."""
    local = list(range(process_index, num_examples, process_count))
    count = math.ceil(math.ceil(num_examples / process_count) / batch_size)
    return [local[b * batch_size:(b + 1) * batch_size] for b in range(count)]


def _stack(items: Sequence[dict]) -> dict:
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *items)


def _local_rows(array: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array that this host fed, in its order."""
    if array.is_fully_addressable:
        return np.asarray(array)
    shards = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def merge_across_hosts(metrics: Mapping[str, Metric]) -> dict[str, Metric]:
    """Every host's accumulators merged in host order (the same totals, bit for bit, on every host)."""
    if jax.process_count() == 1:
        return dict(metrics)
    payload = np.frombuffer(pickle.dumps(dict(metrics)), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([payload.size], np.int64))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:payload.size] = payload
    gathered = multihost_utils.process_allgather(padded)
    per_host = [pickle.loads(gathered[i, :int(lengths[i, 0])].tobytes()) for i in range(jax.process_count())]
    merged = per_host[0]
    for other in per_host[1:]:
        for name, metric in merged.items():
            metric.merge(other[name])
    return merged


class Evaluator:
    """`run(params, source)` -> the metrics' results over every example of `source` (see the module
    docstring). `metrics` maps names to fresh accumulators (`make_metrics()` builds new ones per run)."""

    def __init__(self, predictor, make_metrics: Callable[[], Mapping[str, Metric]], *, batch_size: int = 8,
                 mesh: jax.sharding.Mesh | None = None, rules: parallel.LogicalRules = parallel.DEFAULT_RULES):
        if batch_size < 1:
            raise UserError(f"evaluation batch_size must be at least 1, got {batch_size}")
        self.predictor, self.make_metrics = predictor, make_metrics
        self.mesh = mesh if mesh is not None else parallel.MeshConfig().make_mesh()
        self.rules = rules
        if predictor.fixed_shape:  # whole batch parts per device (the padding is dropped anyway)
            per_host = max(parallel.batch_partitions(self.mesh, rules) // jax.process_count(), 1)
            batch_size = -(-batch_size // per_host) * per_host
        self.batch_size = batch_size
        probe = make_metrics()
        self._programs = {with_outputs: jax.jit(self._program(probe, with_outputs)) for with_outputs in (False, True)}

    def _program(self, metrics: Mapping[str, Metric], with_outputs: bool):
        def program(params, batch):
            outputs = self.predictor.predict(params, batch["inputs"])
            stats = {name: jax.vmap(metric.stats)(outputs, batch["targets"][name]) for name, metric in metrics.items()}
            return (outputs, stats) if with_outputs else (None, stats)
        return program

    def _prepare(self, example: dict, metrics: Mapping[str, Metric]) -> dict:
        canvas = self.predictor.canvas(example)
        target = self.predictor.targets(example) if metrics else {}
        return {"inputs": self.predictor.prepare(example),
                "targets": {name: metric.targets(target, canvas) for name, metric in metrics.items()}}

    def run(self, params: Any, source: Sequence[dict], on_prediction: PredictionCallback | None = None) -> dict:
        if len(source) == 0:
            raise UserError("the evaluation source is empty")
        metrics = dict(self.make_metrics())
        batches = self._fixed_shape_batches if self.predictor.fixed_shape else self._own_shape_batches
        for indices, examples, valid, (outputs, stats) in batches(params, source, metrics, on_prediction is not None):
            stats = jax.tree_util.tree_map(lambda x, valid=valid: x[valid], stats)
            for name, metric in metrics.items():
                metric.update(stats[name])
            if on_prediction is not None:
                for row in np.flatnonzero(valid):
                    one = jax.tree_util.tree_map(lambda x, row=row: x[row], outputs)
                    on_prediction(indices[row], examples[row], self.predictor.finish(one, examples[row]))
        results = {"examples": len(source)}
        for metric in merge_across_hosts(metrics).values():
            results.update(metric.result())
        return results

    def _prefetched(self, batches: Sequence[list[int]], source, metrics) -> Iterator[tuple]:
        """(indices, examples, valid, prepared batch) of each batch, the next one prepared in a thread
        while the current one runs."""
        filler = next((b[0] for b in batches if b), 0)

        def load(indices: list[int]):
            padded = list(indices) + [filler] * (self.batch_size - len(indices))
            examples = [source[i] for i in padded]
            prepared = _stack([self._prepare(e, metrics) for e in examples])
            return indices, examples, np.arange(self.batch_size) < len(indices), prepared

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(load, batches[0]) if batches else None
            for b in range(len(batches)):
                current = pending.result()
                pending = pool.submit(load, batches[b + 1]) if b + 1 < len(batches) else None
                yield current

    def _fixed_shape_batches(self, params, source, metrics, with_outputs: bool):
        batches = host_slices(len(source), self.batch_size, jax.process_index(), jax.process_count())
        program = self._programs[with_outputs]
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for indices, examples, valid, prepared in self._prefetched(batches, source, metrics):
                outputs, stats = program(params, parallel.global_batch(prepared, self.mesh, self.rules))
                yield indices, examples, valid, jax.tree_util.tree_map(_local_rows, (outputs, stats))

    def _own_shape_batches(self, params, source, metrics, with_outputs: bool):
        # Each host runs alone, on its first device, under a mesh of that device only: it needs all of
        # the parameters there (placed under that mesh, so that they carry no trace of the global one).
        device = jax.local_devices()[0]
        mesh = jax.sharding.Mesh(np.asarray([device]).reshape((1,) * len(self.mesh.axis_names)), self.mesh.axis_names)
        params = (multihost_utils.process_allgather(params, tiled=True) if jax.process_count() > 1
                  else jax.device_get(params))
        with jax.set_mesh(mesh):
            params = jax.device_put(params, device)
        slices = host_slices(len(source), 1, jax.process_index(), jax.process_count())
        program = self._programs[with_outputs]
        group: list[tuple[int, dict, dict]] = []

        def flush():
            indices, examples, prepared = zip(*group)
            with jax.set_mesh(mesh), nn.logical_axis_rules(self.rules):
                result = jax.device_get(program(params, jax.device_put(_stack(prepared), device)))
            group.clear()
            return list(indices), list(examples), np.ones(len(indices), bool), result

        for index in (s[0] for s in slices if s):
            example = source[index]
            prepared = self._prepare(example, metrics)
            shapes = jax.tree_util.tree_map(np.shape, prepared)
            if group and (len(group) == self.batch_size or shapes != jax.tree_util.tree_map(np.shape, group[0][2])):
                yield flush()
            group.append((index, example, prepared))
        if group:
            yield flush()


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """A config's `evals.<name>` section: the dataset `split`, the `predictor` ({"kind": a predictor of the
    method, settings...}), the `metrics` ({metric kind: settings}), the cadence `every` (steps; 0: at the
    end of training only) and the per-host `batch_size`."""
    split: str
    predictor: dict
    metrics: dict
    every: int = setting(0, ">= 0")
    batch_size: int = setting(8, ">= 1")

    def __post_init__(self):
        check_rules(self)
        if "kind" not in self.predictor:
            raise UserError(f"an evaluation's predictor section needs a 'kind', got {self.predictor}")


def build_evaluator(method, config: EvalConfig, *, mesh: jax.sharding.Mesh | None = None,
                    rules: parallel.LogicalRules = parallel.DEFAULT_RULES, **predictor_settings) -> Evaluator:
    """The evaluator of one configured evaluation; `predictor_settings` override the config's."""
    settings = {**config.predictor, **predictor_settings}
    predictor = method.predictor(settings.pop("kind"), **settings)
    metric_settings = {kind: dict(values or {}) for kind, values in config.metrics.items()}

    def make_metrics():
        return {kind: method.metric(kind, **values) for kind, values in metric_settings.items()}
    return Evaluator(predictor, make_metrics, batch_size=config.batch_size, mesh=mesh, rules=rules)
