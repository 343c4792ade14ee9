"""Pixel normalisation shared by models (EoMT normalises inside the network) and tools."""
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(x - mean) / std over the last (channel) axis of RGB images in [0, 1]."""
    images = jnp.asarray(images)
    return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)
