"""SETR against the PyTorch reference of mmsegmentation's SETR (`jaxseg/testing/references/setr.py`, written
from mmseg's SETRUPHead, MLANeck, SETRMLAHead and VisionTransformer): each decoder in inference (running
statistics) and training mode (batch statistics, running-statistic update), gradients of the mmseg CE loss
with respect to every decoder parameter, and the whole network over a timm ViT converted by `from_timm`.
Random weights and running statistics, CPU, float32; forward tolerance 1e-5, gradients 1e-4. Then the
method's side: the scenes config's decoder choices, one optimiser step (running statistics, mmseg's head
learning-rate multiplier) and the sliding predictor. Figures: docs/setr.md."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from jaxseg import methods
from jaxseg.config import apply_overrides, load_config
from jaxseg.convert import from_timm
from jaxseg.losses.gradient_clipping import pixel_cross_entropy
from jaxseg.models.setr import Setr
from jaxseg.ops.image import PIXEL_STATS, normalize
from jaxseg.testing.references.setr import randomize, to_flax, torch_decoder, torch_setr
from jaxseg.testing.references.timm_vit import random_timm_vit, rel_err

N_CLS, WIDTH, HEADS, DEPTH, PATCH = 5, 64, 4, 4, 8
CHANNELS, MLA_CHANNELS = 32, 16
ENCODER = dict(width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=4 * WIDTH, patch_size=PATCH, posemb_grid=(4, 4),
               final_norm=False)
TAPS = {"naive": (DEPTH - 1,), "pup": (DEPTH - 1,), "mla": tuple(range(DEPTH))}
GRID = (6, 4)  # a 48 x 32 input


def _setup(kind, seed=0):
    neck, head = torch_decoder(kind, WIDTH, N_CLS, CHANNELS, MLA_CHANNELS, num_taps=len(TAPS[kind]))
    for i, module in enumerate(m for m in (neck, head) if m is not None):
        randomize(module, seed=seed + i)
    model = Setr(encoder=ENCODER, num_classes=N_CLS, decoder=kind, taps=TAPS[kind], channels=CHANNELS,
                 mla_channels=MLA_CHANNELS)
    taps = [np.random.default_rng(seed + 10 + i).standard_normal((2, *GRID, WIDTH)).astype(np.float32)
            for i in range(len(TAPS[kind]))]
    return neck, head, model, taps


def _torch_decode(neck, head, taps):
    inputs = [torch.from_numpy(t).permute(0, 3, 1, 2) for t in taps]
    return head(neck(inputs) if neck is not None else inputs)


def _nhwc(tensor):
    return tensor.detach().permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kind", ["naive", "pup", "mla"])
def test_decoder_inference_matches_reference(kind):
    neck, head, model, taps = _setup(kind)
    for module in (neck, head):
        if module is not None:
            module.eval()
    with torch.no_grad():
        expected = _torch_decode(neck, head, taps)
    variables = to_flax(neck, head)
    logits = jax.jit(lambda v, t: model.apply(v, t, method=Setr.decode))(variables, taps)
    scale = {"naive": 4, "pup": 16, "mla": 4}[kind]
    assert logits.shape == (2, GRID[0] * scale, GRID[1] * scale, N_CLS)
    error = rel_err(logits, _nhwc(expected))
    print(kind, error)
    assert error <= 1e-5


@pytest.mark.parametrize("kind", ["naive", "pup", "mla"])
def test_decoder_training_step_matches_reference(kind):
    """Batch statistics in the forward, the running statistics' update, and the gradients of mmseg's CE
    (mean over all pixels, 255 ignored) with respect to every decoder parameter."""
    neck, head, model, taps = _setup(kind, seed=3)
    variables = to_flax(neck, head)  # before the reference's training-mode pass moves its statistics
    for module in (neck, head):
        if module is not None:
            module.train()
    scale = {"naive": 4, "pup": 16, "mla": 4}[kind]
    labels = np.random.default_rng(5).integers(0, N_CLS, (2, GRID[0] * scale, GRID[1] * scale))
    labels[:, :3] = 255
    logits_torch = _torch_decode(neck, head, taps)
    loss_torch = F.cross_entropy(logits_torch, torch.from_numpy(labels), ignore_index=255, reduction="none").mean()
    loss_torch.backward()

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, taps, train=True,
                                      method=Setr.decode, mutable=["batch_stats"])
        return pixel_cross_entropy(logits, jnp.asarray(labels)).mean(), (logits, updates["batch_stats"])

    (loss, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    forward_error = rel_err(logits, _nhwc(logits_torch))
    assert forward_error <= 1e-5
    assert abs(float(loss) - loss_torch.item()) <= 1e-5 * loss_torch.item()
    expected = to_flax(neck, head)  # the reference's running statistics after its training-mode pass
    stat_errors = jax.tree.map(rel_err, stats, expected["batch_stats"])
    assert max(jax.tree.leaves(stat_errors)) <= 1e-5, stat_errors
    grads_torch = to_flax(*[_grads_as_weights(m) for m in (neck, head)])["params"]
    # Training-mode BatchNorm removes any per-channel constant, so a bias feeding a 1x1 conv before it
    # (the naive head's LayerNorm bias, the MLA neck's) has a zero gradient: such leaves are compared
    # with the largest gradient of the tree instead of their own rounding noise.
    largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_torch))
    grad_errors = jax.tree.map(
        lambda a, e: float(np.abs(np.asarray(a) - e).max()) / max(np.abs(e).max(), 1e-3 * largest), grads, grads_torch)
    print(kind, forward_error, max(jax.tree.leaves(stat_errors)), max(jax.tree.leaves(grad_errors)))
    assert max(jax.tree.leaves(grad_errors)) <= 1e-4, grad_errors


def _grads_as_weights(module):
    """A copy of `module` whose parameters hold their gradients (so that `to_flax` lays them out)."""
    if module is None:
        return None
    clone = copy.deepcopy(module)
    with torch.no_grad():
        for param, source in zip(clone.parameters(), module.parameters()):
            param.copy_(source.grad)
    return clone


@pytest.mark.parametrize("kind,with_cls_token", [("naive", True), ("mla", False)])
def test_setr_over_converted_timm_vit_matches_reference(kind, with_cls_token):
    """mmseg's backbone forward over the timm ViT's modules (position embedding resized bilinearly from
    4 x 4 to the 6 x 4 grid; MLA without the class token) + decoder + resize to the input."""
    vit = random_timm_vit("vit_small_patch16_224", dict(depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS, img_size=32,
                                                        patch_size=PATCH))
    encoder, encoder_params = from_timm(vit.state_dict(), num_heads=HEADS, final_norm=False, posemb_resize="bilinear")
    neck, head, _, _ = _setup(kind, seed=7)
    for module in (neck, head):
        if module is not None:
            module.eval()
    model = Setr(encoder=encoder, num_classes=N_CLS, decoder=kind, taps=TAPS[kind], with_cls_token=with_cls_token,
                 channels=CHANNELS, mla_channels=MLA_CHANNELS)
    variables = to_flax(neck, head)
    variables["params"]["encoder"] = encoder_params
    images = np.random.default_rng(8).standard_normal((2, 8 * GRID[0], 8 * GRID[1], 3)).astype(np.float32)
    with torch.no_grad():
        expected = torch_setr(vit, neck, head, torch.from_numpy(images).permute(0, 3, 1, 2), TAPS[kind],
                              with_cls_token)
    logits = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
    assert logits.shape == (2, *images.shape[1:3], N_CLS)
    error = rel_err(logits, _nhwc(expected))
    print(kind, error)
    assert error <= 1e-5


def test_bad_settings():
    images = jnp.zeros((1, 16, 16, 3))
    encoder = dict(ENCODER, depth=2)
    with pytest.raises(ValueError, match="decoder must be one of"):
        Setr(encoder=encoder, num_classes=3, decoder="fpn").init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="reads one block"):
        Setr(encoder=encoder, num_classes=3, decoder="pup", taps=(0, 1)).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="increasing block indices"):
        Setr(encoder=encoder, num_classes=3, decoder="mla", taps=(1, 0)).init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="channels=0 breaks the rule"):
        Setr(encoder=encoder, num_classes=3, channels=0)


def _method(arg, *overrides):
    config = load_config(f"configs/setr/scenes.py:{arg}")
    apply_overrides(config, list(overrides))
    return methods.build(config)


@pytest.mark.parametrize("arg", ["runlocal,pup", "runlocal,mla", "mla"])
def test_decoder_choices_of_the_scenes_config_build(arg):
    method = _method(arg)
    assert method.network.decoder == arg.split(",")[-1]
    assert method.label_space == "categories"
    method.predictor("sliding", scales=(1.0,))
    method.metric("semantic")


def test_training_step_recipe_groups_and_running_statistics():
    """One step of the loss + optimiser the trainer runs: the loss is the cross-entropy, the running
    statistics land exactly on the batch's update (torch's momentum, unbiased variance), and mmseg's SGD
    recipe moves the decode head at 10x the encoder's and the MLA neck's rate."""
    method = _method("runlocal,mla", "optimizer.name='sgd'", "optimizer.lr=0.01", "optimizer.head_multiplier=10.0",
                     "optimizer.warmup_steps=0")
    params = nn.unbox(method.init_params(jax.random.key(0)))
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((2, 64, 64, 3)).astype(np.float32),
             "semantic": rng.integers(0, method.model["num_classes"], (2, 64, 64)).astype(np.int32)}
    batch["semantic"][:, :4] = 255

    @jax.jit
    def step(params, batch):
        (loss, metrics), grads = jax.value_and_grad(method.loss, has_aux=True)(params, batch, jax.random.key(1), 0)
        tx = method.optimizer_for(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        _, expected = method.network.apply(params, batch["image"], train=True, mutable=["batch_stats"])
        return loss, metrics, grads, updates, optax.apply_updates(params, updates), expected["batch_stats"]

    loss, metrics, grads, updates, new, expected = step(params, batch)
    assert float(loss) == float(metrics["cross_entropy"])
    stat_errors = jax.tree.map(lambda a, e: float(np.abs(a - e).max()), new["batch_stats"], expected)
    assert max(jax.tree.leaves(stat_errors)) <= 1e-6, stat_errors
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new["batch_stats"], params["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 0
    def flat(tree):
        return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])

    for group, rate in (("encoder", 0.01), ("neck", 0.01), ("head", 0.1)):
        assert rel_err(flat(updates["params"][group]), -rate * flat(grads["params"][group])) <= 1e-6, group


def test_sliding_predictor_reads_the_logits():
    """An image of the window's size at scale 1 is one window, plain and flipped: the prediction is the
    argmax of the two passes' mean probabilities."""
    method = _method("runlocal,naive", "method.base_size=64")
    params = nn.unbox(method.init_params(jax.random.key(2)))
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), np.uint8)
    predictor = method.predictor("sliding", scales=(1.0,), canvas=(64, 64), max_aspect=1.0)
    inputs = {k: v[None] for k, v in predictor.prepare({"image": image}).items()}
    semantic = jax.jit(predictor.predict)(params, inputs)["semantic"][0]
    x = normalize(jnp.asarray(image, jnp.float32)[None] / 255, *PIXEL_STATS["imagenet"])
    plain = jax.nn.softmax(method.network.apply(params, x), -1)
    flipped = jax.nn.softmax(method.network.apply(params, x[:, :, ::-1]), -1)[:, :, ::-1]
    expected = np.argmax(np.asarray(plain + flipped)[0], -1)
    assert np.mean(np.asarray(semantic) == expected) > 0.999
    assert predictor.finish({"semantic": np.asarray(semantic)}, {"image": image})["semantic"].shape == (64, 64)
