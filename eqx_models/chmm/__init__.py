"""Action-conditioned cloned HMMs (clone-structured cognitive graphs)."""

from ._gridworld import (
    clone_graph as clone_graph,
    place_fields as place_fields,
    random_room as random_room,
    room_walk as room_walk,
)
from ._hierarchy import (
    clone_communities as clone_communities,
    community_graph as community_graph,
    hierarchical_plan as hierarchical_plan,
    HierarchicalPlan as HierarchicalPlan,
)
from ._inference import (
    backward as backward,
    bits_per_step as bits_per_step,
    forward as forward,
    log_likelihood as log_likelihood,
    Posteriors as Posteriors,
    posteriors as posteriors,
    viterbi as viterbi,
)
from ._learning import (
    em as em,
    expected_counts as expected_counts,
    learn_emissions as learn_emissions,
    viterbi_em as viterbi_em,
)
from ._model import AbstractCHMM as AbstractCHMM, CHMM as CHMM
from ._plan import Plan as Plan, plan as plan
from ._sample import sample as sample
from ._sparse import seen_transitions as seen_transitions, SparseCHMM as SparseCHMM
from ._streaming import (
    default_step_size as default_step_size,
    online_em as online_em,
    streaming_em as streaming_em,
    streaming_expected_counts as streaming_expected_counts,
)
