"""JAX ↔ PyTorch bridge (needs `pip install eqx-models[torch]`)."""

from ._torch_bridge import (
    jax_to_torch as jax_to_torch,
    to_jax as to_jax,
    to_torch as to_torch,
    torch_to_jax as torch_to_jax,
)
