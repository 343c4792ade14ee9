"""Segmenter (a ViT with a linear or mask-transformer decoder) on dense labels: WeakTr's stage 2 on
pseudo-labels with the gradient-clipping loss, or supervised. The model is `jaxseg.models.segmenter`, the
losses `jaxseg.losses.gradient_clipping`."""
from jaxseg.methods.segmenter.method import SegmenterMethod, SegmenterOptimizer
from jaxseg.methods.segmenter.predictors import MultiScaleFlipPredictor

__all__ = ["MultiScaleFlipPredictor", "SegmenterMethod", "SegmenterOptimizer"]
