"""Weight converters: PyTorch checkpoints (timm / DeiT / DINOv2, DINOv3, EoMT, WeakTr, Segmenter,
CLIP) -> jaxseg Flax params."""
from jaxseg.convert.clip import from_clip
from jaxseg.convert.dinov3 import from_dinov3
from jaxseg.convert.eomt import from_hf_eomt, from_official_eomt
from jaxseg.convert.segmenter import from_official_segmenter
from jaxseg.convert.state_dict import WeightConversionError, load_state_dict
from jaxseg.convert.timm import from_timm, infer_config, to_timm
from jaxseg.convert.weaktr import from_official_weaktr

__all__ = ["WeightConversionError", "load_state_dict", "from_timm", "infer_config", "to_timm", "from_dinov3",
           "from_hf_eomt", "from_official_eomt", "from_official_weaktr", "from_official_segmenter",
           "from_clip"]
