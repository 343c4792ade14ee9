"""EoMT (encoder-only mask transformer): semantic, instance and panoptic segmentation. The model is
`jaxseg.models.eomt`, the set loss `jaxseg.losses.mask_classification`; here: training (`method`) and
prediction (`predictors`)."""
from jaxseg.methods.eomt.method import Annealing, EomtMethod, EomtOptimizer

__all__ = ["Annealing", "EomtMethod", "EomtOptimizer"]
