"""An independent float64 numpy implementation of TiDHy, written from the equations.

Plain loops and hand-written backpropagation (no autodiff), following the original's
semantics: batch-mean energies (per-window step lr/B), PyTorch's SGD with Nesterov
momentum, the halving schedule on r counted in iterations, soft thresholds after the
updates, relative changes with +1e-16, `sign(0) = 0` subgradients, AdamW with
PyTorch's update for the first step.
"""

import numpy as np


class Params:
    """The model's parameters as float64 numpy arrays (linear decoder, MSE)."""

    def __init__(self, model):
        f = lambda a: np.asarray(a, np.float64)
        self.W = f(model.decoder.linear_in.weight)
        self.c = f(model.decoder.linear_in.bias)
        self.r_dim = model.r_dim
        self.M = model.mix_dim
        self.low_rank = model.low_rank_temporal
        self.U = f(model.temporal)
        h = model.hypernet
        self.L1w, self.L1b = f(h.linear_in.weight), f(h.linear_in.bias)
        self.gamma, self.beta = f(h.norm.weight), f(h.norm.bias)
        self.L3w, self.L3b = f(h.linear_hidden.weight), f(h.linear_hidden.bias)
        self.L4w = f(h.linear_out.weight)
        self.L4b = (
            np.zeros(self.L4w.shape[0])
            if h.linear_out.bias is None
            else f(h.linear_out.bias)
        )
        self.tw = model.temp_weight

    def V(self):
        if self.low_rank:
            return np.einsum("kia,kja->kij", self.U, self.U)
        return self.U.reshape(self.M, self.r_dim, self.r_dim)


def elu(y):
    return np.where(y > 0, y, np.expm1(np.minimum(y, 0)))


def hyper_forward(p: Params, r2):
    a1 = p.L1w @ r2 + p.L1b
    mu = a1.mean()
    var = ((a1 - mu) ** 2).mean()
    s = 1.0 / np.sqrt(var + 1e-5)
    n = (a1 - mu) * s
    y = p.gamma * n + p.beta
    e = elu(y)
    a3 = p.L3w @ e + p.L3b
    a4 = p.L4w @ a3 + p.L4b
    w = np.maximum(a4, 0)
    return w, (r2, a1, s, n, y, e, a3, a4)


def hyper_backward(p: Params, cache, dw):
    """Gradients of a scalar with respect to the hypernet's parameters and r2."""
    r2, a1, s, n, y, e, a3, a4 = cache
    da4 = dw * (a4 > 0)
    g = {"L4w": np.outer(da4, a3), "L4b": da4}
    da3 = p.L4w.T @ da4
    g["L3w"], g["L3b"] = np.outer(da3, e), da3
    de = p.L3w.T @ da3
    dy = de * np.where(y > 0, 1.0, np.exp(np.minimum(y, 0)))
    g["gamma"], g["beta"] = dy * n, dy
    dn = dy * p.gamma
    da1 = s * (dn - dn.mean() - n * (dn * n).mean())
    g["L1w"], g["L1b"] = np.outer(da1, r2), da1
    return g, p.L1w.T @ da1


def energy_gradients(p: Params, r, r2, x, r_prev, lam, observed=None, skip=()):
    """E and its gradients for a batch (rows are windows), batch-mean semantics.

    `lam = (l1_r, l1_r2, l1_w)` are the L1 weights (summed over windows).
    `observed[b]`: the feature indices of window b that enter the spatial term (all
    by default); the others are left out of the sums. Windows in `skip` contribute
    nothing (but still count in B).
    """
    B = r.shape[0]
    V = p.V()
    E = 0.0
    gr, gr2 = np.zeros_like(r), np.zeros_like(r2)
    for b in range(B):
        if b in skip:
            continue
        idx = np.arange(x.shape[1]) if observed is None else observed[b]
        w, cache = hyper_forward(p, r2[b])
        r_bar = np.einsum("k,kij,j->i", w, V, r_prev[b])
        err = p.W[idx] @ r[b] + p.c[idx] - x[b, idx]
        dt = r[b] - r_bar
        E += (err @ err + p.tw * dt @ dt) / B
        E += lam[0] * np.abs(r[b]).sum() + lam[1] * np.abs(r2[b]).sum()
        E += lam[2] * np.abs(w).sum()
        gr[b] = (2 * p.W[idx].T @ err + 2 * p.tw * dt) / B + lam[0] * np.sign(r[b])
        d_rbar = -2 * p.tw * dt / B
        dw = np.einsum("kij,j,i->k", V, r_prev[b], d_rbar) + lam[2] * np.sign(w)
        _, dr2 = hyper_backward(p, cache, dw)
        gr2[b] = dr2 + lam[1] * np.sign(r2[b])
    return E, gr, gr2


def soft(x, t):
    return np.sign(x) * np.maximum(np.abs(x) - t, 0)


def infer(
    p: Params,
    x,
    r_prev,
    r2_init,
    *,
    lr_r,
    lr_r2,
    max_iter,
    tol,
    lmda=(0.0, 0.0),
    lam=(0.0, 0.0, 0.0),
    halve=True,
    batch_converge=True,
    observed=None,
    skip=(),
):
    """One inference call (`inf`), returning r, r2 and the number of iterations.

    `batch_converge=False`: the original's per-window test, relative changes per
    row (norms over the latent axis), all of them below `tol`. `observed`, `skip`:
    see `energy_gradients`.
    """
    r = np.zeros_like(r_prev)
    r2 = r2_init.copy()
    m_r, m_r2 = None, None
    every = max_iter // 10
    milestones = list(range(every, max_iter, every)) if halve else []
    i = 0
    while i < max_iter:
        old_r, old_r2 = r.copy(), r2.copy()
        _, g_r, g_r2 = energy_gradients(p, r, r2, x, r_prev, lam, observed, skip)
        m_r = g_r if m_r is None else 0.9 * m_r + g_r
        m_r2 = g_r2 if m_r2 is None else 0.9 * m_r2 + g_r2
        lr_i = lr_r * 0.5 ** sum(m <= i for m in milestones)
        r = r - lr_i * (g_r + 0.9 * m_r)
        r2 = r2 - lr_r2 * (g_r2 + 0.9 * m_r2)
        r2 = soft(r2, lmda[1])
        r = soft(r, lmda[0])
        axis = None if batch_converge else -1
        rho_r = np.linalg.norm(r - old_r, axis=axis) / (
            np.linalg.norm(old_r, axis=axis) + 1e-16
        )
        rho_r2 = np.linalg.norm(r2 - old_r2, axis=axis) / (
            np.linalg.norm(old_r2, axis=axis) + 1e-16
        )
        i += 1
        if np.all(rho_r < tol) and np.all(rho_r2 < tol):
            break
    return r, r2, i


def infer_first_step(
    p: Params, x, *, lr, max_iter, tol, weight_decay=0.01, observed=None
):
    """`inf_first_step`: AdamW on the batch-mean spatial loss, per-window stopping.

    `observed[b]`: the feature indices of window b in the loss (all by default)."""
    B = x.shape[0]
    r = np.zeros((B, p.W.shape[1]))
    m, v = np.zeros_like(r), np.zeros_like(r)
    i = 0
    while i < max_iter:
        old = r.copy()
        g = np.zeros_like(r)
        for b in range(B):
            idx = np.arange(x.shape[1]) if observed is None else observed[b]
            g[b] = 2 * (p.W[idx] @ r[b] + p.c[idx] - x[b, idx]) @ p.W[idx] / B
        t = i + 1
        r = r * (1 - lr * weight_decay)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        r = r - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        rho = np.linalg.norm(r - old, axis=-1) / (np.linalg.norm(old, axis=-1) + 1e-16)
        i += 1
        if np.all(rho < tol):
            break
    return r, i


def predict(p: Params, r_prev, r2):
    w, _ = hyper_forward(p, r2)
    return np.einsum("k,kij,j->i", w, p.V(), r_prev)


def task_losses(p: Params, X, R, R2, observed=None):
    """(L_hat, L_bar, tw L_temp) of the training forward, given the latents.

    `observed[b][t]`: the feature indices of window b at step t in the spatial
    terms (all by default); windows with none at any step are left out of the
    batch, whose mean runs over the others."""
    B, T, D = X.shape
    obs = (
        (lambda b, t: np.arange(D))
        if observed is None
        else (lambda b, t: observed[b][t])
    )
    kept = [b for b in range(B) if sum(len(obs(b, t)) for t in range(T)) > 0]
    B = len(kept)
    hat = bar = temp = 0.0
    for b in kept:
        for t in range(T):
            idx = obs(b, t)
            e = p.W[idx] @ R[b, t] + p.c[idx] - X[b, t, idx]
            hat += e @ e / B
            if t == 0:
                continue
            r_bar = predict(p, R[b, t - 1], R2[b, t])
            e = p.W[idx] @ r_bar + p.c[idx] - X[b, t, idx]
            bar += e @ e / B
            d = R[b, t] - r_bar
            temp += p.tw * (d @ d) / B
    return hat, bar, temp


def _abs_cos_rows(rows, scale):
    """scale * Σ_{i>j} |cos(rows_i, rows_j)| and its gradient with respect to rows."""
    norms = np.maximum(np.linalg.norm(rows, axis=1), 1e-8)
    value, grad = 0.0, np.zeros_like(rows)
    n = rows.shape[0]
    for i in range(n):
        for j in range(i):
            c = rows[i] @ rows[j] / (norms[i] * norms[j])
            value += scale * abs(c)
            s = scale * np.sign(c)
            grad[i] += s * (
                rows[j] / (norms[i] * norms[j]) - c * rows[i] / norms[i] ** 2
            )
            grad[j] += s * (
                rows[i] / (norms[i] * norms[j]) - c * rows[j] / norms[j] ** 2
            )
    return value, grad


def regularisers(p: Params, cos_eta, orth_r2):
    """cos_reg, orth_r2 and their gradients (full-rank temporal matrices)."""
    cos, g_U = _abs_cos_rows(p.U, cos_eta / p.M)
    q = p.L1w.shape[1]
    orth, g_cols = _abs_cos_rows(p.L1w.T, orth_r2 / q)
    return cos, orth, g_U, g_cols.T


def task_gradients(p: Params, X, R, R2):
    """Hand-derived gradients of L_hat, L_bar and tw L_temp with respect to every
    parameter: a dict task -> dict name -> array."""
    B, T, _ = X.shape
    V = p.V()
    names = ["W", "c", "U", "L1w", "L1b", "gamma", "beta", "L3w", "L3b", "L4w", "L4b"]
    shapes = {n: getattr(p, n).shape for n in names}
    grads = {
        t: {n: np.zeros(s) for n, s in shapes.items()} for t in ("hat", "bar", "temp")
    }
    for b in range(B):
        for t in range(T):
            e = p.W @ R[b, t] + p.c - X[b, t]
            grads["hat"]["W"] += 2 * np.outer(e, R[b, t]) / B
            grads["hat"]["c"] += 2 * e / B
            if t == 0:
                continue
            w, cache = hyper_forward(p, R2[b, t])
            r_prev = R[b, t - 1]
            r_bar = np.einsum("k,kij,j->i", w, V, r_prev)
            e = p.W @ r_bar + p.c - X[b, t]
            d = R[b, t] - r_bar
            for task, d_rbar in (
                ("bar", 2 * p.W.T @ e / B),
                ("temp", -2 * p.tw * d / B),
            ):
                g = grads[task]
                if task == "bar":
                    g["W"] += 2 * np.outer(e, r_bar) / B
                    g["c"] += 2 * e / B
                dV = np.einsum("k,i,j->kij", w, d_rbar, r_prev)
                g["U"] += dV.reshape(p.U.shape)
                dw = np.einsum("kij,j,i->k", V, r_prev, d_rbar)
                hyper, _ = hyper_backward(p, cache, dw)
                for name, value in hyper.items():
                    g[name] += value
    return grads
