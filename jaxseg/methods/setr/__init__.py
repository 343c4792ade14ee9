"""SETR (a ViT with the naive, PUP or MLA convolutional decoder) trained on dense labels. The model is
`jaxseg.models.setr`, the loss `jaxseg.losses.gradient_clipping.pixel_cross_entropy`."""
from jaxseg.methods.setr.method import SetrMethod, SetrOptimizer
from jaxseg.methods.setr.predictors import SlidingPredictor

__all__ = ["SetrMethod", "SetrOptimizer", "SlidingPredictor"]
