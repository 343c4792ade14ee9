"""MAE pretraining (facebookresearch/mae `main_pretrain.py` + `models_mae.py`): random resized crops (area
0.2-1) with flips, 75% of the patches masked per image, the normalised-pixel loss on the masked ones, AdamW
(betas 0.9 / 0.95, weight decay 0.05 except on biases and norm / 1-D parameters) with a linear warm-up and a
half-cycle cosine per step, the encoder's sine-cosine position embedding kept fixed."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxseg.config import check_rules, module_settings, setting
from jaxseg.data.augment.common import normalize_image, random_hflip
from jaxseg.data.augment.timm import random_resized_crop
from jaxseg.data.datasets import DataConfig
from jaxseg.errors import UserError
from jaxseg.losses.mae import mae_loss, num_kept, random_masking
from jaxseg.methods.base import check_crop_fits_patches, choose
from jaxseg.methods.mae.predictors import ReconstructionMetric, ReconstructionPredictor
from jaxseg.models.mae import MAE
from jaxseg.models.vit import ViT
from jaxseg.ops.posemb import sincos_posemb
from jaxseg.train.optim import decays_weights_only, path_names, warmup_cosine

# Never updated: MAE's encoder position embedding is the fixed sine-cosine table.
FIXED = ("encoder/pos_embed",)


@dataclasses.dataclass(frozen=True)
class MaeOptimizer:
    """MAE's recipe (a config's `optimizer` section): AdamW with betas (0.9, `b2`), weight decay on the
    weight matrices and tokens only, lr warmed up linearly from 0 over the first `warmup` share of the
    steps (MAE: 40 of 800 epochs), then a half-cycle cosine to `min_lr`. `lr` is absolute (MAE's base lr
    1.5e-4 scales by batch / 256)."""
    lr: float = setting(1.5e-4, "finite and >= 0")
    min_lr: float = setting(0.0, "finite and >= 0")
    warmup: float = setting(0.05, "in [0, 1]")
    weight_decay: float = setting(0.05, "finite and >= 0")
    b2: float = setting(0.95, "in [0, 1]")

    def __post_init__(self):
        check_rules(self)

    def build(self, params: Any, total_steps: int) -> optax.GradientTransformation:
        schedule = warmup_cosine(self.lr, self.min_lr, self.warmup, total_steps)
        names = path_names(params)
        adamw = optax.adamw(schedule, b1=0.9, b2=self.b2, eps=1e-8, weight_decay=self.weight_decay,
                            mask=decays_weights_only(params))
        return optax.partition({"trained": adamw, "fixed": optax.set_to_zero()},
                               jax.tree_util.tree_map(lambda name: "fixed" if name in FIXED else "trained", names))


@dataclasses.dataclass
class MaeMethod:
    """`crop_size`: the training crop and the evaluation size (a whole number of patches, the encoder's
    `posemb_grid`); `scale_range`: the area fraction of the random resized crop; `mask_ratio`: the share
    of each image's patches hidden from the encoder; `norm_pix_loss`: regress each patch's pixels
    standardised by their mean and variance."""
    network_class: ClassVar[type] = MAE
    # Where its params hold the pretrained encoder (`jaxseg.train.pretrained` exports that subtree).
    encoder_subtree: ClassVar[str] = "encoder"
    label_space: ClassVar[str] = "categories"  # nothing is predicted per class
    optimizer_class: ClassVar[type] = MaeOptimizer
    predictors: ClassVar[dict] = {"reconstruction": ReconstructionPredictor}
    metrics: ClassVar[dict] = {"reconstruction": ReconstructionMetric}
    model: dict
    optimizer: MaeOptimizer
    total_steps: int
    batch_size: int
    data: DataConfig
    crop_size: int = setting(224, ">= 1")
    scale_range: tuple[float, float] = setting((0.2, 1.0), "in [0, 1]")
    mask_ratio: float = setting(0.75, "in [0, 1]")
    norm_pix_loss: bool = True

    def __post_init__(self):
        check_rules(self)
        self.model = module_settings(self.model)
        self.network = self.network_class(**self.model)
        encoder = self.model["encoder"]
        check_crop_fits_patches(self.crop_size, self.model)
        self.patch_size = encoder.get("patch_size", ViT.patch_size)
        self.grid = (self.crop_size // self.patch_size,) * 2
        posemb_grid = tuple(encoder.get("posemb_grid", ViT.posemb_grid))
        if posemb_grid != self.grid:
            raise UserError(f"model.encoder.posemb_grid {posemb_grid} must be the crop's patch grid {self.grid} "
                            f"(method.crop_size {self.crop_size} / patch {self.patch_size}): MAE's position "
                            f"embedding is the fixed sine-cosine table of that grid")
        self.num_kept = num_kept(self.grid[0] * self.grid[1], self.mask_ratio)

    def init_params(self, rng: jax.Array) -> Any:
        images = jnp.zeros((1, self.crop_size, self.crop_size, 3))
        ids = jnp.arange(self.grid[0] * self.grid[1])[None]
        params = flax.core.unfreeze(self.network.init({"params": rng}, images, ids[:, :self.num_kept], ids)["params"])
        box = params["encoder"]["pos_embed"]
        prefix = box.value.shape[1] - self.grid[0] * self.grid[1]
        params["encoder"]["pos_embed"] = box.replace_boxed(
            jnp.asarray(sincos_posemb(box.value.shape[-1], self.grid, prefix), box.value.dtype))
        return params

    def optimizer_for(self, params: Any) -> optax.GradientTransformation:
        return self.optimizer.build(params, self.total_steps)

    def loss(self, params: Any, batch: dict, rng: jax.Array, step: jax.Array):
        images = batch["image"]
        noise_rng, dropout_rng = jax.random.split(rng)
        noise = jax.random.uniform(noise_rng, (images.shape[0], self.grid[0] * self.grid[1]))
        ids_keep, ids_restore, mask = random_masking(noise, self.num_kept)
        pred = self.network.apply({"params": params}, images, ids_keep, ids_restore, train=True,
                                  rngs={"dropout": dropout_rng})
        loss = mae_loss(pred, images, mask, self.patch_size, self.norm_pix_loss)
        return loss, {"reconstruction": loss}

    def train_transform(self, example: dict, rng: np.random.Generator) -> dict:
        example = random_resized_crop({"image": np.asarray(example["image"])}, rng, (self.crop_size,) * 2,
                                      scale=self.scale_range)
        return {"image": normalize_image(random_hflip(example, rng)["image"])}

    def class_counts(self) -> None:
        """No classes are learned: any dataset fits."""
        return None

    def predictor(self, kind: str, **settings):
        return choose(self.predictors, kind, "MAE predictor")(self, **settings)

    def metric(self, kind: str, **settings):
        return choose(self.metrics, kind, "MAE metric")(**settings)

