"""Taps on the attention of any network built on `jaxseg.models.vit.Block` (a ViT, WeakTr, a ViT classifier),
taken from outside the model with Flax method interceptors (`flax.linen.intercept_methods`), so that no
model needs an argument or an output for them and their forward passes stay as they are.

For each tapped call of a block (its `__call__`, counted in call order; `attention_probs` calls are not
counted), a tap records:
  - "probs": the block's softmax attention (B, heads, T, T), recomputed in inference mode from the block's
    input (`Block.attention_probs`: the softmax before any attention dropout), without gradients;
  - "values": the value projection V (B, T, heads, d) of the block's own pass.
With `perturbations`, one array per tapped block is added to the heads' output Y = A V, the input of the
output projection. The gradient of a score s with respect to that zero perturbation is ds/dY, and since the
attention A reaches the output only through Y, ds/dA = ds/dY . V^T exactly, whichever attention kernel the
block runs (`jaxseg.wsss.gradient_attention`).

The blocks must not be rematerialised (the ViT's `remat=False`): a lifted transform traces the block
apart, and its values cannot leave that trace.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Container, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax.core.scope import Scope

from jaxseg.errors import UserError
from jaxseg.models.vit import Attention, Block

Array = jax.Array
_BLOCK_CALL = inspect.signature(Block.__call__)


class _Taps:
    def __init__(self, layers: Container[int] | None, perturbations: Sequence[Array] | None):
        self.layers, self.perturbations = layers, perturbations
        self.calls = 0
        self.current: dict | None = None  # the tap of the block whose __call__ is running
        self.taps: list[dict] = []

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, Block):
            if isinstance(module.parent, Scope):  # the inner module of a lifted transform (remat)
                raise UserError("attention taps need blocks without rematerialisation: build the ViT with "
                                "remat=False")
            index, self.calls = self.calls, self.calls + 1
            if self.current is not None or (self.layers is not None and index not in self.layers):
                return next_fun(*args, **kwargs)
            call = _BLOCK_CALL.bind(module, *args, **kwargs)
            call.apply_defaults()
            x, mask, rope = (call.arguments[name] for name in ("x", "mask", "rope"))
            # Recomputed before the pass starts, so that its projections are not taken for the pass's own.
            tap = {"probs": jax.lax.stop_gradient(module.attention_probs(x, mask, rope))}
            self.taps.append(tap)
            self.current = tap
            try:
                return next_fun(*args, **kwargs)
            finally:
                self.current = None
        if self.current is not None and isinstance(module, nn.Einsum) and isinstance(module.parent, Attention):
            if module.name == "value":
                self.current["values"] = next_fun(*args, **kwargs)
                return self.current["values"]
            if module.name == "out" and self.perturbations is not None:
                heads = args[0] + self.perturbations[len(self.taps) - 1].astype(args[0].dtype)
                return next_fun(heads, *args[1:], **kwargs)
        return next_fun(*args, **kwargs)


def tap_attention(fn: Callable[[], Any], *, layers: Container[int] | None = None,
                  perturbations: Sequence[Array] | None = None) -> tuple[Any, list[dict[str, Array]]]:
    """Runs `fn()` (e.g. `lambda: model.apply(variables, images)`) and returns its result and the taps of
    the block calls numbered in `layers` (default: all), in call order (module docstring).
    `perturbations`: one (B, T, heads, d) array per tapped block, added to its heads' output."""
    taps = _Taps(layers, perturbations)
    with nn.intercept_methods(taps):
        result = fn()
    if perturbations is not None and len(perturbations) != len(taps.taps):
        raise UserError(f"{len(perturbations)} perturbations for {len(taps.taps)} tapped attention blocks")
    return result, taps.taps
