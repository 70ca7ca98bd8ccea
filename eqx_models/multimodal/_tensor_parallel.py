"""Tensor parallelism for the LM: which dimension of each block weight a mesh axis
splits, in the Megatron pattern (column-split first matrix, row-split second)."""

import dataclasses

import jax
from jax.sharding import PartitionSpec

from transforms._validation import check_type


# Per block weight: the dimension, counted from the end (the leading `layers` axis of
# the stacked blocks is never split), that the model axis splits. The first matrix of
# each sublayer is split by its output columns, so each device computes a slice of
# the heads' queries, keys and values (or of the MLP's hidden units) from the whole
# input; the second by its input rows, so each device multiplies its own slice and
# XLA sums the partial outputs once per sublayer. Biases follow their matrix's
# output; LayerNorm parameters, the embeddings and the head are left to FSDP (or
# replicated).
_SPLIT_FROM_END = {
    "qkv_weight": 1,
    "qkv_bias": 1,
    "out_weight": 2,
    "fc_weight": 1,
    "fc_bias": 1,
    "proj_weight": 2,
}


@dataclasses.dataclass(frozen=True)
class TensorParallelRule:
    """A tensor-parallel rule for [`transforms.ParameterSharding`][]: the LM's
    attention and MLP weights split over the mesh axis `axis`.

    In each block, the query/key/value projection and the MLP's first matrix are
    split by output columns (with their biases), the attention output projection
    and the MLP's second matrix by input rows: every device holds `1/n` of each
    block's matrices and computes `1/n` of its hidden units, and XLA adds one
    all-reduce per sublayer (Megatron-LM's layout; here only named shardings, the
    collectives are XLA's). Embeddings, LayerNorms and the head are not split by
    this rule; combine it with `fsdp_axis` to split those over the data axis.

    The `3 * d_model` columns of the query/key/value projection are split evenly,
    so with a model axis of size `n` each device holds columns that may cross the
    query/key/value boundary (when 3 is not a multiple of `n`); XLA then moves the
    columns each head needs, which costs communication, not correctness.

    **Arguments:**

    - `axis`: the mesh axis name (e.g. `"model"`). Its size must divide `d_model`
        (for the attention output), `3 * d_model` and `d_ff`.

    **Raises:**

    `TypeError` if `axis` is not a str.

    !!! example

        ```python
        mesh = jax.make_mesh((4, 2), ("data", "model"))
        layout = ParameterSharding(
            fsdp_axis="data", tensor_parallel=TensorParallelRule("model")
        )
        result = train(model, loss, data, config, key=key, mesh=mesh,
                       parameter_sharding=layout)
        ```
    """

    axis: str = "model"

    def __post_init__(self):
        check_type("TensorParallelRule", "axis", self.axis, str, "a mesh axis name")

    def __call__(self, path: tuple, leaf) -> PartitionSpec | None:
        """The `PartitionSpec` of the array at `path`, `None` if not split."""
        names = [k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)]
        if len(names) < 2 or names[-2] != "blocks" or names[-1] not in _SPLIT_FROM_END:
            return None
        dims: list = [None] * leaf.ndim
        dims[leaf.ndim - _SPLIT_FROM_END[names[-1]]] = self.axis
        return PartitionSpec(*dims)
