"""Higher-order functions for Equinox models: training steps, loops, checkpoints."""

from ._checkpoint import (
    Checkpoint as Checkpoint,
    CheckpointError as CheckpointError,
    load_checkpoint as load_checkpoint,
    read_checkpoint_metadata as read_checkpoint_metadata,
    save_checkpoint as save_checkpoint,
)
from ._cross_entropy import chunked_cross_entropy as chunked_cross_entropy
from ._distributional import (
    hl_gauss as hl_gauss,
    soft_cross_entropy as soft_cross_entropy,
    two_hot as two_hot,
)
from ._expected_value import (
    expected_value as expected_value,
    expected_value_loss as expected_value_loss,
)
from ._fallback import FallbackStep as FallbackStep, with_fallback as with_fallback
from ._fit import (
    fit as fit,
    FitResult as FitResult,
    NonFiniteLossError as NonFiniteLossError,
)
from ._masked import masked_mean as masked_mean
from ._sampling import sample_positions as sample_positions
from ._sharding import replicate as replicate, shard_batch as shard_batch
from ._train_step import make_train_step as make_train_step, TrainStep as TrainStep
