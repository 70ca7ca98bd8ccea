import dataclasses
import os
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

import transforms


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


def check_resumed_config(
    caller: str,
    checkpoint_path: str | os.PathLike | None,
    config: dict[str, Any],
    *,
    resume: bool,
    allow_config_change: bool,
) -> None:
    """A trainer's resume check: refuse a checkpoint written for another
    configuration, before anything is built or compiled, unless the caller allows
    the change. The comparison is [`transforms.check_checkpoint_metadata`][]'s.
    """
    if (
        resume
        and not allow_config_change
        and checkpoint_path is not None
        and os.path.exists(checkpoint_path)
    ):
        transforms.check_checkpoint_metadata(checkpoint_path, config, caller=caller)
