"""jaxseg's CLIP against transformers' `CLIPModel` and against the OpenAI-layout reference
(`jaxseg/testing/references/clip_es.py`): random weights, tiny sizes, CPU float32, through
`jaxseg.convert.from_clip`. Tolerance 1e-5 relative to the largest magnitude of the reference (a few
layers of float32 round-off are ~1e-6). Also the converter's layouts, its name diff, the CLIP-ES position
embedding resampling (bilinear) at other image sizes, and `jaxseg-convert --layout clip`."""
import jax
import numpy as np
import pytest
import torch

from jaxseg.cli import convert_weights
from jaxseg.convert import WeightConversionError, from_clip
from jaxseg.convert.params_io import load_params
from jaxseg.models.clip import CLIP
from jaxseg.testing.references.clip_es import random_clip
from jaxseg.testing.references.timm_vit import rel_err

TOL = 1e-5
VOCAB, CONTEXT = 99, 16


def _token_ids(count, length, vocab, seed=4):
    """Random ids below the end token (vocab - 1, the largest id), the end token at varying positions,
    zero padding after it (OpenAI's tokenizer)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab - 1, (count, length))
    for row, end in enumerate(rng.integers(1, length, count)):
        ids[row, end] = vocab - 1
        ids[row, end + 1:] = 0
    return ids.astype(np.int32)


def _images(size, batch=2, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, *size, 3)).astype(np.float32)


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "logit_scale":
                norm = "norm" in name and name.endswith("weight")
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if norm else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def hf_clip():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CONTEXT, eos_token_id=VOCAB - 1,
                         bos_token_id=VOCAB - 2, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8),
        projection_dim=24)
    return _randomize(CLIPModel(config)), config


def _apply(config, params, images, token_ids):
    return jax.jit(lambda p, x, t: CLIP(**config).apply({"params": p}, x, t))(params, images, token_ids)


def test_matches_transformers(hf_clip):
    model, hf_config = hf_clip
    config, params = from_clip(model.state_dict(), hf_config)
    assert (config["vision"]["num_heads"], config["text"]["num_heads"], config["embed_dim"]) == (3, 2, 24)
    assert from_clip(model.state_dict(), hf_config.to_dict())[0] == config  # config.json's dict works too
    images, token_ids = _images((32, 32)), _token_ids(3, CONTEXT, VOCAB)
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
        ids = torch.from_numpy(token_ids).long()
        expected = model(input_ids=ids, pixel_values=pixels)
        image_features = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        text_features = model.get_text_features(input_ids=ids).pooler_output.numpy()
    out = _apply(config, params, images, token_ids)
    errors = {"image_features": rel_err(out["image_features"], image_features),
              "text_features": rel_err(out["text_features"], text_features),
              "logits_per_image": rel_err(out["logits_per_image"], expected.logits_per_image.numpy())}
    print(errors)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_openai_layout_matches_reference(size):
    """OpenAI's names (the reference's state dict); at 40 x 56 the position embedding is resampled
    bilinearly, as CLIP-ES's `upsample_pos_emb` does."""
    reference = random_clip()
    config, params = from_clip(reference.state_dict(), vision_num_heads=4, text_num_heads=2)
    assert config["vision"]["posemb_resize"] == "bilinear" and config["vision"]["mlp_type"] == "quick_gelu"
    images, token_ids = _images(size), _token_ids(3, 12, 40)
    with torch.no_grad():
        image_features = reference.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        text_features = reference.encode_text(torch.from_numpy(token_ids).long()).numpy()
    out = _apply(config, params, images, token_ids)
    errors = {"image_features": rel_err(out["image_features"], image_features),
              "text_features": rel_err(out["text_features"], text_features)}
    print(size, errors)
    assert max(errors.values()) <= TOL, errors


def test_layouts_give_the_same_params():
    """open_clip's `CustomTextCLIP` names (text tower under `text.`) and a checkpoint wrapper read as the
    plain OpenAI names do; the fp16 release's bookkeeping entries are dropped."""
    sd = {k: v.numpy() for k, v in random_clip().state_dict().items()}
    _, plain = from_clip(sd, vision_num_heads=4, text_num_heads=2)
    custom = {("text." + k if k.split(".")[0] in ("transformer", "token_embedding", "positional_embedding",
                                                  "ln_final", "text_projection") else k): v for k, v in sd.items()}
    custom.update(input_resolution=np.asarray(32), context_length=np.asarray(12), vocab_size=np.asarray(40))
    _, converted = from_clip({"state_dict": {"module." + k: v for k, v in custom.items()}}, vision_num_heads=4,
                             text_num_heads=2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, plain, converted)


def test_name_diff_on_mismatch():
    sd = {k: v.numpy() for k, v in random_clip().state_dict().items()}
    sd.pop("visual.transformer.resblocks.1.ln_2.bias")
    sd["visual.transformer.resblocks.0.mlp.c_fc.weight"] = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"][:, :8]
    sd["visual.extra_head.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(WeightConversionError) as error:
        from_clip(sd, vision_num_heads=4, text_num_heads=2)
    message = str(error.value)
    print(message)
    assert "- missing     visual.blocks.1.norm2.bias" in message
    assert "+ unexpected  visual.extra_head.weight" in message
    assert "~ shape       visual.blocks.0.mlp.fc1.weight: got (256, 8), expected (256, 64)" in message
    assert "(checkpoint: visual.transformer.resblocks.0.mlp.c_fc.weight)" in message
    with pytest.raises(WeightConversionError, match="not a CLIP state dict"):
        from_clip({"patch_embed.proj.weight": np.zeros((8, 3, 4, 4), np.float32)})
    with pytest.raises(WeightConversionError, match="text_num_heads"):
        from_clip({k: v.numpy() for k, v in random_clip().state_dict().items()}, vision_num_heads=4)


def test_convert_tool(tmp_path):
    """`jaxseg-convert --layout clip` (detected too) writes a file that `load_params` reads back equal."""
    import safetensors.torch

    reference = random_clip()
    path = tmp_path / "clip.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    out = tmp_path / "clip.msgpack"
    assert convert_weights.main(["--input", str(path), "--output", str(out), "--num-heads", "4",
                                 "--text-num-heads", "2"]) == 0
    config, params = load_params(out)
    expected_config, expected = from_clip(reference.state_dict(), vision_num_heads=4, text_num_heads=2)
    assert config == expected_config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
