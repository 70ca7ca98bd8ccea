import dataclasses
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


def pairwise_sum(x: Float[Array, " n"]) -> Float[Array, ""]:
    """Sum a vector by pairwise (tree) reduction.

    A float32 running sum over `n` terms accumulates an error that grows like `n`;
    pairwise summation keeps it near `log2(n)` ulps, which matters for
    log-likelihoods and losses summed over tens of thousands of time steps.
    """
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.zeros((1,), x.dtype)])
        x = x[0::2] + x[1::2]
    return x.sum()


def static_fields(module: eqx.Module) -> dict[str, Any]:
    """The static fields of a module by name: the hyperparameters that a trainer
    records with its checkpoints and compares on resume."""
    return {
        field.name: getattr(module, field.name)
        for field in dataclasses.fields(module)
        if field.metadata.get("static", False)
    }
