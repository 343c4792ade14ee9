"""Pixel normalisation shared by models (EoMT normalises inside the network) and tools."""
import jax
import jax.numpy as jnp

from jaxseg.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (mean, std) by name: ImageNet's, or timm's "inception" 0.5 / 0.5, which rstrudel/segmenter's ViT
# backbones (and so WeakTr's best stage-2 model, ViT-S/16 at 384) were trained with.
PIXEL_STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
# Slack around [0, 1] for resampling overshoot (bicubic resizes ring slightly past the range).
UNIT_RANGE_SLACK = 0.01


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(x - mean) / std over the last (channel) axis of RGB images in [0, 1]."""
    images = jnp.asarray(images)
    return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def check_unit_range(images) -> None:
    """Refuses concrete images outside [0, 1] (with `UNIT_RANGE_SLACK`): 0-255 pixel values given to a model
    that expects [0, 1] would otherwise predict garbage without a word. Traced values (inside jit) cannot be
    looked at and pass; jaxseg's own pipelines scale by 1/255 themselves."""
    if isinstance(images, jax.core.Tracer):
        return
    low, high = float(jnp.min(images)), float(jnp.max(images))
    if low < -UNIT_RANGE_SLACK or high > 1 + UNIT_RANGE_SLACK:
        raise UserError(f"images hold values in [{low:g}, {high:g}]; this model takes RGB in [0, 1] (divide 8-bit "
                        f"pixels by 255)")
