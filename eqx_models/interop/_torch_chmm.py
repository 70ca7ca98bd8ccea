"""A cloned HMM as a PyTorch module, computed by the JAX implementation."""

from collections.abc import Sequence

import jax
import numpy as np
import torch
from torch import nn

from transforms.interop.torch import jax_to_torch, to_jax

from ..chmm import CHMM, log_likelihood, posteriors


_FN = "TorchCHMM"


def _chmm_outputs(logits, Pi, x, a, n_clones, method, batched, want_posteriors):
    model = CHMM(n_clones, jax.nn.softmax(logits, axis=-1), Pi)

    def one(x, a):
        if want_posteriors:
            post = posteriors(model, x, a, method=method)
            return post.log_likelihood, post.smoothed
        return log_likelihood(model, x, a, method=method)

    return jax.vmap(one)(x, a) if batched else one(x, a)


_bridged = jax_to_torch(_chmm_outputs)


class TorchCHMM(nn.Module):
    """An action-conditioned cloned HMM as a `torch.nn.Module`.

    The module holds unconstrained transition logits `logits[u, i, j]` (an
    `nn.Parameter` of shape `(n_actions, N, N)`, `N = sum(n_clones)`); the
    transition tensor is their softmax over destinations,
    `T[u, i, :] = softmax(logits[u, i, :])`, so every row is a distribution over all
    `N` states, the convention of [`eqx_models.chmm.CHMM`][]. The forward pass runs
    [`eqx_models.chmm.posteriors`][] (or [`eqx_models.chmm.log_likelihood`][])
    compiled by JAX through [`transforms.interop.torch.jax_to_torch`][], and torch
    autograd gets the JAX gradients: to the logits, and to soft evidence, so an
    encoder producing log-probabilities over symbols trains through the HMM.

    The initial distribution `Pi` is a buffer (uniform by default), not trained.
    A softmax never gives exact zeros, so a learned `T` has every transition
    possible; `from_chmm` maps zeros to logits of `log(tiny)`, which round back to
    (numerically) zero.

    **Arguments:**

    - `n_clones`: clones per symbol, a sequence of positive ints (`n_obs` long).
    - `n_actions`: the number of actions.
    - `logits`: optional initial logits, a tensor of shape `(n_actions, N, N)`;
        default `init_scale * N(0, 1)` draws.
    - `Pi`: optional initial state distribution, shape `(N,)`.
    - `init_scale`: the standard deviation of the random initial logits.
    - `method`: `"scan"` (CPU) or `"parallel"` (GPU, long sequences); see
        [`eqx_models.chmm.log_likelihood`][].
    - `generator`: optional `torch.Generator` for the initial logits.
    - `dtype`: the logits' dtype (`torch.float64` needs `jax_enable_x64`).

    **Raises:**

    `ValueError` for a bad `n_clones`, `n_actions`, `method` or shapes of `logits`
    / `Pi`.

    !!! example

        ```python
        chmm = TorchCHMM([3, 2, 2], n_actions=4)
        lnL, post = chmm(x, a)         # x, a: int tensors of shape (T,) or (B, T)
        (-lnL.sum()).backward()        # chmm.logits.grad
        ```
    """

    Pi: torch.Tensor

    def __init__(
        self,
        n_clones: Sequence[int],
        n_actions: int,
        *,
        logits: torch.Tensor | None = None,
        Pi: torch.Tensor | None = None,
        init_scale: float = 1.0,
        method: str = "scan",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        counts = np.asarray(n_clones)
        if (
            counts.ndim != 1
            or counts.size == 0
            or not np.issubdtype(counts.dtype, np.integer)
            or np.any(counts < 1)
        ):
            raise ValueError(
                f"{_FN}: `n_clones` must be a non-empty sequence of positive ints, "
                f"got {n_clones!r}."
            )
        if (
            isinstance(n_actions, bool)
            or not isinstance(n_actions, int)
            or n_actions < 1
        ):
            raise ValueError(
                f"{_FN}: `n_actions` must be a positive int, got {n_actions!r}."
            )
        if method not in ("scan", "parallel"):
            raise ValueError(
                f"{_FN}: `method` must be 'scan' or 'parallel', got {method!r}."
            )
        self.n_clones = tuple(int(k) for k in counts)
        self.n_actions = n_actions
        self.method = method
        n_states = sum(self.n_clones)
        shape = (n_actions, n_states, n_states)
        if logits is None:
            logits = init_scale * torch.randn(shape, generator=generator, dtype=dtype)
        elif tuple(logits.shape) != shape:
            raise ValueError(
                f"{_FN}: `logits` must have shape {shape} for n_clones="
                f"{list(self.n_clones)} and n_actions={n_actions}, got "
                f"{tuple(logits.shape)}."
            )
        self.logits = nn.Parameter(logits.detach().clone())
        if Pi is None:
            Pi = torch.full((n_states,), 1 / n_states, dtype=self.logits.dtype)
        elif tuple(Pi.shape) != (n_states,):
            raise ValueError(
                f"{_FN}: `Pi` must have shape ({n_states},), got {tuple(Pi.shape)}."
            )
        self.register_buffer("Pi", Pi.detach().clone().to(self.logits.dtype))

    @property
    def n_states(self) -> int:
        """`N`, the total number of clones."""
        return sum(self.n_clones)

    @property
    def n_obs(self) -> int:
        """The number of symbols."""
        return len(self.n_clones)

    @classmethod
    def from_chmm(cls, model: CHMM, *, method: str = "scan") -> "TorchCHMM":
        """A `TorchCHMM` whose softmax reproduces a JAX [`eqx_models.chmm.CHMM`][].

        The logits are `log T` (zeros become `log` of the dtype's smallest normal
        number), `Pi` is copied.

        **Arguments:**

        - `model`: the `CHMM`.
        - `method`: as in the constructor.

        **Returns:**

        A `TorchCHMM` on the CPU with the model's dtype.
        """
        T = np.asarray(model.T)
        tiny = np.finfo(T.dtype).tiny
        logits = torch.from_numpy(np.log(np.maximum(T, tiny)))
        return cls(
            model.n_clones,
            model.n_actions,
            logits=logits,
            Pi=torch.from_numpy(np.array(model.Pi)),
            method=method,
        )

    def transitions(self) -> torch.Tensor:
        """The transition tensor `softmax(logits, dim=-1)`, shape
        `(n_actions, N, N)`."""
        return torch.softmax(self.logits, dim=-1)

    def to_chmm(self) -> CHMM:
        """The current parameters as a JAX [`eqx_models.chmm.CHMM`][] (for decoding,
        planning or sampling with `eqx_models.chmm`)."""
        T = jax.nn.softmax(to_jax(self.logits.detach()), axis=-1)
        return CHMM(self.n_clones, T, to_jax(self.Pi))

    def _check(self, x: torch.Tensor, a: torch.Tensor) -> bool:
        fn = f"{_FN}.forward"
        if not isinstance(x, torch.Tensor) or not isinstance(a, torch.Tensor):
            raise TypeError(f"{fn}: `x` and `a` must be torch tensors.")
        if a.is_floating_point() or a.is_complex() or a.dtype == torch.bool:
            raise TypeError(f"{fn}: `a` must hold integer actions, got {a.dtype}.")
        if a.ndim not in (1, 2):
            raise ValueError(
                f"{fn}: `a` must have shape (T,) or (batch, T), got {tuple(a.shape)}."
            )
        soft = x.is_floating_point()
        if soft and x.dtype != self.logits.dtype:
            raise TypeError(
                f"{fn}: soft evidence `x` must have the logits' dtype "
                f"{self.logits.dtype}, got {x.dtype}."
            )
        if not soft and (x.is_complex() or x.dtype == torch.bool):
            raise TypeError(f"{fn}: `x` must be integer ids or float log-evidence.")
        want = a.shape + ((self.n_obs,) if soft else ())
        if tuple(x.shape) != tuple(want):
            kind = "log-evidence" if soft else "ids"
            raise ValueError(
                f"{fn}: `x` ({kind}) must have shape {tuple(want)} to match `a` of "
                f"shape {tuple(a.shape)} (n_obs={self.n_obs}), got {tuple(x.shape)}."
            )
        return a.ndim == 2

    def forward(
        self, x: torch.Tensor, a: torch.Tensor, *, return_posteriors: bool = True
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood (and smoothed posteriors) of one or a batch of sequences.

        **Arguments:**

        - `x`: observations: integer ids of shape `(T,)` or `(batch, T)` in
            `[0, n_obs)`, or soft evidence, a float tensor (the logits' dtype) of
            shape `(T, n_obs)` or `(batch, T, n_obs)` of log-evidence per symbol,
            such as an encoder's `log_softmax`; evidence receives gradients.
        - `a`: integer actions, shape `(T,)` or `(batch, T)`; `a[t]` drives
            `x[t] -> x[t + 1]` and `a[-1]` is unused.
        - `return_posteriors`: also return the smoothed posteriors (else only the
            log-likelihood, which is cheaper).

        **Returns:**

        `(log_likelihood, posteriors)`: the natural-log likelihood (a scalar, or
        shape `(batch,)`) and `p(z[t] = i | x, a)` of shape `(T, N)` (or
        `(batch, T, N)`); only the log-likelihood with `return_posteriors=False`.
        Both are differentiable with respect to `logits` and soft evidence.

        **Raises:**

        `TypeError`/`ValueError` for bad dtypes or shapes; JAX's runtime error
        (from `eqx.error_if`) for ids or actions out of range.
        """
        batched = self._check(x, a)
        return _bridged(
            self.logits,
            self.Pi,
            x,
            a,
            self.n_clones,
            self.method,
            batched,
            return_posteriors,
        )

    def extra_repr(self) -> str:
        return (
            f"n_clones={list(self.n_clones)}, n_actions={self.n_actions}, "
            f"method={self.method!r}"
        )
