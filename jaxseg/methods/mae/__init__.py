"""MAE: self-supervised pretraining of the jaxseg ViT on unlabelled images (masked patches reconstructed from
the visible ones). The model is `jaxseg.models.mae`, its masking and loss `jaxseg.losses.mae`; the encoder
it trains is what EoMT, WeakTr and the Segmenter call their encoder (`jaxseg.train.pretrained` builds and
caches it for their configs' `pretrained` section)."""
from jaxseg.methods.mae.method import MaeMethod, MaeOptimizer
from jaxseg.methods.mae.predictors import ReconstructionMetric, ReconstructionPredictor

__all__ = ["MaeMethod", "MaeOptimizer", "ReconstructionMetric", "ReconstructionPredictor"]
