"""DINO: self-supervised pretraining of the jaxseg ViT by self-distillation (a student matches an EMA
teacher's centred, sharpened output across views of an image). The model is `jaxseg.models.dino`, its loss
`jaxseg.losses.dino`; the teacher's encoder is what EoMT, WeakTr and the Segmenter call their encoder
(`jaxseg.train.pretrained` builds and caches it for their configs' `pretrained` section)."""
from jaxseg.methods.dino.method import DinoMethod, DinoOptimizer
from jaxseg.methods.dino.predictors import AgreementMetric, AgreementPredictor

__all__ = ["AgreementMetric", "AgreementPredictor", "DinoMethod", "DinoOptimizer"]
