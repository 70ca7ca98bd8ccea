"""PyTorch adapters for the models (needs `pip install eqx-models[torch]`)."""

from ._ghost_compat import DotProductEngine as DotProductEngine
from ._multimodal_state_dict import (
    multimodal_from_state_dict as multimodal_from_state_dict,
    multimodal_to_state_dict as multimodal_to_state_dict,
)
from ._state_dict import StateDictError as StateDictError
from ._tidhy_state_dict import (
    tidhy_from_state_dict as tidhy_from_state_dict,
    tidhy_to_state_dict as tidhy_to_state_dict,
)
from ._torch_chmm import TorchCHMM as TorchCHMM
