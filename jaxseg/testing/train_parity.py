"""Training parity: jaxseg's methods trained next to PyTorch references from identical weights, on identical
batches, with the same optimizer recipe; shared by tests/test_train_parity.py and benchmarks/train_parity.py.

jaxseg's side is always its shipped training step (`jaxseg.train.step.make_train_step` over the method)
with the trainer's state rng. The PyTorch sides are written from the official training code, not from
jaxseg's:
  EoMT     transformers' `EomtForUniversalSegmentation` and its `EomtLoss` (the loss tue-mps/eomt trains
           with); AdamW over one parameter group per tensor with layer-wise lr decay as tue-mps/eomt
           `training/lightning_module.py` (configure_optimizers) sets it up, its TwoStageWarmupPolySchedule,
           global-norm clipping (Lightning's gradient_clip_val), and its mask annealing (`mask_annealing`)
           written into the model's `attn_mask_probs` buffer before each step. transformers' layer scale
           is frozen at 1 (and left out of the conversion), so both sides are the config's model without it.
  WeakTr   stage 1 of `references/weaktr.py` trained as hustvl/WeakTr `main.py` trains it: timm's AdamW over
           `model.parameters()` (weight decay on every one), timm's CosineLRScheduler stepped with the
           epoch index after each epoch, the sum of the three multilabel soft-margin losses.

Lockstep (`record=True` / `draws=`): jaxseg leads. Its step runs unchanged while the random numbers it
draws are recorded as it is traced and returned with its metrics: each query block's masking uniforms
(the `uniform` argument of `EoMT.attention_mask`) and each prediction layer's points (`draw_points` of
the set loss). transformers' side then receives them from `torch.rand`, in the order it draws: a (B, Q)
uniform per query block whose probability is below 1, then per prediction layer B matcher point sets
(1, P, 2), and the importance candidates (pairs, 3P, 2) and fresh points (pairs, P/4, 2) of the matched
pairs in its order (image by image, by query index), each pair taking jaxseg's draws of the target slot it
matched. Both sides then compute on the same samples, and any disagreement is numerical.
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import EomtConfig, EomtForUniversalSegmentation

from jaxseg.convert import from_hf_eomt, from_official_weaktr
from jaxseg.errors import UserError
from jaxseg.losses import mask_classification
from jaxseg.models.eomt import EoMT
from jaxseg.models.vit import ViT
from jaxseg.ops.image import IMAGENET_MEAN, IMAGENET_STD
from jaxseg.parallel import DEFAULT_RULES, MeshConfig, global_batch
from jaxseg.testing.references.weaktr import torch_cam_loss
from jaxseg.train.step import TrainState, abstract_train_state, make_train_step

# ----------------------------------------------------------------------------------------------------------
# jaxseg's side


_ATTENTION_MASK = inspect.signature(EoMT.attention_mask)


@contextlib.contextmanager
def _recording_draws(masking: list, points: list):
    """While tracing: EoMT's masking uniforms into `masking` (block order), the set loss's `LayerDraws`
    into `points` (prediction-layer order)."""
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "attention_mask":
            masking.append(_ATTENTION_MASK.bind(context.module, *args, **kwargs).arguments["uniform"])
        return next_fun(*args, **kwargs)

    original = mask_classification.draw_points

    def draw_points(*args, **kwargs):
        points.append(original(*args, **kwargs))
        return points[-1]

    mask_classification.draw_points = draw_points
    try:
        with nn.intercept_methods(interceptor):
            yield
    finally:
        mask_classification.draw_points = original


class _Recorded:
    """`method` whose loss also returns the random numbers it drew, as metrics["draws"]."""

    def __init__(self, method):
        self._method = method

    def __getattr__(self, name):
        return getattr(self._method, name)

    def loss(self, params, batch, rng, step):
        masking, points = [], []
        with _recording_draws(masking, points):
            loss, metrics = self._method.loss(params, batch, rng, step)
        return loss, dict(metrics, draws={"masking": masking, "points": points})


class JaxRun:
    """jaxseg's shipped train step for `method` from `params`, on one device, the state's rng as the
    trainer's at `seed`; `record`: each step also returns the draws it made (module docstring)."""

    def __init__(self, method, params: Any, seed: int, *, record: bool = False, rules=DEFAULT_RULES):
        stepped = _Recorded(method) if record else method
        self.mesh, self.rules = MeshConfig().make_mesh(jax.devices()[:1]), rules
        _, _, shardings = abstract_train_state(stepped, seed, self.mesh, rules)
        params = jax.tree_util.tree_map(lambda s, p: jax.device_put(np.asarray(p, np.float32), s),
                                        shardings.params, flax.core.unfreeze(params))
        opt_state = jax.device_put(method.optimizer_for(params).init(params), shardings.opt_state)
        # The state rng as `abstract_train_state`'s init derives it (without compiling that init).
        rng = jax.random.split(jax.random.PRNGKey(seed))[1]
        self.state = TrainState(jnp.zeros([], jnp.int32), params, opt_state, rng)
        with self._context():
            self._step = make_train_step(stepped, shardings)

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    @property
    def params(self) -> Any:
        return jax.device_get(self.state.params)

    def step(self, batch: dict) -> tuple[float, dict | None]:
        """(loss of this step, its draws or None); the state moves on."""
        with self._context():
            self.state, metrics = self._step(self.state, global_batch(batch, self.mesh, self.rules))
        draws = metrics.pop("draws", None)
        return float(metrics["loss"]), None if draws is None else jax.device_get(draws)


# ----------------------------------------------------------------------------------------------------------
# torch.rand fed from recorded draws


class RandFeed:
    """Stands in for `torch.rand`: serves the queued values (arrays, or callables giving one) in order and
    checks each requested shape."""

    def __init__(self):
        self.queue = collections.deque()

    def push(self, item) -> None:
        self.queue.append(item)

    def __call__(self, *size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        if not self.queue:
            raise AssertionError(f"torch.rand{shape} asked for more random numbers than were recorded")
        item = self.queue.popleft()
        value = np.asarray(item() if callable(item) else item, np.float32)
        if value.shape != tuple(shape):
            raise AssertionError(f"torch.rand{tuple(shape)} was fed a recorded draw of shape {value.shape}")
        return torch.from_numpy(value.copy())

    @contextlib.contextmanager
    def feeding(self):
        original = torch.rand
        torch.rand = self
        try:
            yield self
        finally:
            torch.rand = original
        if self.queue:
            raise AssertionError(f"{len(self.queue)} recorded draws were not asked for")


# ----------------------------------------------------------------------------------------------------------
# EoMT: transformers' side


_REQUIRED = dict(num_cls_tokens=1, layerscale_init=None, mlp_type="gelu", qkv_bias=True, key_bias=True,
                    rope_base=None, pre_norm=False, final_norm=True, posemb_covers_prefix=False,
                    drop_path_rate=0.0, dropout_rate=0.0, attention_dropout_rate=0.0)


def _shapes(tree) -> dict:
    return flax.traverse_util.flatten_dict(jax.tree_util.tree_map(np.shape, flax.core.unfreeze(tree)), sep="/")


def hf_eomt_config(method, num_upscale_blocks: int) -> EomtConfig:
    """transformers' config of the EoMT that `method` trains (its model, crop and set-loss settings)."""
    encoder = {name: method.model["encoder"].get(name, getattr(ViT, name))
               for name in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "posemb_grid",
                            "num_registers", "layernorm_eps", *_REQUIRED)}
    wrong = {k: encoder[k] for k, v in _REQUIRED.items() if encoder[k] != v}
    grid = method.crop_size // encoder["patch_size"]
    if tuple(encoder["posemb_grid"]) != (grid, grid):
        wrong["posemb_grid"] = encoder["posemb_grid"]
    if encoder["mlp_dim"] % encoder["width"]:
        wrong["mlp_dim"] = encoder["mlp_dim"]
    if wrong:
        raise UserError(f"transformers' EoMT cannot express the encoder settings {wrong}: it needs {_REQUIRED}, "
                        f"posemb_grid = crop_size / patch_size and mlp_dim a multiple of width")
    loss = method.set_loss
    return EomtConfig(
        hidden_size=encoder["width"], num_hidden_layers=encoder["depth"], num_attention_heads=encoder["num_heads"],
        mlp_ratio=encoder["mlp_dim"] // encoder["width"], image_size=method.crop_size,
        patch_size=encoder["patch_size"], num_register_tokens=encoder["num_registers"],
        layer_norm_eps=encoder["layernorm_eps"], layerscale_value=1.0,
        num_upscale_blocks=num_upscale_blocks,
        num_blocks=method.model["num_query_blocks"], num_queries=method.model["num_queries"],
        num_labels=method.num_classes, no_object_weight=loss.no_object_weight, class_weight=loss.class_weight,
        mask_weight=loss.mask_weight, dice_weight=loss.dice_weight, train_num_points=loss.num_points,
        oversample_ratio=loss.oversample_ratio, importance_sample_ratio=loss.importance_sample_ratio)


def eomt_params_from_hf(model: EomtForUniversalSegmentation) -> dict:
    """jaxseg EoMT params of transformers' model (`from_hf_eomt`), its frozen unit layer scale left out."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    scales = [v for k, v in state.items() if k.endswith("lambda1")]
    if any(not torch.all(v == 1) for v in scales):
        raise AssertionError("transformers' layer scale moved; it must stay frozen at 1")
    # Without registers transformers still holds an empty (1, 0, D) register tensor, which the converter
    # would take for registers of another count.
    kept = {k: v.numpy() for k, v in state.items() if not k.endswith("lambda1") and v.numel()}
    return from_hf_eomt(kept, model.config)[1]


def official_llrd(name: str, depth: int, num_blocks: int, layer_decay: float, decay_query_blocks: bool
                  ) -> tuple[bool, float]:
    """(is an encoder parameter, lr multiplier) of a transformers EoMT parameter, as tue-mps/eomt's
    configure_optimizers assigns them: block i gets decay^(depth-1-i) (the last L2 blocks 1 when they are
    not decayed), the embeddings block 0's factor, the final norm 1; everything else is a head at 1."""
    block = re.match(r"layers\.(\d+)\.", name)
    if block:
        index = int(block.group(1))
        if index >= depth - num_blocks and not decay_query_blocks:
            return True, 1.0
        return True, layer_decay ** (depth - 1 - index)
    if name.startswith("embeddings."):
        return True, layer_decay ** (depth - 1)
    return name.startswith("layernorm."), 1.0


def official_two_stage_lr(step: int, base_lr: float, backbone: bool, warmup: tuple[int, int], total_steps: int,
                          power: float) -> float:
    """tue-mps/eomt TwoStageWarmupPolySchedule.get_lr at `step` (completed optimizer steps)."""
    head_warmup, backbone_warmup = warmup
    if not backbone:
        if head_warmup > 0 and step < head_warmup:
            return base_lr * step / head_warmup
        return base_lr * (1 - max(0, step - head_warmup) / max(1, total_steps - head_warmup)) ** power
    if step < head_warmup:
        return 0.0
    if step < head_warmup + backbone_warmup:
        return base_lr * (step - head_warmup) / backbone_warmup
    start = head_warmup + backbone_warmup
    return base_lr * (1 - max(0, step - start) / max(1, total_steps - start)) ** power


def official_mask_annealing(start: int, step: int, end: int, power: float) -> torch.Tensor:
    """tue-mps/eomt mask_annealing (float32): 1 before `start`, 0 from `end`, (1 - progress)^power between."""
    if step < start:
        return torch.ones(1)
    if step >= end:
        return torch.zeros(1)
    return (1.0 - torch.tensor([(step - start) / (end - start)], dtype=torch.float32)).pow(power)


def hf_eomt_inputs(batch: dict) -> tuple[torch.Tensor, list, list]:
    """(pixel values normalised as transformers' image processor does, NCHW; the valid target masks and
    labels of each image) of a jaxseg EoMT batch."""
    images = (np.asarray(batch["image"], np.float32) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    valid = np.asarray(batch["valid"], bool)
    masks = [torch.from_numpy(np.asarray(m, np.float32)[v]) for m, v in zip(batch["masks"], valid)]
    labels = [torch.from_numpy(np.asarray(lab, np.int64)[v]) for lab, v in zip(batch["labels"], valid)]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), masks, labels


class HfEomtRun:
    """transformers' EoMT (initialised by transformers at `seed`) trained with `method`'s recipe, written
    from the official training code (module docstring). `step(batch, draws)` replays jaxseg's draws."""

    def __init__(self, method, seed: int):
        if method.optimizer.freeze_encoder:
            raise UserError("the training-parity reference does not implement optimizer.freeze_encoder")
        torch.manual_seed(seed)
        expected = _shapes(nn.unbox(jax.eval_shape(method.init_params, jax.random.key(0))))
        config = hf_eomt_config(method, len({name.split("/")[0] for name in expected if name.startswith("upscale_")}))
        self.model = EomtForUniversalSegmentation(config).train()
        if _shapes(self.params()) != expected:
            raise AssertionError(f"transformers' EoMT does not convert to the method's parameters: "
                                 f"{sorted(set(_shapes(self.params()).items()) ^ set(expected.items()))}")
        groups = []
        for name, param in self.model.named_parameters():
            if name.endswith("lambda1"):
                param.requires_grad_(False)
                continue
            backbone, multiplier = official_llrd(name, config.num_hidden_layers, config.num_blocks,
                                                 method.optimizer.layer_decay, method.optimizer.decay_query_blocks)
            groups.append({"params": [param], "lr": 0.0, "base_lr": method.optimizer.lr * multiplier,
                           "backbone": backbone})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=method.optimizer.weight_decay)
        self.method, self.steps = method, 0
        self.matched = []
        self.model.criterion.matcher.register_forward_hook(lambda m, i, out: self.matched.append(out))

    def params(self) -> dict:
        return eomt_params_from_hf(self.model)

    def mask_probs(self, step: int) -> torch.Tensor:
        starts, ends = self.method.windows
        return torch.cat([official_mask_annealing(s, step, e, self.method.annealing.power)
                          for s, e in zip(starts, ends)])

    def _matched_slots(self, slots: list) -> list[tuple[int, int]]:
        """(image, target slot) of the pairs the last matching made, in transformers' order (image by
        image, by query index); `slots`: each image's valid slots, in transformers' target order."""
        return [(b, slots[b][j]) for b, (_, targets) in enumerate(self.matched[-1]) for j in targets.tolist()]

    def _feed(self, draws: dict, probs: torch.Tensor, valid: np.ndarray) -> RandFeed:
        feed = RandFeed()
        for prob, uniform in zip(probs.tolist(), draws["masking"]):
            if prob < 1:  # transformers draws only then
                feed.push(uniform)
        slots = [np.flatnonzero(v) for v in valid]
        for layer in draws["points"]:
            for image_points in layer.match_points:
                feed.push(image_points[None])
            feed.push(lambda layer=layer: np.stack([layer.candidates[p] for p in self._matched_slots(slots)]))
            if layer.fresh.shape[2]:
                feed.push(lambda layer=layer: np.stack([layer.fresh[p] for p in self._matched_slots(slots)]))
        return feed

    def step(self, batch: dict, draws: dict | None = None) -> float:
        """One optimizer step on `batch`; `draws`: jaxseg's draws of the same step (`JaxRun(record=True)`)."""
        optimizer = self.method.optimizer
        probs = self.mask_probs(self.steps)
        with torch.no_grad():
            self.model.attn_mask_probs.copy_(probs)
        for group in self.optimizer.param_groups:
            group["lr"] = official_two_stage_lr(self.steps, group["base_lr"], group["backbone"], optimizer.warmup,
                                                self.method.total_steps, optimizer.power)
        pixels, masks, labels = hf_eomt_inputs(batch)
        self.matched.clear()
        feeding = self._feed(draws, probs, np.asarray(batch["valid"])).feeding() if draws else contextlib.nullcontext()
        with feeding:
            loss = self.model(pixel_values=pixels, mask_labels=masks, class_labels=labels).loss
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], optimizer.clip_norm)
        self.optimizer.step()
        self.steps += 1
        return loss.item()


# ----------------------------------------------------------------------------------------------------------
# WeakTr stage 1: the reference's side


def official_weaktr(model: torch.nn.Module, **convert_settings) -> tuple[dict, dict]:
    """(WeakTr keyword arguments, params) of the reference through `from_official_weaktr`."""
    return from_official_weaktr({k: v.detach().numpy() for k, v in model.state_dict().items()}, **convert_settings)


class TorchWeakTrRun:
    """`references.weaktr.TorchWeakTr` trained with `method`'s recipe as hustvl/WeakTr `main.py` does
    (module docstring); batches are jaxseg's (NHWC normalised images, multi-hot labels)."""

    def __init__(self, model: torch.nn.Module, method):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        recipe = method.optimizer
        self.model, self.steps_per_epoch, self.steps = model.train(), method.steps_per_epoch, 0
        # Parameters, not the module: timm then decays every one (no bias / norm exemption), as main.py.
        self.optimizer = create_optimizer_v2(model.parameters(), opt="adamw", lr=recipe.lr,
                                             weight_decay=recipe.weight_decay, eps=1e-8)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=method.total_steps // method.steps_per_epoch,
                                           lr_min=recipe.min_lr, warmup_lr_init=recipe.warmup_lr,
                                           warmup_t=recipe.warmup_epochs, cycle_limit=1, t_in_epochs=True)

    def params(self, **convert_settings) -> dict:
        return official_weaktr(self.model, **convert_settings)[1]

    def step(self, batch: dict) -> float:
        images = torch.from_numpy(np.asarray(batch["image"], np.float32)).permute(0, 3, 1, 2).contiguous()
        loss = torch_cam_loss(self.model(images), torch.from_numpy(np.asarray(batch["labels"], np.float32)))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.steps_per_epoch == 0:
            self.scheduler.step(self.steps // self.steps_per_epoch - 1)  # main.py: lr_scheduler.step(epoch)
        return loss.item()
