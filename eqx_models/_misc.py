"""Helpers the families share that are not generic enough for `transforms`: the
static fields of a module and a trainer's resume check, both about the families'
own configurations.
"""

import dataclasses
import os
from typing import Any

import equinox as eqx

import transforms

# One pairwise sum for both packages: the models' log-likelihoods and losses sum
# long float32 sequences as the transforms' masked means do.
from transforms._losses._masked import pairwise_sum as pairwise_sum


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
