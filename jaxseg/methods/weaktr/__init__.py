"""WeakTr stage 1 (CAMs from image-level labels; MCTformer with `fusion="mctformer"`). The model is
`jaxseg.models.weaktr`, its loss `jaxseg.losses.multilabel`, the CAM tools `jaxseg.wsss.cam`; stage 2 is the
`segmenter` method on the pseudo-labels."""
from jaxseg.methods.weaktr.method import WeakTrMethod, WeakTrOptimizer, timm_cosine_per_epoch
from jaxseg.methods.weaktr.predictors import PSEUDO_LABEL_THRESHOLD, CamPredictor

__all__ = ["PSEUDO_LABEL_THRESHOLD", "CamPredictor", "WeakTrMethod", "WeakTrOptimizer", "timm_cosine_per_epoch"]
