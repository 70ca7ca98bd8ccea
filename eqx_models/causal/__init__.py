"""Amortised causal surrogates: SCM simulators, an exact parent-set expert, and a
parent-set prediction model trained by behavioural cloning."""

from transforms._train._deprecation import deprecated_aliases as _deprecated_aliases

from ._batches import (
    sample_training_batch as sample_training_batch,
    TrainingBatch as TrainingBatch,
)
from ._candidates import (
    candidate_parent_sets as candidate_parent_sets,
    CandidateSets as CandidateSets,
    MAX_CANDIDATE_SETS as MAX_CANDIDATE_SETS,
)
from ._curriculum import Curriculum as Curriculum, TaskStream as TaskStream
from ._data import Channel as Channel
from ._design import (
    design_interventions as design_interventions,
    DesignResult as DesignResult,
    expected_information_gain as expected_information_gain,
    STRATEGIES as STRATEGIES,
)
from ._evaluation import (
    evaluate_by_mechanism as evaluate_by_mechanism,
    evaluate_surrogate as evaluate_surrogate,
)
from ._expert import (
    candidate_variables as candidate_variables,
    edge_marginals as edge_marginals,
    exact_parent_posterior as exact_parent_posterior,
    ParentSetPosterior as ParentSetPosterior,
)
from ._graphs import GRAPH_FAMILIES as GRAPH_FAMILIES, sample_dag as sample_dag
from ._loss import BehaviouralCloningLoss as BehaviouralCloningLoss
from ._model import ParentSetPredictionModel as ParentSetPredictionModel
from ._nonlinear import (
    AbstractNonlinearSCM as AbstractNonlinearSCM,
    AdditiveFourierSCM as AdditiveFourierSCM,
    MLPSCM as MLPSCM,
    NOISE_MODELS as NOISE_MODELS,
    sample_nonlinear_scm as sample_nonlinear_scm,
)
from ._optimizer import (
    make_optimizer as make_optimizer,
    set_run_length as set_run_length,
    WarmupCosineState as WarmupCosineState,
    weight_decay_mask as weight_decay_mask,
)
from ._scm import (
    LinearGaussianSCM as LinearGaussianSCM,
    sample_linear_gaussian_scm as sample_linear_gaussian_scm,
    simulate as simulate,
)
from ._shortlist import (
    shortlist_parent_posterior as shortlist_parent_posterior,
    ShortlistPosterior as ShortlistPosterior,
)
from ._tasks import (
    MECHANISMS as MECHANISMS,
    sample_task as sample_task,
    Task as Task,
    TaskConfig as TaskConfig,
)
from ._train import train as train


__getattr__ = _deprecated_aliases(
    __name__,
    {
        "train_surrogate": ("train", train),
        "surrogate_optimizer": ("make_optimizer", make_optimizer),
    },
)
