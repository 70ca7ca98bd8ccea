"""The canonical table of candidate parent sets that every causal component indexes by.

The exact expert's posterior, the model's logits and the evaluation all refer to a
parent set by its position in one order (by size, then lexicographic), so the table
is built here alone: static NumPy arrays, cached per `(d, K)`, with the
`MAX_CANDIDATE_SETS` limit checked in an error that names the calling function.
"""

import functools
import itertools
import math
from typing import NamedTuple

import numpy as np

from transforms.validation import check_size


MAX_CANDIDATE_SETS = 100_000
"""The most candidate parent sets a `(d, K)` may enumerate (`Σ_{k≤K} C(d-1, k)`)."""


class CandidateSets(NamedTuple):
    """The canonical table of candidate parent sets for `d` variables and size `≤ K`.

    Sets are over the `d - 1` variables other than the target, numbered `0..d-2` in
    increasing order of their variable index ("relative" indices: relative index
    `r` is variable `r + (r >= target)`). Canonical order: by size, then
    lexicographic over the sorted members, i.e. `itertools.combinations` order, so
    entry 0 is the empty set. All arrays are NumPy (static, built once per
    `(d, K)`).

    **Fields:**

    - `members`: `(C, K')` relative indices, padded with 0 beyond the set's size
        (`K' = min(K, d-1)`).
    - `mask`: `(C, K')` boolean, which entries of `members` are real.
    - `sizes`: `(C,)` the set sizes.
    - `pairs`: `(P, 2)` positions `(a, b)`, `a < b < K'`, of the member pairs.
    - `pair_mask`: `(C, P)` boolean, which pairs are real for each set.
    - `max_parents`: `K'`.
    """

    members: np.ndarray
    mask: np.ndarray
    sizes: np.ndarray
    pairs: np.ndarray
    pair_mask: np.ndarray
    max_parents: int

    @property
    def n_sets(self) -> int:
        """The number of candidate sets `C`."""
        return self.sizes.shape[0]


def count_candidate_sets(n_vars: int, max_parents: int) -> int:
    """`Σ_{k ≤ min(K, d-1)} C(d-1, k)`, the number of candidate parent sets."""
    k_eff = min(max_parents, n_vars - 1)
    return sum(math.comb(n_vars - 1, k) for k in range(k_eff + 1))


def candidate_parent_sets(n_vars: int, max_parents: int) -> CandidateSets:
    """The canonical candidate table for `d` variables and parent sets of size `≤ K`.

    **Arguments:**

    - `n_vars`: the number of variables `d ≥ 1` (the target included).
    - `max_parents`: the largest set size `K ≥ 0`; sizes above `d - 1` do not exist,
        so `K' = min(K, d-1)` is used.

    **Returns:**

    A [`eqx_models.causal.CandidateSets`][] of NumPy arrays. Cached per `(d, K)`.

    **Raises:**

    `ValueError` if `d < 1`, `K < 0`, or the table would exceed
    `MAX_CANDIDATE_SETS` (100 000) sets; the message gives the count. `TypeError`
    if `d` or `K` is not an integer (a bool included).

    !!! example

        ```python
        table = candidate_parent_sets(4, 2)
        table.n_sets  # 1 + 3 + 3 = 7
        table.members[4], table.mask[4]  # [0, 1], [True, True]: the set {0, 1}
        ```
    """
    return checked_table("candidate_parent_sets", n_vars, max_parents)


def checked_table(name: str, n_vars: int, max_parents: int) -> CandidateSets:
    """`candidate_parent_sets` with errors naming the public function `name`."""
    n_vars = check_size(name, "n_vars", n_vars)
    max_parents = check_size(name, "max_parents", max_parents, minimum=0)
    count = count_candidate_sets(n_vars, max_parents)
    if count > MAX_CANDIDATE_SETS:
        raise ValueError(
            f"{name}: (d, K) = ({n_vars}, {max_parents}) has {count} candidate parent "
            f"sets, beyond the enumeration limit of {MAX_CANDIDATE_SETS} "
            f"(MAX_CANDIDATE_SETS); use a smaller `max_parents`."
        )
    return _build(n_vars, min(max_parents, n_vars - 1))


@functools.lru_cache(maxsize=64)
def _build(n_vars: int, k: int) -> CandidateSets:
    sets = [
        s
        for size in range(k + 1)
        for s in itertools.combinations(range(n_vars - 1), size)
    ]
    members = np.zeros((len(sets), k), np.int32)
    mask = np.zeros((len(sets), k), bool)
    for row, s in enumerate(sets):
        members[row, : len(s)] = s
        mask[row, : len(s)] = True
    sizes = mask.sum(axis=1).astype(np.int32)
    pairs = np.array(list(itertools.combinations(range(k), 2)), np.int32).reshape(-1, 2)
    pair_mask = mask[:, pairs[:, 0]] & mask[:, pairs[:, 1]]
    for array in (members, mask, sizes, pairs, pair_mask):
        array.setflags(write=False)
    return CandidateSets(members, mask, sizes, pairs, pair_mask, k)
