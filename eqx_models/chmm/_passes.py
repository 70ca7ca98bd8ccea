"""The passes over a `Chain`, each by either strategy that `method=` names.

Every public routine takes `method="scan"` (sequential, `_scan.py`) or
`method="parallel"` (blocked products, `_parallel.py`); both give the same numbers
up to rounding. The choice is made here once per pass, so the public routines in
`_inference.py` and `_learning.py` only say which pass they need.
"""

from jaxtyping import Array, Float

from ._chain import Chain
from ._parallel import parallel_forward, parallel_log_likelihood, parallel_smooth
from ._scan import backward_scan, forward_scan, scan_log_likelihood


def chain_log_likelihood(chain: Chain, method: str) -> Float[Array, ""]:
    """`ln p(x | a)` of the chain (differentiable)."""
    if method == "scan":
        return scan_log_likelihood(chain)
    return parallel_log_likelihood(chain)


def chain_forward(
    chain: Chain, method: str
) -> tuple[Float[Array, "T S"], Float[Array, " T"]]:
    """The filtered messages `alpha` and the per-step log normalisers."""
    if method == "scan":
        return forward_scan(chain)
    return parallel_forward(chain)


def chain_smooth(
    chain: Chain, method: str
) -> tuple[
    Float[Array, "T S"], Float[Array, " T"], Float[Array, "T S"], Float[Array, "T S"]
]:
    """A forward-backward pass: `(alphas, log_norms, us, gammas)`, with `us` the
    normalised evidence-weighted backward messages and `gammas` the smoothed
    marginals."""
    if method == "parallel":
        return parallel_smooth(chain)
    alphas, log_norms = forward_scan(chain)
    us, gammas, _ = backward_scan(chain, alphas, accumulate=False)
    return alphas, log_norms, us, gammas
