"""The TiDHy parameters: spatial decoder, mixture of linear dynamics and hypernetwork.

The module holds θ and the maps of one time step (decoding, observation loss, mixed
transition, prediction); the latents are not stored but inferred at every step by
`_inference.py`. Initialisation follows the PyTorch original's distributions.
"""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from transforms.validation import check_bool, check_choice, check_in_range, check_size


LossType = Literal["mse", "poisson", "bce"]
_LOSS_TYPES = ("mse", "poisson", "bce")


def _xavier_std(fan_out: int, fan_in: int) -> float:
    """PyTorch's `xavier_normal_` standard deviation, `sqrt(2 / (fan_in + fan_out))`."""
    return (2.0 / (fan_in + fan_out)) ** 0.5


def _pooled(sample, keys, shapes, *params) -> list[Array]:
    """`sample(key, n, *param)` for every key (with its row of each `params`), as
    one vmapped draw reshaped to `shapes`: the values of a draw of `n` numbers are
    the first `n` of a longer one (JAX's partitionable Threefry counts from 0 in
    row-major order)."""
    sizes = [math.prod(shape) for shape in shapes]
    flat = jax.vmap(lambda k, *p: sample(k, max(sizes), *p))(jnp.stack(keys), *params)
    return [
        flat[i, :size].reshape(shape)
        for i, (size, shape) in enumerate(zip(sizes, shapes))
    ]


def _normals(draws: list[tuple[PRNGKeyArray, tuple[int, ...]]]) -> list[Array]:
    """`jr.normal(key, shape)` for every `(key, shape)`, as one draw."""
    keys, shapes = zip(*draws)
    return _pooled(lambda k, n: jr.normal(k, (n,)), keys, shapes)


def _uniforms(draws: list[tuple[PRNGKeyArray, tuple[int, ...], float]]) -> list[Array]:
    """`jr.uniform(key, shape, minval=-lim, maxval=lim)` for every
    `(key, shape, lim)`, as one draw."""
    keys, shapes, lims = zip(*draws)
    lims = jnp.asarray(lims, jnp.result_type(float))
    return _pooled(
        lambda k, n, lim: jr.uniform(k, (n,), minval=-lim, maxval=lim),
        keys,
        shapes,
        lims,
    )


def _orthonormalise(gaussian: Array, rows: int, cols: int) -> Array:
    """A `rows x cols` matrix with orthonormal rows (or columns, if taller) from a
    `(max, min)` Gaussian matrix: the sign-corrected Q of its QR decomposition."""
    q, r = jnp.linalg.qr(gaussian)
    q = q * jnp.sign(jnp.diagonal(r))[None, :]
    return q.T if rows < cols else q


def _linear_from(weight: Array, bias: Array | None) -> eqx.nn.Linear:
    """An `eqx.nn.Linear` holding the given weight and bias; its own initialisation
    is only traced for shapes, never drawn."""
    out_size, in_size = weight.shape
    layer = eqx.filter_eval_shape(
        eqx.nn.Linear, in_size, out_size, use_bias=bias is not None, key=jr.key(0)
    )
    layer = eqx.tree_at(lambda l: l.weight, layer, weight)
    if bias is not None:
        layer = eqx.tree_at(lambda l: l.bias, layer, bias)
    return layer


class SpatialDecoder(eqx.Module):
    """The map from the latent `r` to the observation's natural parameter.

    Linear (`W r + b`, the default) or nonlinear: `Linear(r -> H)`, `LayerNorm(H)`,
    ELU, `Linear(H -> H)`, `Linear(H -> D)`. `linear_in` is the first layer in both
    cases (its weight is the `W` that renormalisation and the decoder regularisers
    act on).
    """

    linear_in: eqx.nn.Linear
    norm: eqx.nn.LayerNorm | None
    linear_hidden: eqx.nn.Linear | None
    linear_out: eqx.nn.Linear | None

    def __call__(self, r: Float[Array, " r"]) -> Float[Array, " D"]:
        """The decoder output (before the observation link) for one latent `r`."""
        z = self.linear_in(r)
        if (
            self.norm is not None
            and self.linear_hidden is not None
            and self.linear_out is not None
        ):
            z = self.linear_out(self.linear_hidden(jax.nn.elu(self.norm(z))))
        return z


class HyperNetwork(eqx.Module):
    """The map from the slow latent `r2` to the non-negative mixture weights.

    `w = ReLU(linear_out(linear_hidden(ELU(LayerNorm(linear_in(r2))))))`. The two
    last layers follow each other without a nonlinearity (as in the original), and the
    final ReLU lets weights be exactly 0: when all of them are, the dynamics are dead
    (the training metrics report it).
    """

    linear_in: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    linear_hidden: eqx.nn.Linear
    linear_out: eqx.nn.Linear

    def __call__(self, r2: Float[Array, " r2"]) -> Float[Array, " out"]:
        """The ReLU output for one `r2`: `mix_dim` weights (then `r_dim` bias gains
        with `dyn_bias`)."""
        h = jax.nn.elu(self.norm(self.linear_in(r2)))
        return jax.nn.relu(self.linear_out(self.linear_hidden(h)))


# One compiled function with two random draws, one vmapped normal and one vmapped
# uniform. Op by op, every draw of a new shape was compiled on its own, and XLA
# takes about a second per separate draw on a CPU. Every parameter keeps its own key
# and, with JAX's default (partitionable) Threefry, the values that layer-by-layer
# construction gives: a Xavier-normal weight from the first half of its layer's key
# and the bias that `eqx.nn.Linear` draws from the second half.
@eqx.filter_jit
def _init_parameters(
    key: PRNGKeyArray,
    input_dim: int,
    r_dim: int,
    r2_dim: int,
    mix_dim: int,
    hyper_hid_dim: int,
    low_rank_temporal: bool,
    dyn_bias: bool,
    nonlinear_decoder: bool,
) -> tuple[SpatialDecoder, Array, HyperNetwork, Array | None]:
    """The decoder, `temporal`, the hypernetwork and `temporal_bias` of a new TiDHy
    (the distributions are listed in `TiDHy.__init__`)."""
    H = hyper_hid_dim
    decoder_out = H if nonlinear_decoder else input_dim
    hyper_out = mix_dim + r_dim if dyn_bias else mix_dim
    temporal_cols = 2 * r_dim if low_rank_temporal else r_dim * r_dim
    dkey, tkey, hkey, bkey = jr.split(key, 4)
    d1, d2, d3 = jr.split(dkey, 3)
    h1, h2, h3 = jr.split(hkey, 3)

    # (key, in, out, bias): Xavier-normal weight, U(-1/sqrt(in), 1/sqrt(in)) bias.
    xavier = [(d1, r_dim, decoder_out, True), (h1, r2_dim, H, True)]
    xavier += [(h2, H, H, True), (h3, H, hyper_out, not dyn_bias)]
    weight_keys = [jr.split(k) for k, _, _, _ in xavier]
    normal = [
        (w, (out, n_in)) for (w, _), (_, n_in, out, _) in zip(weight_keys, xavier)
    ]
    normal.append((tkey, (max(mix_dim, temporal_cols), min(mix_dim, temporal_cols))))
    if dyn_bias:
        normal.append((bkey, (1, r_dim)))
    uniform = [
        (jr.split(layer_key)[1], (out,), n_in**-0.5)
        for (_, layer_key), (_, n_in, out, bias) in zip(weight_keys, xavier)
        if bias
    ]
    if nonlinear_decoder:
        # `eqx.nn.Linear`'s default initialisation: uniform weight and bias.
        for k, out in ((d2, H), (d3, input_dim)):
            wkey, bias_key = jr.split(k)
            uniform += [(wkey, (out, H), H**-0.5), (bias_key, (out,), H**-0.5)]
    gaussians = _normals(normal)
    uniforms = iter(_uniforms(uniform))
    linears = []
    for g, (_, n_in, out, bias) in zip(gaussians, xavier):
        linears.append(
            _linear_from(_xavier_std(out, n_in) * g, next(uniforms) if bias else None)
        )
    decoder_in, hyper_in, hyper_hidden, hyper_out_layer = linears

    if nonlinear_decoder:
        decoder = SpatialDecoder(
            linear_in=decoder_in,
            norm=eqx.nn.LayerNorm(H, eps=1e-5),
            linear_hidden=_linear_from(next(uniforms), next(uniforms)),
            linear_out=_linear_from(next(uniforms), next(uniforms)),
        )
    else:
        decoder = SpatialDecoder(
            linear_in=decoder_in, norm=None, linear_hidden=None, linear_out=None
        )
    temporal = _orthonormalise(gaussians[4], mix_dim, temporal_cols)
    if low_rank_temporal:
        temporal = temporal.reshape(mix_dim, r_dim, 2)
    hypernet = HyperNetwork(
        linear_in=hyper_in,
        norm=eqx.nn.LayerNorm(H, eps=1e-5),
        linear_hidden=hyper_hidden,
        linear_out=hyper_out_layer,
    )
    temporal_bias = _xavier_std(1, r_dim) * gaussians[5][0] if dyn_bias else None
    return decoder, temporal, hypernet, temporal_bias


class TiDHy(eqx.Module):
    """Timescale demixing via hypernetworks: a sparse-coding dynamical model.

    The observation `x_t` (dimension `D`) is explained by a latent `r_t` (dimension
    `r_dim`) through the spatial decoder, `x_t ≈ W r_t + b`, and `r_t` evolves by a
    mixture of `mix_dim` linear dynamics whose weights come from a slower latent
    `r2_t` (dimension `r2_dim`) through the hypernetwork:

    `r̄_t = (Σ_k w_k(r2_t) V_k) r_{t-1}`, with `V_k` the `r_dim x r_dim` matrix held in
    row `k` of `temporal` (row-major), or `V_k = U_k U_kᵀ` with `U_k` of shape
    `(r_dim, 2)` when `low_rank_temporal=True`. With `dyn_bias=True` the hypernetwork
    also outputs `r_dim` non-negative gains `g` and `r̄_t` gains `g ⊙ temporal_bias`.

    The latents are not parameters: they are inferred at every time step by an inner
    optimisation ([`eqx_models.tidhy.infer`][]). This module holds the parameters θ
    and acts on one time step of one window; batch with `jax.vmap`.

    Observation losses (summed over features), on the decoder output `z`:
    `"mse"`: `(z - x)²`; `"poisson"`: `exp(z) - x z` (`z` is the log rate); `"bce"`:
    `softplus(z) - x z` (`z` is the logit, `x` in [0, 1]).
    """

    decoder: SpatialDecoder
    temporal: Float[Array, "mix rr"] | Float[Array, "mix r 2"]
    hypernet: HyperNetwork
    temporal_bias: Float[Array, " r"] | None
    input_dim: int = eqx.field(static=True)
    r_dim: int = eqx.field(static=True)
    r2_dim: int = eqx.field(static=True)
    mix_dim: int = eqx.field(static=True)
    hyper_hid_dim: int = eqx.field(static=True)
    loss_type: str = eqx.field(static=True)
    temp_weight: float = eqx.field(static=True)
    low_rank_temporal: bool = eqx.field(static=True)
    dyn_bias: bool = eqx.field(static=True)
    nonlinear_decoder: bool = eqx.field(static=True)

    def __init__(
        self,
        input_dim: int,
        *,
        r_dim: int = 10,
        r2_dim: int = 5,
        mix_dim: int = 15,
        hyper_hid_dim: int = 50,
        loss_type: LossType = "mse",
        temp_weight: float = 2.0,
        low_rank_temporal: bool = False,
        dyn_bias: bool = False,
        nonlinear_decoder: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `input_dim`: the observation dimension `D`.
        - `r_dim`, `r2_dim`, `mix_dim`, `hyper_hid_dim`: the sizes of `r`, `r2`, the
            number of dynamics matrices, and the hypernetwork's (and nonlinear
            decoder's) hidden width.
        - `loss_type`: `"mse"` (default), `"poisson"` or `"bce"`.
        - `temp_weight`: the weight of the temporal term `||r_t - r̄_t||²`, both in
            the inference energy and in the training loss.
        - `low_rank_temporal`: use `V_k = U_k U_kᵀ` with `U_k` of shape `(r_dim, 2)`.
        - `dyn_bias`: add the hypernetwork-gated bias `g ⊙ temporal_bias` to `r̄`.
        - `nonlinear_decoder`: use the MLP decoder instead of `W r + b`.
        - `key`: a PRNG key for the initialisation (Xavier-normal weight matrices,
            orthonormal rows for `temporal`, PyTorch's default uniform biases).

        **Raises:**

        `ValueError` for a non-positive size, an unknown `loss_type` or a negative or
        non-finite `temp_weight`; `TypeError` for a size that is not an integer or a
        flag that is not a bool.
        """
        for name, value in (
            ("input_dim", input_dim),
            ("r_dim", r_dim),
            ("r2_dim", r2_dim),
            ("mix_dim", mix_dim),
            ("hyper_hid_dim", hyper_hid_dim),
        ):
            check_size("TiDHy", name, value)
        for name, value in (
            ("low_rank_temporal", low_rank_temporal),
            ("dyn_bias", dyn_bias),
            ("nonlinear_decoder", nonlinear_decoder),
        ):
            check_bool("TiDHy", name, value)
        check_in_range("TiDHy", "temp_weight", temp_weight, low=0)
        (
            self.decoder,
            self.temporal,
            self.hypernet,
            self.temporal_bias,
        ) = _init_parameters(
            key,
            input_dim,
            r_dim,
            r2_dim,
            mix_dim,
            hyper_hid_dim,
            low_rank_temporal,
            dyn_bias,
            nonlinear_decoder,
        )
        self.input_dim = input_dim
        self.r_dim = r_dim
        self.r2_dim = r2_dim
        self.mix_dim = mix_dim
        self.hyper_hid_dim = hyper_hid_dim
        self.loss_type = loss_type
        self.temp_weight = float(temp_weight)
        self.low_rank_temporal = low_rank_temporal
        self.dyn_bias = dyn_bias
        self.nonlinear_decoder = nonlinear_decoder

    def __check_init__(self):
        check_choice("TiDHy", "loss_type", self.loss_type, _LOSS_TYPES)
        check_in_range("TiDHy", "temp_weight", self.temp_weight, low=0)

    def decode(self, r: Float[Array, " r"]) -> Float[Array, " D"]:
        """The predicted observation (mean) for one latent `r`: `W r + b` for MSE,
        `exp(W r + b)` for Poisson, `sigmoid(W r + b)` for BCE."""
        z = self.decoder(r)
        if self.loss_type == "poisson":
            return jnp.exp(z)
        if self.loss_type == "bce":
            return jax.nn.sigmoid(z)
        return z

    def spatial_loss(
        self, r: Float[Array, " r"], x: Float[Array, " D"]
    ) -> Float[Array, " D"]:
        """The per-feature observation loss of `x` given the latent `r`."""
        z = self.decoder(r)
        if self.loss_type == "poisson":
            return jnp.exp(z) - x * z
        if self.loss_type == "bce":
            return jax.nn.softplus(z) - x * z
        return (z - x) ** 2

    def mixture(
        self, r2: Float[Array, " r2"]
    ) -> tuple[Float[Array, " mix"], Float[Array, " r"] | None]:
        """The mixture weights `w(r2)` (non-negative), and the bias gains `g(r2)`
        with `dyn_bias` (else `None`)."""
        out = self.hypernet(r2)
        if self.dyn_bias:
            return out[: self.mix_dim], out[self.mix_dim :]
        return out, None

    def transition_matrices(self) -> Float[Array, "mix r r"]:
        """The `mix_dim` dynamics matrices `V_k`, stacked."""
        if self.low_rank_temporal:
            return jnp.einsum("kia,kja->kij", self.temporal, self.temporal)
        return self.temporal.reshape(self.mix_dim, self.r_dim, self.r_dim)

    def transition(self, r2: Float[Array, " r2"]) -> Float[Array, "r r"]:
        """The mixed dynamics matrix `V(r2) = Σ_k w_k(r2) V_k`."""
        w, _ = self.mixture(r2)
        return jnp.tensordot(w, self.transition_matrices(), axes=1)

    def basis_predictions(self, r_prev: Float[Array, " r"]) -> Float[Array, "mix r"]:
        """`V_k r_prev` for every `k`: the prediction is their `w`-weighted sum, so
        this is computed once per time step, outside the inner loop."""
        if self.low_rank_temporal:
            coefficients = jnp.einsum("kja,j->ka", self.temporal, r_prev)
            return jnp.einsum("kia,ka->ki", self.temporal, coefficients)
        return self.transition_matrices() @ r_prev

    def predict_from_basis(
        self, basis: Float[Array, "mix r"], r2: Float[Array, " r2"]
    ) -> Float[Array, " r"]:
        """`r̄ = Σ_k w_k(r2) basis_k (+ g(r2) ⊙ temporal_bias)`, with `basis` from
        [`eqx_models.tidhy.TiDHy.basis_predictions`][]."""
        w, gains = self.mixture(r2)
        r_bar = w @ basis
        if gains is not None and self.temporal_bias is not None:
            r_bar = r_bar + gains * self.temporal_bias
        return r_bar

    def predict(
        self, r_prev: Float[Array, " r"], r2: Float[Array, " r2"]
    ) -> Float[Array, " r"]:
        """The dynamics prediction `r̄ = V(r2) r_prev` (plus the gated bias)."""
        return self.predict_from_basis(self.basis_predictions(r_prev), r2)
