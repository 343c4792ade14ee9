"""AFA (affinity from attention): single-stage WSSS on a plain ViT, CAM + affinity + segmentation heads
trained together from image-level labels. The model is `jaxseg.models.afa`, its losses `jaxseg.losses.afa`,
PAR `jaxseg.wsss.par`, the random walk `jaxseg.wsss.random_walk`; docs/afa.md."""
from jaxseg.methods.afa.method import AfaMethod, AfaOptimizer, poly_warmup
from jaxseg.methods.afa.predictors import CAM_THRESHOLD, CamPredictor, RandomWalkPredictor, SegmentationPredictor

__all__ = ["CAM_THRESHOLD", "AfaMethod", "AfaOptimizer", "CamPredictor", "RandomWalkPredictor", "SegmentationPredictor",
           "poly_warmup"]
