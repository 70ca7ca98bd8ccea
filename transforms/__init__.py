"""Higher-order functions for Equinox models: training steps, loops, checkpoints,
sharding, scanned inference, per-sample gradients and attribution, differentially
private training, divergences and expected-value losses."""

from ._attribution._queries import (
    fisher_inverse as fisher_inverse,
    FisherInverse as FisherInverse,
    influence_scores as influence_scores,
    self_influence as self_influence,
    top_k_scores as top_k_scores,
    tracin_scores as tracin_scores,
)
from ._attribution._store import (
    build_gradient_store as build_gradient_store,
    GradientStore as GradientStore,
    model_fingerprint as model_fingerprint,
    open_gradient_store as open_gradient_store,
)
from ._grad._attribution import (
    AttributionStep as AttributionStep,
    in_run_shapley as in_run_shapley,
    InRunShapley as InRunShapley,
    make_attribution_step as make_attribution_step,
    shapley_values as shapley_values,
    ShapleyState as ShapleyState,
    to_original_scaling as to_original_scaling,
)
from ._grad._calibration import calibrate_projection as calibrate_projection
from ._grad._fallback import (
    FallbackStep as FallbackStep,
    with_fallback as with_fallback,
)
from ._grad._ghost_plan import GhostLeaf as GhostLeaf, GhostPlan as GhostPlan
from ._grad._grad_dot import (
    grad_dot_products as grad_dot_products,
    GradDotProducts as GradDotProducts,
)
from ._grad._grad_norms import (
    per_sample_grad_norms as per_sample_grad_norms,
    PerSampleGradNorms as PerSampleGradNorms,
)
from ._grad._per_sample import (
    GhostFallbackWarning as GhostFallbackWarning,
    per_sample_grads as per_sample_grads,
    PerSampleGrads as PerSampleGrads,
)
from ._grad._projection import (
    projected_grads as projected_grads,
    ProjectedGrads as ProjectedGrads,
    ProjectionBlock as ProjectionBlock,
)
from ._inference._scan import (
    OptimizeStats as OptimizeStats,
    scan_optimize as scan_optimize,
    ScanOptimizer as ScanOptimizer,
    soft_threshold as soft_threshold,
)
from ._losses._cross_entropy import chunked_cross_entropy as chunked_cross_entropy
from ._losses._distributional import (
    hl_gauss as hl_gauss,
    soft_cross_entropy as soft_cross_entropy,
    two_hot as two_hot,
)
from ._losses._divergences import (
    entropy as entropy,
    kl_divergence as kl_divergence,
    total_variation as total_variation,
    uncertainty_weighted as uncertainty_weighted,
    UncertaintyWeighted as UncertaintyWeighted,
)
from ._losses._expected_value import (
    expected_value as expected_value,
    expected_value_loss as expected_value_loss,
)
from ._losses._masked import masked_mean as masked_mean, pairwise_sum as pairwise_sum
from ._losses._sampling import sample_positions as sample_positions
from ._precision import cast_floating as cast_floating
from ._privacy._accounting import (
    dp_epsilon as dp_epsilon,
    dp_noise_multiplier as dp_noise_multiplier,
    PrivacyBudget as PrivacyBudget,
    PrivacyBudgetError as PrivacyBudgetError,
)
from ._privacy._clipping import (
    clipped_grad_sum as clipped_grad_sum,
    ClippedGrads as ClippedGrads,
    ClippedGradSum as ClippedGradSum,
)
from ._privacy._dp_step import (
    DPTrainStep as DPTrainStep,
    make_dp_train_step as make_dp_train_step,
)
from ._privacy._sampling import (
    MaskedBatch as MaskedBatch,
    poisson_sampler as poisson_sampler,
    PoissonSampler as PoissonSampler,
    shuffle_sampler as shuffle_sampler,
    ShuffleSampler as ShuffleSampler,
)
from ._train._batch_sharding import (
    batch_sharding as batch_sharding,
    constrain_batch as constrain_batch,
)
from ._train._checkpoint import (
    check_checkpoint_metadata as check_checkpoint_metadata,
    check_resumed_config as check_resumed_config,
    Checkpoint as Checkpoint,
    CheckpointError as CheckpointError,
    load_checkpoint as load_checkpoint,
    read_checkpoint_metadata as read_checkpoint_metadata,
    save_checkpoint as save_checkpoint,
)
from ._train._describe import (
    describe_config as describe_config,
    static_fields as static_fields,
)
from ._train._fit import (
    fit as fit,
    FitResult as FitResult,
    NonFiniteLossError as NonFiniteLossError,
)
from ._train._optimizer import (
    hashable_optimizer as hashable_optimizer,
    inject_learning_rate as inject_learning_rate,
    injected_learning_rate as injected_learning_rate,
)
from ._train._parameter_sharding import ParameterSharding as ParameterSharding
from ._train._sharded_checkpoint import ShardedCheckpoints as ShardedCheckpoints
from ._train._sharding import replicate as replicate, shard_batch as shard_batch
from ._train._train_step import (
    copy_for_donation as copy_for_donation,
    make_train_step as make_train_step,
    TrainStep as TrainStep,
)
from ._version import __version__ as __version__
