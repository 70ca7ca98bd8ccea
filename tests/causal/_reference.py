"""Independent float64 NumPy references for the causal tests (written from the maths,
sharing no code with the library)."""

import itertools
import math

import jax.numpy as jnp
import numpy as np


def subsets(others, k):
    """Canonical order: by size, then lexicographic (itertools.combinations)."""
    return [s for size in range(k + 1) for s in itertools.combinations(others, size)]


def r_squared(X, y, S, degree=1):
    """R² of the least-squares regression of y on an intercept and the powers
    1..degree of the columns S (centred first, for conditioning; the span of the
    powers, and so R², is that of any polynomial basis of that degree)."""
    if not S:
        return 0.0
    centred = X[:, list(S)] - X[:, list(S)].mean(axis=0)
    powers = [centred**p for p in range(1, degree + 1)]
    design = np.column_stack([np.ones(len(y)), *powers])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    return 1.0 - residual @ residual / np.sum((y - y.mean()) ** 2)


def brute_force_posterior(data, k, degree=1):
    """The g-prior parent-set posterior by enumeration and least squares; with
    `degree > 1`, of the additive polynomial model (`degree·|S|` coefficients)."""
    data = np.asarray(data, np.float64)
    n_rows, d, _ = data.shape
    target = int(np.argmax(data[0, :, 2]))
    rows = data[:, target, 1] == 0
    X = data[rows, :, 0]
    y = X[:, target]
    n = int(rows.sum())
    g = float(n)
    others = [i for i in range(d) if i != target]
    k_eff = min(k, d - 1)
    sets = subsets(others, k_eff)
    scores = []
    for S in sets:
        r2 = r_squared(X, y, S, degree)
        p = degree * len(S)
        log_bf = 0.5 * (n - 1 - p) * np.log1p(g) - 0.5 * (n - 1) * np.log1p(
            g * (1 - r2)
        )
        log_prior = -np.log(k_eff + 1) - np.log(math.comb(d - 1, len(S)))
        scores.append(log_bf + log_prior)
    scores = np.array(scores)
    log_post = scores - np.logaddexp.reduce(scores)
    marginals = np.zeros(d)
    for S, lp in zip(sets, log_post):
        for i in S:
            marginals[i] += np.exp(lp)
    return sets, log_post, marginals, n


def nig_log_marginal(X, y, S, g):
    """log p(y | S) up to a constant shared by all S, from the raw design matrix.

    Model: y = α1 + X_S β + ε, ε ~ N(0, σ²I), β | σ² ~ N(0, gσ²(X_cᵀX_c)⁻¹) with X_c
    the centred columns, p(α, σ²) ∝ 1/σ². Integrating β gives y | α, σ² ~
    N(α1, σ²Σ) with Σ = I + g X_c(X_cᵀX_c)⁻¹X_cᵀ; integrating α (flat) and σ²
    (Jeffreys) in closed form gives
    -½ log|Σ| - ½ log(1ᵀΣ⁻¹1) - ((n-1)/2) log Q, Q = yᵀΣ⁻¹y - (1ᵀΣ⁻¹y)²/(1ᵀΣ⁻¹1),
    computed here with generic dense linear algebra (no R² shortcut).
    """
    n = len(y)
    sigma = np.eye(n)
    if S:
        xc = X[:, list(S)] - X[:, list(S)].mean(axis=0)
        sigma = sigma + g * xc @ np.linalg.solve(xc.T @ xc, xc.T)
    ones = np.ones(n)
    sigma_inv_1 = np.linalg.solve(sigma, ones)
    sigma_inv_y = np.linalg.solve(sigma, y)
    a = ones @ sigma_inv_1
    q = y @ sigma_inv_y - (ones @ sigma_inv_y) ** 2 / a
    _, logdet = np.linalg.slogdet(sigma)
    return -0.5 * logdet - 0.5 * np.log(a) - 0.5 * (n - 1) * np.log(q)


def make_data(values, target, intervened=None):
    """AVICI data from a value matrix, a target index and an intervention mask."""
    values = np.asarray(values)
    n, d = values.shape
    if intervened is None:
        intervened = np.zeros((n, d), bool)
    is_target = np.zeros((n, d))
    is_target[:, target] = 1.0
    return jnp.asarray(
        np.stack([values, np.asarray(intervened, float), is_target], -1),
        dtype=values.dtype,
    )


def _layer_norm(x, gain, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gain + bias


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _attend(h, w_qkv, w_out, b_out, n_heads, allowed):
    """Multi-head self-attention over the first axis of `h` (sequence, width),
    keys restricted to `allowed`, by loops over heads."""
    length, width = h.shape
    head = width // n_heads
    qkv = h @ w_qkv
    q, k, v = qkv[:, :width], qkv[:, width : 2 * width], qkv[:, 2 * width :]
    out = np.zeros((length, width))
    for j in range(n_heads):
        cols = slice(j * head, (j + 1) * head)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(head)
        scores = np.where(allowed[None, :], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[:, cols] = weights @ v[:, cols]
    return out @ w_out + b_out


def surrogate_block(x, block, sample_mask, variable_mask, n_heads):
    """One block of the parent-set model (pre-LN attention over the samples of
    each variable, MLP, attention over the variables of each row, MLP), row by row
    and variable by variable; `block` holds one layer's weights as arrays."""
    p = {name: np.asarray(getattr(block, name), np.float64) for name in (
        "ln_gain", "ln_bias", "w_qkv", "w_out", "b_out", "w_up", "b_up",
        "w_down", "b_down",
    )}  # fmt: skip
    x = np.array(x, np.float64)
    n, d, _ = x.shape

    def mlp(x, i):
        h = _layer_norm(x, p["ln_gain"][2 * i + 1], p["ln_bias"][2 * i + 1])
        return (
            x
            + _gelu_tanh(h @ p["w_up"][i] + p["b_up"][i]) @ p["w_down"][i]
            + (p["b_down"][i])
        )

    h = _layer_norm(x, p["ln_gain"][0], p["ln_bias"][0])
    for i in range(d):
        x[:, i] += _attend(
            h[:, i], p["w_qkv"][0], p["w_out"][0], p["b_out"][0], n_heads, sample_mask
        )
    x = mlp(x, 0)
    h = _layer_norm(x, p["ln_gain"][2], p["ln_bias"][2])
    for r in range(n):
        x[r] += _attend(
            h[r], p["w_qkv"][1], p["w_out"][1], p["b_out"][1], n_heads, variable_mask
        )
    return mlp(x, 1)
