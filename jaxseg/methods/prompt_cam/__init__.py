"""Prompt-CAM (class prompts on a frozen ViT; trait maps from the prompts' last-layer attention). The model
is `jaxseg.models.prompt_cam`, its losses `jaxseg.losses.multilabel`, the CAM pass `jaxseg.wsss.cam`, the
attention-mass measure `jaxseg.metrics.attention_mass`."""
from jaxseg.methods.prompt_cam.method import PromptCamMethod, PromptCamOptimizer
from jaxseg.methods.prompt_cam.predictors import TraitMapPredictor

__all__ = ["PromptCamMethod", "PromptCamOptimizer", "TraitMapPredictor"]
