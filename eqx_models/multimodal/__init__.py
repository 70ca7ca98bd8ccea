"""A causal transformer over multimodal codebook tokens with expected-value losses."""

from transforms import cast_floating as cast_floating
from transforms._train._deprecation import deprecated_aliases as _deprecated_aliases

from ._codebooks import Codebooks as Codebooks, load_codebooks as load_codebooks
from ._generate import generate as generate, Generation as Generation
from ._loss import MultimodalLoss as MultimodalLoss
from ._model import (
    CausalTransformerLM as CausalTransformerLM,
    check_tokens as check_tokens,
)
from ._packing import (
    pack_sequences as pack_sequences,
    packing_plan as packing_plan,
)
from ._predict import expected_values as expected_values
from ._sequence import (
    bucket_length as bucket_length,
    build_sequence as build_sequence,
    pad_batch as pad_batch,
    TokenBatch as TokenBatch,
    TokenSequence as TokenSequence,
)
from ._synthetic import (
    make_synthetic_data as make_synthetic_data,
    SyntheticData as SyntheticData,
)
from ._tensor_parallel import TensorParallelRule as TensorParallelRule
from ._train import (
    evaluate as evaluate,
    learning_rate_schedule as learning_rate_schedule,
    make_optimizer as make_optimizer,
    MultimodalTrainConfig as MultimodalTrainConfig,
    train as train,
    weight_decay_mask as weight_decay_mask,
)
from ._vocab import (
    BOS as BOS,
    EOS as EOS,
    MISS as MISS,
    PAD as PAD,
    SEP as SEP,
    VocabLayout as VocabLayout,
)


__getattr__ = _deprecated_aliases(
    __name__, {"TrainConfig": ("MultimodalTrainConfig", MultimodalTrainConfig)}
)
