"""The training loop on a toy method: it learns, resumes bit-exactly, and stops on a non-finite loss."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg.train.trainer import NonFiniteLossError, TrainConfig, Trainer, progress_line

W_TRUE = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
SOURCE = [{"x": x, "y": np.float32(x @ W_TRUE)}
          for x in np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)]


class ToyMethod:
    def __init__(self, nan_at_step=None):
        self.nan_at_step = nan_at_step

    def init_params(self, rng):
        return {"w": jax.random.normal(rng, (4,)) * 0.01}

    def optimizer_for(self, params):
        return optax.adam(0.05)

    def loss(self, params, batch, rng, step):
        noise = 0.01 * jax.random.normal(rng, batch["y"].shape)
        loss = jnp.mean((batch["x"] @ params["w"] - batch["y"] - noise) ** 2)
        if self.nan_at_step is not None:
            loss = jnp.where(step == self.nan_at_step, jnp.nan, loss)
        return loss, {"mae": jnp.mean(jnp.abs(batch["x"] @ params["w"] - batch["y"]))}

    def train_transform(self, example, rng):  # the data order and this noise must both resume exactly
        return dict(example, x=example["x"] + np.float32(0.001 * rng.standard_normal()))


def _losses(workdir):
    return [json.loads(line)["loss"] for line in (workdir / "train_metrics.jsonl").read_text().splitlines()]


def _trainer(method, workdir, **config):
    return Trainer(method, TrainConfig(batch_size=8, **config), workdir, SOURCE)


def test_loss_falls(tmp_path):
    _trainer(ToyMethod(), tmp_path, total_steps=150, log_every=10, checkpoint_every=1000).run()
    losses = _losses(tmp_path)
    assert losses[-1] < 0.01 * losses[0], losses


def test_resume_is_bit_exact(tmp_path):
    straight = _trainer(ToyMethod(), tmp_path / "a", total_steps=20, log_every=1, checkpoint_every=10).run()
    _trainer(ToyMethod(), tmp_path / "b", total_steps=10, log_every=1, checkpoint_every=10).run()
    resumed = _trainer(ToyMethod(), tmp_path / "b", total_steps=20, log_every=1, checkpoint_every=10).run()
    np.testing.assert_array_equal(resumed.params["w"], straight.params["w"])
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # identical curves, data order included


def test_a_resume_after_a_kill_logs_each_step_once_and_says_where_it_resumed(tmp_path, capsys):
    """Killed after logging step 15 with the last checkpoint at step 10 (the one at 15 is removed, as if the
    kill came before it): the rerun replays 11-15, and the metrics log keeps each step once, equal to a
    straight run; the console names the checkpoint, and the speed and ETA wait for a measured step."""
    import shutil

    _trainer(ToyMethod(), tmp_path / "a", total_steps=20, log_every=1, checkpoint_every=10).run()
    _trainer(ToyMethod(), tmp_path / "b", total_steps=15, log_every=1, checkpoint_every=10).run()
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "15")
    capsys.readouterr()
    _trainer(ToyMethod(), tmp_path / "b", total_steps=20, log_every=1, checkpoint_every=10).run()
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "train_metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"resumed from step 10 (checkpoint {(tmp_path / 'b' / 'checkpoints' / '10').absolute()})"
    assert err[1].startswith("[===========>        ] 11/20  55% | -- steps/s, -- img/s, ETA --"), err[1]
    assert "ETA 0:" in err[2], err[2]


def test_non_finite_loss_stops_with_the_step_and_saves_the_batch(tmp_path):
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        _trainer(ToyMethod(nan_at_step=3), tmp_path, total_steps=10, log_every=1).run()
    saved = np.load(tmp_path / "nonfinite_batch_step3.npz")
    assert saved["x"].shape == (8, 4)


class NestedToyMethod(ToyMethod):
    """The toy model inside a bigger tree, as an encoder inside a segmentation model."""

    def init_params(self, rng):
        return {"encoder": super().init_params(rng), "head": {"b": jnp.zeros(())}}

    def loss(self, params, batch, rng, step):
        loss, metrics = super().loss(params["encoder"], batch, rng, step)
        return loss + params["head"]["b"] ** 2, metrics


class FrozenToyMethod(ToyMethod):
    """Never moves its parameters: a run of it ends with the parameters it started from (TrainConfig
    requires total_steps >= 1, so a run cannot be zero steps long)."""

    def optimizer_for(self, params):
        return optax.set_to_zero()


class FrozenNestedToyMethod(FrozenToyMethod, NestedToyMethod):
    pass


def test_fresh_run_starts_from_an_init_checkpoint_subtree(tmp_path):
    pretrained = _trainer(ToyMethod(), tmp_path / "pre", total_steps=30, checkpoint_every=30).run()
    state = _trainer(FrozenNestedToyMethod(), tmp_path / "fine", total_steps=1,
                     init_checkpoint=str(tmp_path / "pre"), init_into="encoder").run()
    np.testing.assert_array_equal(state.params["encoder"]["w"], pretrained.params["w"])
    assert float(state.params["head"]["b"]) == 0.0


def test_fresh_run_starts_from_a_subtree_of_another_run(tmp_path):
    """`init_from` takes the encoder of a run of another model (as a WeakTr run's ViT for EoMT)."""
    pretrained = _trainer(NestedToyMethod(), tmp_path / "pre", total_steps=30, checkpoint_every=30).run()
    state = _trainer(FrozenToyMethod(), tmp_path / "fine", total_steps=1, init_checkpoint=str(tmp_path / "pre"),
                     init_from="encoder").run()
    np.testing.assert_array_equal(state.params["w"], pretrained.params["encoder"]["w"])
    with pytest.raises(KeyError, match=r"init_from='decoder'.*has no 'decoder' \(there: \['encoder', 'head'\]\)"):
        _trainer(FrozenToyMethod(), tmp_path / "fine2", total_steps=1, init_checkpoint=str(tmp_path / "pre"),
                 init_from="decoder").run()


def test_init_checkpoint_of_another_model_names_the_differences(tmp_path):
    _trainer(ToyMethod(), tmp_path / "pre", total_steps=2, checkpoint_every=2).run()
    config = TrainConfig(total_steps=1, batch_size=8, init_checkpoint=str(tmp_path / "pre"))
    with pytest.raises(ValueError, match=r"missing.*encoder/w|unexpected.*\bw\b"):
        Trainer(NestedToyMethod(), config, tmp_path / "fine", SOURCE).run()
    with pytest.raises(KeyError, match="'decoder' is not one of"):
        Trainer(NestedToyMethod(), dataclasses.replace(config, init_into="decoder"), tmp_path / "fine2",
                SOURCE).run()


def test_progress_line_shows_rate_and_eta():
    assert progress_line(120, 300, 3.1, 24.8) == (
        "[========>           ] 120/300  40% | 3.10 steps/s, 24.8 img/s, ETA 0:00:58")
    assert progress_line(1, 300, None, None) == "[>                   ] 1/300   0% | -- steps/s, -- img/s, ETA --"
