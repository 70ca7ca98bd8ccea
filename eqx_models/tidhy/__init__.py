"""TiDHy: timescale demixing via hypernetworks, with compiled latent inference."""

from transforms._train._deprecation import deprecated_aliases as _deprecated_aliases

from ._evaluate import evaluate_record as evaluate_record, Record as Record
from ._inference import (
    infer as infer,
    infer_first_step as infer_first_step,
    InferenceConfig as InferenceConfig,
    InferenceStats as InferenceStats,
)
from ._metrics import (
    fit_linear_dynamics as fit_linear_dynamics,
    knn_classify as knn_classify,
    r2_score as r2_score,
    state_decoding_accuracy as state_decoding_accuracy,
    timescales as timescales,
)
from ._model import (
    HyperNetwork as HyperNetwork,
    SpatialDecoder as SpatialDecoder,
    TiDHy as TiDHy,
)
from ._optimizer import make_optimizer as make_optimizer
from ._rossler import (
    make_rossler as make_rossler,
    rossler_vector_field as rossler_vector_field,
    RosslerSample as RosslerSample,
)
from ._sessions import (
    load_sessions as load_sessions,
    Sessions as Sessions,
    SessionWindows as SessionWindows,
)
from ._slds import SLDSSample as SLDSSample, SwitchingLDS as SwitchingLDS
from ._stream import (
    evaluate_recording as evaluate_recording,
    evaluate_sessions as evaluate_sessions,
    Trajectory as Trajectory,
)
from ._train import train as train
from ._training import (
    GradNormState as GradNormState,
    init_learner as init_learner,
    Learner as Learner,
    regularisers as regularisers,
    task_losses_from_latents as task_losses_from_latents,
    TaskLosses as TaskLosses,
    TiDHyTrainConfig as TiDHyTrainConfig,
    training_loss as training_loss,
)
from ._windows import stack_windows as stack_windows


__getattr__ = _deprecated_aliases(
    __name__,
    {"fit": ("train", train), "TrainConfig": ("TiDHyTrainConfig", TiDHyTrainConfig)},
)
