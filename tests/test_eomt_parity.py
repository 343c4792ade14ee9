"""EoMT against Hugging Face's `EomtForUniversalSegmentation` and `EomtDinov3ForUniversalSegmentation`
(tiny random configs, CPU, float32).

HF runs masked attention in eval mode wherever its `attn_mask_probs` buffer is > 0 and returns only the
final prediction; the intermediate ones (one per query block, from that block's input) are recomputed
here as `model.predict(model.layernorm(h))` from the hidden states captured entering each query block.
With all probabilities 0 or 1 no random numbers decide anything, so both sides are deterministic.
Tolerance: 1e-5 relative to the largest reference magnitude.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (
    DINOv3ViTConfig,
    DINOv3ViTModel,
    EomtConfig,
    EomtDinov3Config,
    EomtDinov3ForUniversalSegmentation,
    EomtForUniversalSegmentation,
)

from jaxseg.convert import WeightConversionError, from_hf_eomt, from_official_eomt, to_timm
from jaxseg.models.eomt import EoMT, eomt_config
from jaxseg.testing.references.timm_vit import rel_err

TOL = 1e-5
HF_CONFIG = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=4, image_size=64,
                 patch_size=16, num_register_tokens=4, num_blocks=2, num_queries=6, num_labels=5,
                 num_upscale_blocks=2, layerscale_value=0.5)


# DINOv3: RoPE instead of a position embedding, no key bias. (transformers' EoMT-DINOv3 uses `hidden_act`
# for its heads too, so only the GELU MLP of the published S/B/L checkpoints is comparable.)
HF_DINOV3_CONFIG = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                        image_size=64, patch_size=16, num_register_tokens=4, num_blocks=2, num_queries=6,
                        num_labels=5, num_upscale_blocks=2, layerscale_value=0.5)


def _random_hf(model_class, config):
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * (0.3 if param.ndim > 1 else 0.2))
    return model


@pytest.fixture(scope="module")
def hf_model():
    return _random_hf(EomtForUniversalSegmentation, EomtConfig(**HF_CONFIG))


@pytest.fixture(scope="module")
def hf_dinov3_model():
    return _random_hf(EomtDinov3ForUniversalSegmentation, EomtDinov3Config(**HF_DINOV3_CONFIG))


@pytest.fixture(params=["dinov2", "dinov3"])
def any_hf_model(request):
    return request.getfixturevalue({"dinov2": "hf_model", "dinov3": "hf_dinov3_model"}[request.param])


def _images(seed=1):
    return np.random.default_rng(seed).standard_normal((2, 64, 64, 3)).astype(np.float32)


def _hf_predictions(model, images, prob):
    """[(class logits, mask logits)] for every query block's input, then the final output."""
    first = model.config.num_hidden_layers - model.config.num_blocks
    captured = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
             for layer in model.layers[first:]]
    model.attn_mask_probs.fill_(prob)
    try:
        with torch.no_grad():
            out = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
            predictions = [model.predict(model.layernorm(h)) for h in captured]
    finally:
        for hook in hooks:
            hook.remove()
    predictions = [(c.numpy(), m.numpy()) for m, c in predictions]
    predictions.append((out.class_queries_logits.numpy(), out.masks_queries_logits.numpy()))
    return predictions


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_predictions_match_hf(any_hf_model, prob, record_property):
    hf_model = any_hf_model
    config, params = from_hf_eomt(hf_model.state_dict(), hf_model.config)
    model = EoMT(**config)
    images = _images()
    expected = _hf_predictions(hf_model, images, prob)
    apply = jax.jit(lambda p, x, probs: model.apply({"params": p}, x, probs,
                                                    rngs={"masking": jax.random.key(0)}))
    out = apply(params, images, jnp.full((2,), prob))
    assert out["class_logits"].shape[0] == len(expected) == 3
    errors = {}
    for i, (class_logits, mask_logits) in enumerate(expected):
        errors[f"class{i}"] = rel_err(out["class_logits"][i], class_logits)
        errors[f"mask{i}"] = rel_err(out["mask_logits"][i], mask_logits)
    record_property("max_rel_err", max(errors.values()))
    print(f"p={prob}: max relative error {max(errors.values()):.2e} {errors}")
    assert max(errors.values()) <= TOL, errors
    if prob == 0.0:
        # Inference (no probabilities): only the final prediction, equal to the fully annealed one.
        final = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
        assert final["class_logits"].shape[0] == 1
        assert rel_err(final["mask_logits"][0], expected[-1][1]) <= TOL


def test_masks_change_the_prediction(any_hf_model):
    """p = 1 and p = 0 must differ, or the parity above would not test the masking at all."""
    config, params = from_hf_eomt(any_hf_model.state_dict(), any_hf_model.config)
    model = EoMT(**config)
    outs = [model.apply({"params": params}, _images(), jnp.full((2,), p), rngs={"masking": jax.random.key(0)})
            for p in (0.0, 1.0)]
    assert rel_err(outs[0]["mask_logits"][-1], outs[1]["mask_logits"][-1]) > 1e-2


def test_annealing_values_do_not_recompile(hf_model):
    config, params = from_hf_eomt(hf_model.state_dict(), hf_model.config)
    model = EoMT(**config)
    traces = []

    @jax.jit
    def step(p, x, probs, key):
        traces.append(1)
        out = model.apply({"params": p}, x, probs, rngs={"masking": key})
        return jnp.mean(out["mask_logits"] ** 2)

    # Switching each block's masking on and off changes the output: the values are live, not baked in.
    values = [step(params, _images(), jnp.asarray(probs, jnp.float32), jax.random.key(i))
              for i, probs in enumerate([(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0), (0.3, 0.6)])]
    assert len(traces) == 1
    assert len({float(v) for v in values[:4]}) == 4


def _official_state_dict(config, params):
    """The tue-mps/eomt layout (under Lightning's `network.` prefix) of the same weights."""
    sd = {f"network.encoder.backbone.{k}": np.asarray(v)
          for k, v in to_timm(params["encoder"], config["encoder"]).items()}
    sd.update(_official_heads(params))
    return sd


def _official_heads(params):
    sd = {"network.q.weight": params["queries"]}
    sd["network.class_head.weight"] = params["class_head"]["kernel"].T
    sd["network.class_head.bias"] = params["class_head"]["bias"]
    for i in range(3):
        sd[f"network.mask_head.{2 * i}.weight"] = params[f"mask_head_{i}"]["kernel"].T
        sd[f"network.mask_head.{2 * i}.bias"] = params[f"mask_head_{i}"]["bias"]
    for i in range(2):
        block = params[f"upscale_{i}"]
        sd[f"network.upscale.{i}.conv1.weight"] = block["conv1"]["kernel"].transpose(2, 3, 0, 1)
        sd[f"network.upscale.{i}.conv1.bias"] = block["conv1"]["bias"]
        sd[f"network.upscale.{i}.conv2.weight"] = block["conv2"]["kernel"].transpose(3, 2, 0, 1)
        sd[f"network.upscale.{i}.norm.weight"] = block["norm"]["scale"]
        sd[f"network.upscale.{i}.norm.bias"] = block["norm"]["bias"]
    sd["network.attn_mask_probs"] = np.zeros(2, np.float32)
    return {k: np.asarray(v) for k, v in sd.items()}


def test_official_layout_converts_to_the_same_model(hf_model):
    config, params = from_hf_eomt(hf_model.state_dict(), hf_model.config)
    official = _official_state_dict(config, params)
    official_config, official_params = from_official_eomt(official, num_query_blocks=2, num_heads=4)
    assert official_config["normalize_input"] is True  # the official network normalises inside
    assert dict(official_config, normalize_input=False) == config
    flat = jax.tree_util.tree_leaves_with_path(params)
    other = dict(jax.tree_util.tree_leaves_with_path(official_params))
    for path, value in flat:
        np.testing.assert_array_equal(other[path], value, err_msg=jax.tree_util.keystr(path))

    broken = dict(official)
    del broken["network.mask_head.2.bias"]
    broken["network.extra.weight"] = np.zeros(3)
    with pytest.raises(WeightConversionError) as info:
        from_official_eomt(broken, num_query_blocks=2, num_heads=4)
    assert "- missing     mask_head.2.bias" in str(info.value)
    assert "+ unexpected  extra.weight" in str(info.value)


def test_masked_train_step_compiles_once_across_annealing(hf_model):
    """Model + set loss + optimizer step under one jit: the annealing probabilities are data."""
    import optax

    from jaxseg.losses.mask_classification import SetLossConfig, Targets, set_loss
    from jaxseg.methods.eomt.annealing import mask_annealing_probs, mask_annealing_windows

    config, params = from_hf_eomt(hf_model.state_dict(), hf_model.config)
    model = EoMT(**config)
    rng = np.random.default_rng(0)
    targets = Targets(masks=(rng.random((2, 3, 64, 64)) > 0.5).astype(np.float32),
                      labels=rng.integers(0, 5, (2, 3)).astype(np.int32),
                      valid=np.array([[True, True, False], [True, False, False]]))
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    starts, ends = mask_annealing_windows(60, 2)
    traces = []

    @jax.jit
    def train_step(params, opt_state, step, key):
        traces.append(1)
        mask_key, loss_key = jax.random.split(key)

        def loss_fn(p):
            out = model.apply({"params": p}, _images(), mask_annealing_probs(step, starts, ends),
                              rngs={"masking": mask_key})
            return set_loss(out["class_logits"], out["mask_logits"], targets, loss_key,
                            SetLossConfig(num_points=64))

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for step in (0, 15, 25, 40, 59):
        params, opt_state, loss = train_step(params, opt_state, step, jax.random.key(step))
        losses.append(float(loss))
    assert len(traces) == 1
    assert all(np.isfinite(losses))


@pytest.mark.parametrize("size,width,depth,heads", [("S", 384, 12, 6), ("L", 1024, 24, 16),
                                                     ("g", 1536, 40, 24)])
def test_variant_parameter_counts_match_hf(size, width, depth, heads):
    """Shape-only (nothing is allocated): the 640 px COCO-panoptic variants have exactly as many
    parameters as transformers' EoMT built with the same sizes."""
    config = eomt_config(size, num_classes=133, num_queries=200, image_size=640)
    abstract = jax.eval_shape(lambda: EoMT(**config).init(
        {"params": jax.random.key(0), "masking": jax.random.key(1)}, jnp.zeros((1, 640, 640, 3))))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract["params"]))
    with torch.device("meta"):
        reference = EomtForUniversalSegmentation(EomtConfig(
            hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, image_size=640,
            patch_size=16, num_blocks=config["num_query_blocks"], num_queries=200, num_labels=133,
            use_swiglu_ffn=size == "g"))
    assert ours == sum(p.numel() for p in reference.parameters())


def _dinov3_backbone(seed, **overrides):
    """A random transformers DINOv3 ViT of the EoMT test's size (the 'published DINOv3 weights')."""
    torch.manual_seed(seed)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
            "num_register_tokens")
    model = DINOv3ViTModel(DINOv3ViTConfig(**{**{k: HF_DINOV3_CONFIG[k] for k in keys}, **overrides}))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _delta_checkpoint(hf_dinov3_model):
    """(the official-layout delta checkpoint of the transformers model, its random DINOv3 base)."""
    _, params = from_hf_eomt(hf_dinov3_model.state_dict(), hf_dinov3_model.config)
    base = _dinov3_backbone(seed=1)
    # transformers EoMT prefix -> (tue-mps/eomt backbone prefix, DINOv3ViTModel prefix)
    renames = {"embeddings.": ("patch_embed.", "embeddings."), "layers.": ("blocks.", "model.layer."),
               "layernorm.": ("norm.", "norm.")}
    delta = {}
    for key, value in hf_dinov3_model.state_dict().items():
        old = next((o for o in renames if key.startswith(o)), None)
        if old is None:
            continue
        official, dinov3 = renames[old]
        name = key[len(old):]
        delta[f"network.encoder.backbone.{official}{name}"] = value.numpy() - base[dinov3 + name]
    delta.update(_official_heads(params))
    return delta, base


def test_official_dinov3_delta_checkpoint(hf_dinov3_model):
    """tue-mps/eomt publishes DINOv3 EoMT weights as differences from the DINOv3 backbone: the delta plus
    the base gives the fine-tuned model (here, the transformers model), to float32 round-off."""
    config, params = from_hf_eomt(hf_dinov3_model.state_dict(), hf_dinov3_model.config)
    delta, base = _delta_checkpoint(hf_dinov3_model)
    official_config, official_params = from_official_eomt(delta, num_query_blocks=2, base=base, num_heads=4,
                                                          layernorm_eps=1e-6)
    assert official_config["encoder"] == config["encoder"]
    other = dict(jax.tree_util.tree_leaves_with_path(official_params))
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        np.testing.assert_allclose(other[path], value, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))

    with pytest.raises(WeightConversionError, match="pass the DINOv3 backbone file as the base"):
        from_official_eomt(delta, num_query_blocks=2, num_heads=4)
    with pytest.raises(WeightConversionError, match="does not match the checkpoint's encoder: depth 2"):
        from_official_eomt(delta, num_query_blocks=2, num_heads=4,
                           base=_dinov3_backbone(seed=1, num_hidden_layers=2))
    with pytest.raises(WeightConversionError, match="not a DINOv3 ViT state dict"):
        from_official_eomt(delta, num_query_blocks=2, num_heads=4, base={"pos_embed": np.zeros((1, 5, 64))})


def test_convert_tool_adds_the_dinov3_base(hf_dinov3_model, tmp_path, capsys):
    """jaxseg-convert on an official DINOv3 EoMT delta file and its DINOv3 backbone file gives the same
    params as the library call; without --base it refuses with one line."""
    from safetensors.numpy import save_file

    from jaxseg.cli import convert_weights
    from jaxseg.convert.params_io import load_params

    delta, base = _delta_checkpoint(hf_dinov3_model)
    save_file({k: np.ascontiguousarray(v) for k, v in delta.items()}, tmp_path / "delta.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in base.items()}, tmp_path / "dinov3.safetensors")
    common = ["--input", str(tmp_path / "delta.safetensors"), "--num-query-blocks", "2", "--num-heads", "4"]
    assert convert_weights.main([*common, "--output", str(tmp_path / "no_base.msgpack")]) == 2
    assert "error: this is a DINOv3 EoMT checkpoint" in capsys.readouterr().err
    assert convert_weights.main([*common, "--base", str(tmp_path / "dinov3.safetensors"),
                                 "--output", str(tmp_path / "eomt.msgpack")]) == 0
    config, params = load_params(tmp_path / "eomt.msgpack")
    expected_config, expected = from_official_eomt(delta, num_query_blocks=2, base=base, num_heads=4)
    assert config == expected_config
    for (path, value), (_, other) in zip(jax.tree_util.tree_leaves_with_path(expected),
                                         jax.tree_util.tree_leaves_with_path(params), strict=True):
        np.testing.assert_array_equal(other, value, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("size,width,depth,heads", [("S", 384, 12, 6), ("L", 1024, 24, 16)])
def test_dinov3_variant_parameter_counts_match_hf(size, width, depth, heads):
    """Shape-only: the DINOv3 EoMT variants have as many parameters as transformers' EoMT-DINOv3."""
    config = eomt_config(size, num_classes=133, num_queries=200, image_size=640, backbone="dinov3")
    abstract = jax.eval_shape(lambda: EoMT(**config).init(
        {"params": jax.random.key(0), "masking": jax.random.key(1)}, jnp.zeros((1, 640, 640, 3))))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract["params"]))
    with torch.device("meta"):
        reference = EomtDinov3ForUniversalSegmentation(EomtDinov3Config(
            hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * width,
            image_size=640, num_blocks=config["num_query_blocks"], num_queries=200, num_labels=133))
    assert ours == sum(p.numel() for p in reference.parameters())
