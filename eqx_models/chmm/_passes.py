"""The passes over a `Chain`, each by the strategy that `method=` names.

Every public routine takes `method="scan"` (sequential, `_scan.py`),
`method="parallel"` (blocked products, `_parallel.py`) or `method="auto"` (the
default: `strategy` picks one of the two); both give the same numbers up to
rounding. The choice is made here once per pass, so the public routines in
`_inference.py` and `_learning.py` only say which pass they need.
"""

import jax
import numpy as np
from jaxtyping import Array, Float

from ._chain import Chain
from ._parallel import (
    block_shape,
    parallel_forward,
    parallel_log_likelihood,
    parallel_smooth,
    STEP_FLOPS,
    tree_shape,
)
from ._scan import backward_scan, forward_scan, scan_log_likelihood


def parallel_bytes(length: int, size: int, itemsize: int) -> int:
    """An upper estimate of the memory of a parallel pass over a chain of `length`
    steps of `size` slots, its gradient included.

    The product tree (`2P` elements at the bottom and `P` products at each of its
    levels, `tree_shape` of the `K + 2` elements), phase 1's running products,
    windows and results (`3 K`), a few messages per step,
    and the gradient of every step's matrix before it is summed into the blocks
    (`T size^2`) with the chunked sums it is scattered into (at most as much).
    A CPU materialises the gradients; on a GPU XLA fuses them away: the large
    benchmark workload, T = 50 000 and size 70, took 312 MB of temporaries for
    an EM iteration on an H100, against 2.2 GB estimated here.
    """
    n = max(length - 1, 1)
    blocks, _ = block_shape(n, size)
    pairs, depth = tree_shape(blocks + 2)
    matrices = pairs * (depth + 2) + 3 * blocks + 2 * length
    return itemsize * (matrices * size * size + 6 * length * size)


def _backend() -> str:
    """The backend programs are compiled for: `"cpu"`, `"gpu"`, `"tpu"`..."""
    return jax.default_backend()


def _device_memory() -> int | None:
    """The bytes the default device can hold, where its backend tells."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("bytes_limit")


def strategy(method: str, chain: Chain, sequences: int = 1) -> str:
    """`"scan"` or `"parallel"`, the strategy `method` stands for on this chain
    (one of `sequences` run together under `vmap`).

    `"auto"` picks the parallel strategy on a GPU or TPU backend, where a
    sequential step costs microseconds however little it computes (on an H100 the
    large benchmark workload's log-likelihood takes 5.5 ms against the scan's 369
    ms), as long as a step's matrix product costs less than a sequential step
    (`2 size^3` FLOPs against `STEP_FLOPS`, the parallel strategy's cost model:
    up to about 368 slots; a dense chain over many states is the scan's) and its
    estimated memory for all `sequences` (`parallel_bytes`) is at most half of the
    device's. The scan everywhere else, a CPU included, where it is the faster
    (the parallel strategy does `size` times its arithmetic).
    """
    if method != "auto":
        return method
    if _backend() == "cpu" or 2 * chain.size**3 > STEP_FLOPS:
        return "scan"
    memory = _device_memory()
    itemsize = np.dtype(chain.pi0.dtype).itemsize
    needed = sequences * parallel_bytes(chain.length, chain.size, itemsize)
    return "parallel" if memory is not None and 2 * needed <= memory else "scan"


def chain_log_likelihood(
    chain: Chain, method: str, sequences: int = 1
) -> Float[Array, ""]:
    """`ln p(x | a)` of the chain (differentiable)."""
    if strategy(method, chain, sequences) == "scan":
        return scan_log_likelihood(chain)
    return parallel_log_likelihood(chain)


def chain_forward(
    chain: Chain, method: str, sequences: int = 1
) -> tuple[Float[Array, "T S"], Float[Array, " T"]]:
    """The filtered messages `alpha` and the per-step log normalisers."""
    if strategy(method, chain, sequences) == "scan":
        return forward_scan(chain)
    return parallel_forward(chain)


def chain_smooth(
    chain: Chain, method: str, sequences: int = 1
) -> tuple[
    Float[Array, "T S"], Float[Array, " T"], Float[Array, "T S"], Float[Array, "T S"]
]:
    """A forward-backward pass: `(alphas, log_norms, us, gammas)`, with `us` the
    normalised evidence-weighted backward messages and `gammas` the smoothed
    marginals."""
    if strategy(method, chain, sequences) == "parallel":
        return parallel_smooth(chain)
    alphas, log_norms = forward_scan(chain)
    us, gammas, _ = backward_scan(chain, alphas, accumulate=False)
    return alphas, log_norms, us, gammas
