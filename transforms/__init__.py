"""Higher-order functions for Equinox models: training steps, loops, checkpoints."""

from ._checkpoint import (
    Checkpoint as Checkpoint,
    CheckpointError as CheckpointError,
    load_checkpoint as load_checkpoint,
    read_checkpoint_metadata as read_checkpoint_metadata,
    save_checkpoint as save_checkpoint,
)
from ._divergences import (
    entropy as entropy,
    kl_divergence as kl_divergence,
    total_variation as total_variation,
    uncertainty_weighted as uncertainty_weighted,
    UncertaintyWeighted as UncertaintyWeighted,
)
from ._fallback import FallbackStep as FallbackStep, with_fallback as with_fallback
from ._fit import (
    fit as fit,
    FitResult as FitResult,
    NonFiniteLossError as NonFiniteLossError,
)
from ._sharding import replicate as replicate, shard_batch as shard_batch
from ._train_step import make_train_step as make_train_step, TrainStep as TrainStep
