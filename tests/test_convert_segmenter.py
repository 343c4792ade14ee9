"""`from_official_segmenter`: official Segmenter (rstrudel/segmenter) and WeakTr stage-2 checkpoints (the
layout of `jaxseg/testing/references/segmenter.py`, saved as the official `train.py` saves them) -> jaxseg
`Segmenter`, through a file and the CLI; the decoder alone (`Segmenter.decode`); the errors that name what
does not fit. Random weights, CPU, float32, tolerance 1e-5 relative to the reference outputs. The read-outs
are a LayerNorm over the classes of cosine similarities, which amplifies float32 rounding (the reference
itself is that far from its float64 run): over 8 seeds and both input sizes the worst errors were 1.2e-6
(linear), 4.3e-6 (mask transformer) and 2.9e-6 (WeakTr's two read-outs) with 21 classes, up to 1.2e-5
with 6."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxseg.cli import convert_weights
from jaxseg.convert import WeightConversionError, from_official_segmenter, load_state_dict
from jaxseg.convert.params_io import load_params
from jaxseg.models.segmenter import Segmenter
from jaxseg.testing.references.segmenter import (
    TorchDecoderLinear,
    TorchMaskTransformer,
    TorchMultiMaskTransformer,
    TorchSegmenter,
    TorchSegmenterViT,
    randomize,
)
from jaxseg.testing.references.timm_vit import rel_err
from jaxseg.train.checkpoint import load_init_params

N_CLS, WIDTH, HEADS, PATCH = 21, 64, 4, 8
CASES = {
    # Seg-B†/16: a distilled DeiT encoder (class and distillation tokens) under the linear decoder.
    "linear_distilled": (lambda: TorchDecoderLinear(N_CLS, WIDTH), dict(distilled=True)),
    # Seg-S-Mask/16: a ViT encoder under the mask transformer (the read-out after its last block).
    "mask_transformer": (lambda: TorchMaskTransformer(N_CLS, WIDTH, HEADS), {}),
    # WeakTr stage 2 over DINOv2-S: LayerScale in the encoder, the read-outs after both decoder blocks.
    "weaktr_dinov2": (lambda: TorchMultiMaskTransformer(N_CLS, WIDTH, HEADS), dict(init_values=1.0)),
}
# (37, 50) is padded to (40, 56): a 5 x 7 grid, so the 4 x 4 position embedding is resized bilinearly.
SIZES = [(32, 32), (37, 50)]


def _reference(case: str) -> TorchSegmenter:
    decoder, encoder_options = CASES[case]
    encoder = TorchSegmenterViT((32, 32), PATCH, WIDTH, depth=2, num_heads=HEADS, **encoder_options)
    return randomize(TorchSegmenter(encoder, decoder()), seed=1, scale=0.2)


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    """(case, reference, Segmenter config, params) through a checkpoint file as train.py writes it."""
    reference = _reference(request.param)
    path = tmp_path_factory.mktemp(request.param) / "checkpoint.pth"
    torch.save({"model": reference.state_dict(), "optimizer": torch.optim.SGD(reference.parameters(), 0.1).state_dict(),
                "n_cls": N_CLS, "lr_scheduler": {"last_epoch": 7}, "epoch": 7}, path)
    config, params = from_official_segmenter(load_state_dict(path), num_heads=HEADS, decoder_heads=HEADS)
    return request.param, reference, config, params


def _images(size) -> np.ndarray:
    return np.random.default_rng(2).standard_normal((2, *size, 3)).astype(np.float32)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", SIZES)
def test_converted_checkpoint_matches_reference(converted, size):
    case, reference, config, params = converted
    encoder = config["encoder"]
    assert (encoder["layernorm_eps"], encoder["posemb_resize"], encoder["posemb_grid"]) == (1e-5, "bilinear", (4, 4))
    assert encoder["num_cls_tokens"] == (2 if case == "linear_distilled" else 1)
    assert (encoder["layerscale_init"] is not None) == (case == "weaktr_dinov2")
    assert config["decoder"] == ("linear" if case == "linear_distilled" else "mask_transformer")
    images = _images(size)
    with torch.no_grad():
        expected = reference(_nchw(images))
    logits = jax.jit(lambda p, x: Segmenter(**config).apply({"params": p}, x))(params, images)
    assert logits.shape == ((1 if case == "linear_distilled" else 2), 2, *size, N_CLS)
    # The official MaskTransformer returns its last read-out, MultiMaskTransformer both.
    errors = [rel_err(out, e.permute(0, 2, 3, 1).numpy()) for out, e in zip(logits[-len(expected):], expected)]
    print(case, size, errors)
    assert max(errors) <= 1e-5


def test_decoder_alone_matches_reference(converted):
    """`Segmenter.decode` on the official encoder's tokens of a 5 x 7 grid equals the official decoder's
    forward at patch resolution."""
    case, reference, config, params = converted
    with torch.no_grad():
        tokens = reference.encoder.forward_features(_nchw(_images((40, 56))))[:, reference.encoder.num_prefix_tokens:]
        expected = reference.decoder(tokens, 5)
    expected = expected if isinstance(expected, tuple) else (expected,)
    decode = jax.jit(lambda p, t: Segmenter(**config).apply({"params": p}, t, (5, 7), method=Segmenter.decode))
    readouts = decode(params, tokens.numpy())
    assert readouts.shape[1:] == (2, 5, 7, N_CLS)
    errors = [rel_err(out, e.permute(0, 2, 3, 1).numpy()) for out, e in zip(readouts[-len(expected):], expected)]
    print(case, errors)
    assert max(errors) <= 1e-5
    with pytest.raises(ValueError, match=r"tokens must be \(batch, 5 x 8 patches, width 64\) for grid \(5, 8\)"):
        Segmenter(**config).apply({"params": params}, tokens.numpy(), (5, 8), method=Segmenter.decode)


def test_convert_cli_detects_the_segmenter_layout(tmp_path):
    """The CLI writes the Segmenter's keyword arguments and params, which load through the trainer's
    `load_init_params` as the whole model (train.init_checkpoint with init_into="")."""
    reference = _reference("weaktr_dinov2")
    torch.save({"model": reference.state_dict(), "epoch": 1}, tmp_path / "checkpoint.pth")
    out = tmp_path / "segmenter.msgpack"
    assert convert_weights.main(["--input", str(tmp_path / "checkpoint.pth"), "--output", str(out),
                                 "--num-heads", str(HEADS), "--decoder-heads", str(HEADS)]) == 0
    config, params = load_params(out)
    expected_config, expected = from_official_segmenter(reference.state_dict(), num_heads=HEADS, decoder_heads=HEADS)
    assert config == expected_config
    network = Segmenter(**config)
    abstract = jax.eval_shape(lambda: network.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    loaded = load_init_params(out, abstract)
    flat = flax.traverse_util.flatten_dict(loaded, sep="/")
    for key, value in flax.traverse_util.flatten_dict(expected, sep="/").items():
        np.testing.assert_array_equal(np.asarray(flat[key]), value, err_msg=key)
    # The official rule for the decoder's heads: width / 64.
    assert from_official_segmenter(reference.state_dict(), num_heads=HEADS)[0]["decoder_heads"] == 1
    assert convert_weights.main(["--input", str(tmp_path / "checkpoint.pth"), "--output",
                                 str(tmp_path / "segmenter_orbax"), "--num-heads", str(HEADS)]) == 2


def _numpy_sd(case: str) -> dict:
    return {k: v.numpy() for k, v in _reference(case).state_dict().items()}


@pytest.mark.parametrize("case", ["mask_transformer", "linear_distilled"])
def test_missing_and_extra_names_are_listed(case):
    sd = _numpy_sd(case)
    missing = "decoder.blocks.1.mlp.fc2.bias" if case == "mask_transformer" else "encoder.blocks.1.norm2.weight"
    del sd[missing]
    sd["decoder.extra.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(WeightConversionError) as error:
        from_official_segmenter(sd, num_heads=HEADS, decoder_heads=HEADS)
    message = str(error.value)
    assert f"- missing     {missing}" in message and "+ unexpected  decoder.extra.weight (3, 3)" in message, message


def test_mismatches_are_named():
    sd = _numpy_sd("mask_transformer")
    with pytest.raises(WeightConversionError,
                       match=r"shape +decoder\.cls_emb: got \(1, 21, 32\), expected \(1, 21, 64\)"):
        from_official_segmenter(dict(sd, **{"decoder.cls_emb": sd["decoder.cls_emb"][..., :32]}), num_heads=HEADS)
    with pytest.raises(WeightConversionError, match=r"missing +encoder\.norm\.weight"):
        from_official_segmenter({k: v for k, v in sd.items() if k != "encoder.norm.weight"}, num_heads=HEADS)
    with pytest.raises(WeightConversionError, match="cannot infer the number of heads for width 64"):
        from_official_segmenter(sd)
    with pytest.raises(WeightConversionError, match="EVA-02"):
        from_official_segmenter(dict(sd, **{"encoder.blocks.0.attn.q_bias": np.zeros(64, np.float32)}))
    with pytest.raises(WeightConversionError, match="not a Segmenter state dict"):
        from_official_segmenter({k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")})
    assert convert_weights.detect_layout(sd) == "segmenter"


def test_pixel_stats_reach_training_and_prediction():
    """ViT-S† checkpoints want 0.5 / 0.5 inputs: `method.pixel_stats` normalises the training crops and the
    predictor's windows alike; an unknown name is one clear error."""
    from jaxseg.config import apply_overrides, load_config
    from jaxseg.data.augment.mmseg import weaktr_stage2_example
    from jaxseg.errors import UserError
    from jaxseg.methods import build
    from jaxseg.runs import sections

    image = np.full((40, 40, 3), 255, np.uint8)
    example = {"image": image, "semantic": np.zeros((40, 40), np.uint8)}
    out = weaktr_stage2_example(example, np.random.default_rng(0), crop=32, base=36, photometric=False,
                                pixel_stats=((0.5,) * 3, (0.5,) * 3))
    assert np.allclose(out["image"][:8, :8], 1.0)  # white is (1 - 0.5) / 0.5 under the inception stats
    config = load_config("configs/segmenter/scenes.py:runlocal")
    apply_overrides(config, ["method.pixel_stats=inception"])
    assert build(config, sections(config).data).pixel_stats == "inception"
    apply_overrides(config, ["method.pixel_stats=imagenet21k"])
    with pytest.raises(UserError, match="method.pixel_stats must be one of"):
        build(config, sections(config).data)
