"""Run as a subprocess: the training pipeline with 0 and with 2 worker processes, and the 2-worker
pipeline resumed from its iterator state after 3 batches. Writes every batch to an .npz.

    python multiworker_check.py --out FILE.npz

It is an `absl.app.run` script because grain's worker processes (`mp_prefetch`) read absl flags that the
parent must have parsed. grain ships the pipeline to its spawned workers with cloudpickle: `augment` is a
module-level function of this script, which cloudpickle sends by value (the script runs as `__main__`),
and the jaxseg functions it calls travel by reference and are imported in the workers.

The .npz holds `<run>/<batch>/<key>` for the runs "single" (6 batches), "multi" (6 batches) and
"resumed" (the 3 batches after the restore), and `main_pid`. Each example's `pid` names the process that
augmented it, to show that the workers did the work; it is the only key allowed to differ between runs.
"""
import json
import os

import numpy as np
from absl import app, flags

from jaxseg.data.augment import mmseg
from jaxseg.data.pipeline import train_dataset

_OUT = flags.DEFINE_string("out", None, "where to write the batches (.npz)")

NUM_BATCHES, RESUME_AFTER = 6, 3


def augment(example: dict, rng: np.random.Generator) -> dict:
    out = mmseg.weaktr_stage2_example(example, rng, crop=32, base=36)
    return dict(out, index=example["index"], pid=np.int32(os.getpid()))


def make_source() -> list[dict]:
    # 13 examples in batches of 4: the second epoch starts inside the fourth batch.
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (36, 44, 3), np.uint8),
             "semantic": rng.integers(0, 3, (36, 44), np.uint8), "index": np.int32(i)} for i in range(13)]


def main(argv):
    del argv
    source = make_source()

    def dataset(worker_count):
        return train_dataset(source, augment, seed=7, batch_size=4, worker_count=worker_count)

    def take(iterator, n):
        return [next(iterator) for _ in range(n)]

    runs = {"single": take(iter(dataset(0)), NUM_BATCHES)}
    iterator = iter(dataset(2))
    runs["multi"] = take(iterator, RESUME_AFTER)
    # Through JSON, as a checkpoint stores it.
    state = json.loads(json.dumps(iterator.get_state()))
    runs["multi"] += take(iterator, NUM_BATCHES - RESUME_AFTER)
    iterator.close()
    resumed = iter(dataset(2))
    resumed.set_state(state)
    runs["resumed"] = take(resumed, NUM_BATCHES - RESUME_AFTER)
    resumed.close()

    arrays = {f"{run}/{i}/{key}": value for run, batches in runs.items()
              for i, batch in enumerate(batches) for key, value in batch.items()}
    np.savez(_OUT.value, main_pid=os.getpid(), **arrays)


if __name__ == "__main__":
    flags.mark_flag_as_required("out")
    app.run(main)
