"""Pieces of the methods' optax recipes: AdamW with per-parameter learning-rate multipliers (layer-wise
decay, regex groups) and per-group schedules. The recipes themselves live with their methods
(`jaxseg.methods.<name>`).

The update of a parameter p in group g is torch AdamW's: p <- p - lr_g(t) * m_p * (adam(p) + wd * p),
with lr_g the group's schedule and m_p its multiplier. Frozen phases are schedules at 0: the Adam moments
keep accumulating (as EoMT's frozen-backbone warm-up does), only the step is zero. Frozen groups
(`adamw_groups(frozen=...)`) are different: their parameters get no update and no optimizer state at all.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from jaxseg.errors import UserError

Schedule = Callable[[jax.Array], jax.Array]


def warmup_poly(base_lr: float, total_steps: int, warmup_steps: int, *, frozen_steps: int = 0,
                power: float = 0.9) -> Schedule:
    """0 for `frozen_steps`, a linear warm-up 0 -> base_lr over the next `warmup_steps`, then
    base_lr * (1 - (t - s) / (T - s))^power with s = frozen + warm-up (EoMT's TwoStageWarmupPolySchedule:
    heads use (0, 500), the backbone (500, 1000))."""
    start = frozen_steps + warmup_steps
    if total_steps <= start:
        raise UserError(f"train.total_steps {total_steps} must exceed the frozen + warm-up steps {start} "
                        f"(optimizer.warmup)")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = base_lr * (step - frozen_steps) / max(warmup_steps, 1)
        decay = base_lr * jnp.maximum(1.0 - (step - start) / (total_steps - start), 0.0) ** power
        return jnp.where(step < frozen_steps, 0.0, jnp.where(step < start, warm, decay))
    return schedule


def warmup_cosine(lr: float, min_lr: float, warmup_share: float, total_steps: int) -> optax.Schedule:
    """A linear warm-up 0 -> lr over the first `warmup_share` of the steps, then a half-cycle cosine to
    `min_lr` (MAE's and DINO's per-step schedules)."""
    total_steps = max(total_steps, 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, int(warmup_share * total_steps), total_steps,
                                              end_value=min_lr)


def decays_weights_only(params) -> dict:
    """True where timm's `add_weight_decay` decays a parameter: not a bias and not 1-D (norm scales,
    biases and class tokens kept out, as MAE and DINO group their parameters)."""
    return jax.tree_util.tree_map(lambda name, p: not name.endswith("bias") and jnp.ndim(p) > 1,
                                  path_names(params), params)


def path_names(params) -> dict:
    """A tree like `params` holding each leaf's "a/b/c" name."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return flax.traverse_util.unflatten_dict({k: k for k in flat}, sep="/")


def layer_decay(params, depth: int, decay: float, encoder: str = "encoder", undecayed_last: int = 0) -> dict:
    """Layer-wise lr multipliers of a jaxseg ViT under `encoder`: block j gets decay^(depth-1-j), except the
    last `undecayed_last` blocks, which get 1; the embedding (patch, position, class and register tokens)
    block 0's factor; the final norm and everything outside the encoder 1 (EoMT's LLRD)."""
    def multiplier(name: str) -> float:
        if not name.startswith(encoder + "/"):
            return 1.0
        block = re.match(rf"{re.escape(encoder)}/blocks_(\d+)/", name)
        if block:
            index = int(block.group(1))
            return 1.0 if index >= depth - undecayed_last else decay ** (depth - 1 - index)
        if re.match(rf"{re.escape(encoder)}/(patch_embed|pos_embed|cls_token|reg_token)", name):
            return decay ** (depth - 1)
        return 1.0
    return jax.tree_util.tree_map(multiplier, path_names(params))


def regex_labels(params, rules: Sequence[tuple[str, str]], default: str) -> dict:
    """Group label of each parameter: the first (regex, label) whose regex matches its name."""
    def label(name):
        return next((group for pattern, group in rules if re.search(pattern, name)), default)
    return jax.tree_util.tree_map(label, path_names(params))


def scale_by_group_schedule(labels, multipliers, schedules: Mapping[str, Schedule]
                            ) -> optax.GradientTransformation:
    """update <- -schedules[label](step) * multiplier * update, per parameter."""
    missing = set(jax.tree_util.tree_leaves(labels)) - set(schedules)
    if missing:
        raise UserError(f"no schedule for parameter group(s) {sorted(missing)}")

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        rates = {group: fn(state.count) for group, fn in schedules.items()}
        updates = jax.tree_util.tree_map(lambda u, g, m: -rates[g] * m * u, updates, labels, multipliers)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def adamw_groups(labels, multipliers, schedules: Mapping[str, Schedule], *, weight_decay: float,
                 clip_norm: float | None = None, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                 mu_dtype=None, frozen: Collection[str] = ()) -> optax.GradientTransformation:
    """torch-AdamW with global-norm clipping, per-group schedules and per-parameter multipliers; weight
    decay on every parameter (as EoMT and WeakTr do). Parameters of the `frozen` groups never move and
    have no state (no Adam moments are allocated for them); the clipping norm is that of the others'
    gradients, and the frozen groups need no schedule."""
    trainable = jax.tree_util.tree_map(lambda group: group not in frozen, labels)
    tx = optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay),
        # Under optax.partition the chain sees the frozen leaves as MaskedNodes: so must its group tables.
        scale_by_group_schedule(_masked(labels, trainable), _masked(multipliers, trainable), schedules))
    if not frozen:
        return tx
    return optax.partition({"trained": tx, "frozen": optax.set_to_zero()},
                           jax.tree_util.tree_map(lambda keep: "trained" if keep else "frozen", trainable))


def _masked(tree, keep):
    """`tree` with the leaves where `keep` is False replaced as `optax.masked` replaces them."""
    return jax.tree_util.tree_map(lambda value, k: value if k else optax.MaskedNode(), tree, keep)
