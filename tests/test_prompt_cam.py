"""Prompt-CAM against the PyTorch reference of the official code (`jaxseg/testing/references/prompt_cam.py`:
Imageomics/Prompt_CAM `VisionTransformerPETL` + `VPT` over a timm ViT), random weights, CPU, float32:
logits and trait maps within 1e-5 relative, prompt and head gradients of the official cross-entropy within
1e-4, VPT-deep and VPT-shallow; the backbone's class-token maps against timm's attention. Then the method:
the frozen backbone keeps its bytes and has no optimizer state over a few shipped train steps (SGD and
AdamW) while prompts and head move, and the unfrozen option moves it; the predictor's trait maps written
per class and head by the prediction writer; the attention-mass metric against a pixel-level count."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs.common import SCENES_THINGS
from jaxseg.convert import from_timm
from jaxseg.data.datasets import DataConfig
from jaxseg.data.synthetic import SceneConfig, generate_scene
from jaxseg.evaluate import Evaluator
from jaxseg.losses.multilabel import soft_target_cross_entropy
from jaxseg.methods.prompt_cam import PromptCamMethod, PromptCamOptimizer
from jaxseg.metrics.accumulators import CamSweepMetric
from jaxseg.metrics.attention_mass import AttentionMassMetric, patch_fractions
from jaxseg.models.prompt_cam import PromptCAM
from jaxseg.models.vit import ViT
from jaxseg.parallel import DEFAULT_RULES, MeshConfig, global_batch
from jaxseg.testing.references.prompt_cam import to_jaxseg, torch_prompt_cam
from jaxseg.testing.references.timm_vit import random_timm_vit, rel_err, run_timm
from jaxseg.train.trainer import TrainConfig, Trainer
from jaxseg.visualize import PredictionWriter

C, WIDTH, HEADS = 5, 64, 4
TIMM = ("vit_small_patch16_224", dict(depth=2, embed_dim=WIDTH, num_heads=HEADS, img_size=32, patch_size=8))
IMAGES = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
TARGETS = np.array([1, 3])


@pytest.fixture(scope="module")
def backbone():
    vit = random_timm_vit(*TIMM)
    config, params = from_timm(vit.state_dict(), num_heads=HEADS)
    return vit, config, params


@pytest.mark.parametrize("vpt", ["deep", "shallow"])
def test_logits_trait_maps_and_gradients_match_reference(backbone, vpt):
    vit, config, encoder = backbone
    reference = torch_prompt_cam(vit, C, vpt)
    logits, traits = reference(torch.from_numpy(IMAGES).permute(0, 3, 1, 2))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(TARGETS)).backward()
    model = PromptCAM(encoder=config, num_classes=C, vpt=vpt)
    params = {"encoder": encoder, **to_jaxseg(reference)}
    out = jax.jit(lambda p: model.apply({"params": p}, IMAGES, trait_maps=True))(params)
    labels = np.eye(C, dtype=np.float32)[TARGETS]
    grads = jax.jit(jax.grad(lambda p: soft_target_cross_entropy(model.apply({"params": p}, IMAGES)["logits"],
                                                                 labels)))(params)
    errors = {"logits": rel_err(out["logits"], logits.detach().numpy()),
              "trait_maps": rel_err(out["trait_maps"], traits.detach().numpy())}
    grad_errors = {"prompts": rel_err(grads["prompts"], reference.vpt.prompt_embeddings.grad.numpy()),
                   "head": rel_err(grads["head"]["kernel"], reference.head.weight.grad.numpy().T)}
    print(vpt, errors, grad_errors)
    assert out["trait_maps"].shape == (2, C, HEADS, 4, 4)
    assert max(errors.values()) <= 1e-5 and max(grad_errors.values()) <= 1e-4
    # The one bias is shared by every class score, so the softmax cancels it: no gradient on either side.
    assert abs(float(grads["head"]["bias"][0])) < 1e-6 and abs(reference.head.bias.grad.item()) < 1e-6
    # The official encoder is frozen (requires_grad False): no gradient reaches it there.
    assert all(p.grad is None for n, p in reference.named_parameters() if n.startswith("vit."))


def test_class_token_maps_are_the_backbones_attention(backbone):
    """Without prompts: timm's last-block attention of the class token over the patches; with C class
    tokens and no final norm (a WeakTr encoder), the ViT's own attention rows of those tokens."""
    vit, config, encoder = backbone
    model = PromptCAM(encoder=config, num_classes=C)
    params = jax.jit(model.init)(jax.random.key(0), IMAGES)["params"]
    maps = jax.jit(lambda p: model.apply({"params": p}, IMAGES, method=model.class_token_maps))(
        dict(params, encoder=encoder))
    _, _, probs = run_timm(vit, IMAGES)
    expected = probs[-1][:, :, :1, 1:].transpose(0, 2, 1, 3).reshape(2, 1, HEADS, 4, 4)
    assert rel_err(maps, expected) <= 1e-5

    weaktr_like = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(4, 4),
                       num_cls_tokens=3, final_norm=False, posemb_resize="dino")
    model = PromptCAM(encoder=weaktr_like, num_classes=3, vpt="shallow")
    params = jax.jit(model.init)(jax.random.key(1), IMAGES)["params"]
    maps = jax.jit(lambda p: model.apply({"params": p}, IMAGES, method=model.class_token_maps))(params)
    vit = ViT(**weaktr_like)
    last = jax.jit(lambda p: vit.apply({"params": p}, IMAGES, return_attention=True)[1]["attn_probs"][-1])(
        params["encoder"])
    last = np.asarray(last)
    np.testing.assert_allclose(maps, last[:, :, :3, 3:].transpose(0, 2, 1, 3).reshape(2, 3, 2, 4, 4), rtol=1e-6)


# The method on 32 px scenes, a tiny encoder with one class token per class (as WeakTr's).
SIZE, BATCH, STEPS = 32, 2, 3
MODEL = dict(encoder=dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, posemb_grid=(4, 4),
                          num_cls_tokens=SCENES_THINGS, final_norm=False, posemb_resize="dino"),
             num_classes=SCENES_THINGS, vpt="deep")
SCENES = [dict(scene, semantic=scene["semantic"][..., None], image_id=f"scene{i}")
          for i, scene in enumerate(generate_scene(SceneConfig(image_size=SIZE), i) for i in range(4))]


def _method(name="sgd", freeze=True, classification="multilabel") -> PromptCamMethod:
    optimizer = PromptCamOptimizer(name=name, lr=0.1, warmup_epochs=0, freeze_encoder=freeze)
    return PromptCamMethod(model=MODEL, optimizer=optimizer, total_steps=10, batch_size=BATCH,
                           data=DataConfig(name="jaxseg_scenes"), crop_size=SIZE, classification=classification)


def _is_encoder(path) -> bool:
    return getattr(path[0], "key", None) == "encoder"


@pytest.mark.parametrize("name,freeze", [("sgd", True), ("adamw", True), ("sgd", False)])
def test_frozen_backbone_keeps_its_bytes_and_has_no_state(tmp_path, name, freeze):
    method = _method(name, freeze)
    mesh = MeshConfig().make_mesh(jax.devices()[:1])
    trainer = Trainer(method, TrainConfig(total_steps=10, batch_size=BATCH), tmp_path, [], mesh=mesh)
    init, abstract, shardings = trainer.abstract_state()
    rng = np.random.default_rng(0)
    examples = [method.train_transform(SCENES[i], rng) for i in range(BATCH)]
    assert examples[0]["image"].shape == (SIZE, SIZE, 3) and examples[0]["labels"].shape == (SCENES_THINGS,)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        state = trainer.initial_state(init, shardings)
        before = jax.device_get(state.params)
        batch = global_batch({k: np.stack([e[k] for e in examples]) for k in examples[0]}, mesh)
        step = trainer.make_step(shardings)
        for _ in range(STEPS):
            state, metrics = step(state, batch)
            assert np.isfinite(float(metrics["loss"]))
    after = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    before = jax.tree_util.tree_leaves(before)
    moved = {(_is_encoder(p), bool(np.array_equal(a, b))) for (p, a), b in zip(after, before)}
    # Frozen: every encoder leaf keeps its bytes; prompts and head (always) move.
    assert moved == ({(True, True), (False, False)} if freeze else {(True, False), (False, False)})
    state_leaves = jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0]
    encoder_state = [p for p, v in state_leaves if any(getattr(k, "key", None) == "encoder" for k in p) and v.ndim]
    assert (not encoder_state) == freeze


def test_trait_maps_are_written_per_class_and_head_and_measured(tmp_path):
    method = _method()
    params = method.init_params(jax.random.key(0))
    metrics = lambda: {"cam_sweep": CamSweepMetric(SCENES_THINGS), "attention_mass": AttentionMassMetric(SCENES_THINGS)}
    writer = PredictionWriter(tmp_path)
    results = Evaluator(method.predictor("cams"), metrics, batch_size=2).run(params, SCENES[:2], writer)
    names = {p.name for p in writer.written}
    for i, scene in enumerate(SCENES[:2]):
        for c in np.flatnonzero(scene["labels"][:SCENES_THINGS]):
            assert f"scene{i}_cam_{c}.png" in names
            assert {f"scene{i}_trait_{c}_head_{h}.png" for h in range(2)} <= names
    assert len([n for n in names if "_trait_" in n]) == 2 * sum(s["labels"][:SCENES_THINGS].sum() for s in SCENES[:2])
    assert len(results["attention_mass_per_head"]) == 2 and 0 <= results["cam_miou"] <= 1
    assert 0 < results["area_fraction"] < 1
    # The backbone's class tokens, steered by the predicted labels, through the same evaluator.
    baseline = Evaluator(method.predictor("cams", source="class_token", labels="predicted"), metrics,
                         batch_size=2).run(params, SCENES[:2])
    assert baseline["class_pairs"] == results["class_pairs"]
    assert baseline["attention_mass_per_head"] != results["attention_mass_per_head"]


def test_attention_mass_matches_a_pixel_count():
    """Each patch's attention spread evenly over its pixels: the share landing on class c among the
    labelled pixels, counted pixel by pixel."""
    rng = np.random.default_rng(3)
    patch, classes, heads = 4, 3, 2
    semantic = rng.integers(0, classes + 1, (10, 13))  # 2 x 3 whole patches; the rest is dropped
    semantic[rng.random(semantic.shape) < 0.1] = 255
    maps = rng.random((classes, heads, 2, 3)).astype(np.float32)
    labels = np.array([1, 0, 1], np.float32)
    fractions, valid = patch_fractions(semantic, classes, patch)
    metric = AttentionMassMetric(classes)
    targets = metric.targets({"fractions": fractions, "valid": valid, "labels": labels}, (10, 13))
    metric.update(jax.tree_util.tree_map(lambda x: np.asarray(x)[None], metric.stats({"trait_maps": maps}, targets)))
    result = metric.result()
    cut = semantic[:8, :12]
    pixel_maps = np.repeat(np.repeat(maps, patch, 2), patch, 3)
    expected = [[(pixel_maps[c, h] * (cut == c + 1)).sum() / (pixel_maps[c, h] * (cut != 255)).sum()
                 for h in range(heads)] for c in (0, 2)]
    np.testing.assert_allclose(result["attention_mass_per_head"], np.mean(expected, 0), rtol=1e-5)
    area = np.mean([(cut == c + 1).sum() / (cut != 255).sum() for c in (0, 2)])
    assert result["class_pairs"] == 2 and abs(result["area_fraction"] - area) < 1e-6


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="vpt must be one of"):
        PromptCAM(encoder=MODEL["encoder"], num_classes=3, vpt="middle").init(jax.random.key(0), IMAGES)
    with pytest.raises(ValueError, match="method.classification must be one of"):
        _method(classification="hinge")
    with pytest.raises(ValueError, match="optimizer.name must be one of"):
        PromptCamOptimizer(name="lamb")
    with pytest.raises(ValueError, match="source must be one of"):
        _method().predictor("cams", source="patches")
    with pytest.raises(ValueError, match="smaller than one 8 px patch"):
        PromptCAM(encoder=MODEL["encoder"], num_classes=3).init(jax.random.key(0), jnp.zeros((1, 7, 16, 3)))
