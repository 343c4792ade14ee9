"""grain pipelines: determinism, resume, host slicing (training and evaluation), global arrays, worker
processes."""
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxseg import parallel
from jaxseg.data.pipeline import train_dataset
from jaxseg.evaluate import host_slices
from jaxseg.testing.limits import hang_guard

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = [{"image": np.full((4, 4, 3), i, np.uint8), "index": np.int32(i)} for i in range(23)]


def _augment(example, rng):
    return dict(example, noise=np.float32(rng.random()))


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_same_seed_same_batches_other_seed_other_order():
    first = _take(iter(train_dataset(SOURCE, _augment, seed=1, batch_size=4)), 8)
    again = _take(iter(train_dataset(SOURCE, _augment, seed=1, batch_size=4)), 8)
    other = _take(iter(train_dataset(SOURCE, _augment, seed=2, batch_size=4)), 8)
    assert _equal(first, again) and not _equal(first, other)
    # An epoch is a permutation: the first 20 examples (5 batches) hold 20 distinct indices.
    seen = np.concatenate([b["index"] for b in first[:5]])
    assert len(set(seen.tolist())) == 20


def test_resume_from_iterator_state_gives_the_same_next_batches():
    iterator = iter(train_dataset(SOURCE, _augment, seed=1, batch_size=4))
    _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 4)
    resumed = iter(train_dataset(SOURCE, _augment, seed=1, batch_size=4))
    resumed.set_state(state)
    assert _equal(_take(resumed, 4), expected)


def test_hosts_get_disjoint_shares_of_each_epoch():
    per_host = [np.concatenate([b["index"] for b in _take(iter(train_dataset(
        SOURCE, _augment, seed=1, batch_size=2, num_epochs=1, process_index=i, process_count=2)), 5)])
        for i in range(2)]
    assert not set(per_host[0].tolist()) & set(per_host[1].tolist())


def test_augmentation_follows_the_global_element_not_the_host_count():
    """Two hosts together see exactly the single host's elements with the same random draws (before, each
    host's j-th element shared one generator, so hosts drew identical crops and flips)."""
    single = _take(iter(train_dataset(SOURCE, _augment, seed=1, batch_size=4, num_epochs=1)), 5)
    one = {int(i): float(n) for b in single for i, n in zip(b["index"], b["noise"])}
    two = {}
    for host in range(2):
        for b in _take(iter(train_dataset(SOURCE, _augment, seed=1, batch_size=2, num_epochs=1,
                                          process_index=host, process_count=2)), 5):
            two.update({int(i): float(n) for i, n in zip(b["index"], b["noise"])})
    assert two == one
    assert len(set(one.values())) == len(one)


@pytest.mark.parametrize("hosts,batch", [(1, 5), (2, 4), (3, 4)])
def test_eval_covers_every_example_once_with_equal_batch_counts(hosts, batch):
    seen, counts = [], []
    for host in range(hosts):
        batches = host_slices(len(SOURCE), batch, host, hosts)
        counts.append(len(batches))
        # In order: every hosts-th example from the host's index, in full batches but the last ones.
        local = list(range(host, len(SOURCE), hosts))
        assert [i for b in batches for i in b] == local
        assert all(len(b) == batch for b in batches[:len(local) // batch])
        assert all(len(b) <= batch for b in batches)
        seen.extend(i for b in batches for i in b)
    assert sorted(seen) == list(range(len(SOURCE))) and len(set(counts)) == 1
    assert counts[0] == math.ceil(math.ceil(len(SOURCE) / hosts) / batch)


def test_global_batch_on_a_one_device_mesh():
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
    local = next(iter(train_dataset(SOURCE, _augment, seed=1, batch_size=4)))
    batch = parallel.global_batch(local, mesh)
    assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (4, 4, 4, 3)
    np.testing.assert_array_equal(batch["index"], local["index"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="empty"):
        train_dataset([], _augment, seed=0, batch_size=2)
    with pytest.raises(ValueError, match="process_index 2 is not in 0..1"):
        train_dataset(SOURCE, _augment, seed=0, batch_size=2, process_index=2, process_count=2)


def test_multiworker_batches_match_single_process(tmp_path):
    """2 grain worker processes give the single-process batches, and a 2-worker iterator restored from
    the state after 3 batches continues with the same next batches (`multiworker_check.py`)."""
    out = tmp_path / "batches.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE / "multiworker_check.py"), "--out", str(out)], env=env,
                          cwd=HERE, capture_output=True, text=True, timeout=hang_guard(300))
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = np.load(out)
    main_pid = int(runs["main_pid"])

    def batch(run, i):
        return {k.rsplit("/", 1)[1]: runs[k] for k in runs.files if k.startswith(f"{run}/{i}/")}

    singles = [batch("single", i) for i in range(6)]
    assert all((b["pid"] == main_pid).all() for b in singles)
    assert len({b["image"].tobytes() for b in singles}) == 6  # the batches are not trivially equal
    worker_pids = set()
    for i, expected in enumerate(singles):
        got = batch("multi", i)
        worker_pids.update(got.pop("pid").tolist())
        assert got.keys() == expected.keys() - {"pid"}
        for key in got:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"multi batch {i} {key}")
    assert len(worker_pids) == 2 and main_pid not in worker_pids
    for i, expected in enumerate(singles[3:]):
        got = batch("resumed", i)
        for key in got.keys() - {"pid"}:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"resumed batch {i} {key}")
