"""optax recipes: AdamW with per-parameter learning-rate multipliers (layer-wise decay, regex groups)
and per-group schedules, as the EoMT and WeakTr recipes need.

The update of a parameter p in group g is torch AdamW's: p <- p - lr_g(t) * m_p * (adam(p) + wd * p),
with lr_g the group's schedule and m_p its multiplier. Frozen phases are schedules at 0: the Adam moments
keep accumulating (as EoMT's frozen-backbone warm-up does), only the step is zero.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


def warmup_poly(base_lr: float, total_steps: int, warmup_steps: int, *, frozen_steps: int = 0,
                power: float = 0.9) -> Schedule:
    """0 for `frozen_steps`, a linear warm-up 0 -> base_lr over the next `warmup_steps`, then
    base_lr * (1 - (t - s) / (T - s))^power with s = frozen + warm-up (EoMT's TwoStageWarmupPolySchedule:
    heads use (0, 500), the backbone (500, 1000))."""
    start = frozen_steps + warmup_steps
    if total_steps <= start:
        raise ValueError(f"total_steps {total_steps} must exceed the frozen + warm-up steps {start}")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = base_lr * (step - frozen_steps) / max(warmup_steps, 1)
        decay = base_lr * jnp.maximum(1.0 - (step - start) / (total_steps - start), 0.0) ** power
        return jnp.where(step < frozen_steps, 0.0, jnp.where(step < start, warm, decay))
    return schedule


def path_names(params) -> dict:
    """A tree like `params` holding each leaf's "a/b/c" name."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return flax.traverse_util.unflatten_dict({k: k for k in flat}, sep="/")


def layer_decay(params, depth: int, decay: float, encoder: str = "encoder") -> dict:
    """Layer-wise lr multipliers of a jaxseg ViT under `encoder`: block j gets decay^(depth-1-j); the
    embedding (patch, position, class and register tokens) block 0's factor; the final norm and everything
    outside the encoder 1 (EoMT's LLRD)."""
    def multiplier(name: str) -> float:
        if not name.startswith(encoder + "/"):
            return 1.0
        block = re.match(rf"{re.escape(encoder)}/blocks_(\d+)/", name)
        if block:
            return decay ** (depth - 1 - int(block.group(1)))
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
        raise ValueError(f"no schedule for parameter group(s) {sorted(missing)}")

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
                 mu_dtype=None) -> optax.GradientTransformation:
    """torch-AdamW with global-norm clipping, per-group schedules and per-parameter multipliers; weight
    decay on every parameter (as EoMT and WeakTr do)."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
        optax.add_decayed_weights(weight_decay),
        scale_by_group_schedule(labels, multipliers, schedules))


def eomt_optimizer(params, *, total_steps: int, depth: int, lr: float = 1e-4, weight_decay: float = 0.05,
                   layer_decay_rate: float = 0.8, warmup: tuple[int, int] = (500, 1000),
                   clip_norm: float = 0.01, power: float = 0.9) -> optax.GradientTransformation:
    """EoMT's recipe: AdamW (lr 1e-4, wd 0.05 on all parameters), LLRD 0.8 over the encoder, heads warm
    up over warmup[0] steps, the encoder stays frozen (lr 0, moments accumulating) for warmup[0] steps and
    warms up over warmup[1], then poly decay; gradients clipped to global norm 0.01."""
    labels = regex_labels(params, [(r"^encoder/", "backbone")], "head")
    schedules = {"head": warmup_poly(lr, total_steps, warmup[0], power=power),
                 "backbone": warmup_poly(lr, total_steps, warmup[1], frozen_steps=warmup[0], power=power)}
    return adamw_groups(labels, layer_decay(params, depth, layer_decay_rate), schedules,
                        weight_decay=weight_decay, clip_norm=clip_norm)


def timm_cosine_per_epoch(base_lr: float, steps_per_epoch: int, epochs: int, *, warmup_epochs: int = 5,
                          warmup_lr: float = 1e-6, min_lr: float = 1e-5) -> Schedule:
    """WeakTr stage 1's schedule: timm's CosineLRScheduler (t in epochs, warm-up not prefixed) stepped
    once per epoch after it ends, so epoch e trains at lr(max(e - 1, 0)) and epoch 0 at the warm-up start."""
    def schedule(step):
        epoch = jnp.maximum(jnp.asarray(step, jnp.int32) // steps_per_epoch - 1, 0).astype(jnp.float32)
        warm = warmup_lr + epoch * (base_lr - warmup_lr) / max(warmup_epochs, 1)
        cosine = min_lr + 0.5 * (base_lr - min_lr) * (1 + jnp.cos(jnp.pi * epoch / epochs))
        return jnp.where(epoch < warmup_epochs, warm, cosine)
    return schedule


def weaktr_cam_optimizer(params, *, steps_per_epoch: int, epochs: int, lr: float, weight_decay: float = 0.03,
                         warmup_epochs: int = 5, warmup_lr: float = 1e-6, min_lr: float = 1e-5
                         ) -> optax.GradientTransformation:
    """WeakTr stage 1: AdamW (eps 1e-8, wd 0.03 on every parameter) on the per-epoch timm cosine."""
    labels = jax.tree_util.tree_map(lambda _: "all", params)
    schedule = timm_cosine_per_epoch(lr, steps_per_epoch, epochs, warmup_epochs=warmup_epochs,
                                     warmup_lr=warmup_lr, min_lr=min_lr)
    return adamw_groups(labels, jax.tree_util.tree_map(lambda _: 1.0, params), {"all": schedule},
                        weight_decay=weight_decay)


def segmenter_optimizer(params, *, total_steps: int, lr: float = 1e-4, min_lr: float = 1e-5,
                        encoder_multiplier: float = 0.1, momentum: float = 0.9, power: float = 0.9,
                        weight_decay: float = 0.0, optimizer: str = "sgd",
                        warmup_steps: int = 0) -> optax.GradientTransformation:
    """WeakTr stage 2 (Segmenter's recipe): SGD with Nesterov momentum 0.9, per-iteration poly decay
    (lr - min_lr) (1 - t / T)^0.9 + min_lr, encoder parameters at 0.1x that rate. `optimizer="adamw"`
    (with a linear warm-up over `warmup_steps`) trains small models from scratch, where SGD stays at
    the background prior."""
    multipliers = jax.tree_util.tree_map(lambda name: encoder_multiplier if name.startswith("encoder/")
                                         else 1.0, path_names(params))
    labels = jax.tree_util.tree_map(lambda _: "all", params)
    decay = optax.polynomial_schedule(lr, min_lr, power, total_steps - warmup_steps)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])
    if optimizer == "adamw":
        return adamw_groups(labels, multipliers, {"all": schedule}, weight_decay=weight_decay)
    if optimizer != "sgd":
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    return optax.chain(optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
                       optax.trace(decay=momentum, nesterov=True),
                       scale_by_group_schedule(labels, multipliers, {"all": schedule}))
