"""Initialisers shared by the models."""
import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_default(fan_in: int, axes: tuple | None = None):
    """PyTorch's default init of Linear / Conv weights (kaiming-uniform, a=sqrt(5)) and biases:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); EoMT and WeakTr keep it for their new layers. With `axes`, the
    initialiser carries logical axis names."""
    bound = 1.0 / fan_in ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init if axes is None else nn.with_logical_partitioning(init, axes)


def torch_dense(features: int, fan_in: int, name: str, *, use_bias: bool = True, dtype=jnp.float32,
                param_dtype=jnp.float32, axes: tuple | None = None) -> nn.Dense:
    """A Dense layer initialised as PyTorch's nn.Linear; `axes` = logical names of (in, out)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=torch_default(fan_in, axes),
                    bias_init=torch_default(fan_in, None if axes is None else axes[-1:]))
