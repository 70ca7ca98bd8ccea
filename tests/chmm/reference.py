"""Float64 NumPy references for the cloned HMM, written from the definitions.

Everything here is dense over all N states (no blocks), with the emission of state i
at step t given by `e[t, i]` (1 for the clones of x[t] and 0 elsewhere for ids).
"""

import itertools

import numpy as np


def symbols(n_clones) -> np.ndarray:
    return np.repeat(np.arange(len(n_clones)), n_clones)


def random_model(rng, n_clones, n_actions, *, zero_fraction=0.0):
    """A random row-stochastic T (float64) with some exact zeros, and a random Pi."""
    n = sum(n_clones)
    T = rng.random((n_actions, n, n))
    T[rng.random(T.shape) < zero_fraction] = 0
    sums = T.sum(-1, keepdims=True)
    T = np.where(sums > 0, T / np.where(sums > 0, sums, 1), 0)
    Pi = rng.random(n)
    return T, Pi / Pi.sum()


def emission_weights(n_clones, x):
    """`e[t, i]`: 1 if state i emits x[t] (ids) or exp(x[t, sym(i)]) (log-evidence)."""
    sym = symbols(n_clones)
    x = np.asarray(x)
    if x.ndim == 1:
        return (sym[None, :] == x[:, None]).astype(np.float64)
    return np.exp(x.astype(np.float64))[:, sym]


def forward(T, Pi, e, a):
    """Normalised filtered messages and per-step log normalisers."""
    alphas, logs = [], []
    v = Pi * e[0]
    for t in range(len(e)):
        if t > 0:
            v = (alphas[-1] @ T[a[t - 1]]) * e[t]
        n = v.sum()
        alphas.append(v / n if n > 0 else v)
        logs.append(np.log(n) if n > 0 else -np.inf)
    return np.array(logs), np.array(alphas)


def backward(T, e, a):
    """beta[t] proportional to p(x[t+1:] | z[t]), normalised to sum one."""
    n_steps, n = e.shape
    betas = [np.ones(n) / n]
    for t in range(n_steps - 1, 0, -1):
        b = T[a[t - 1]] @ (e[t] * betas[0])
        betas.insert(0, b / b.sum() if b.sum() > 0 else b)
    return np.array(betas)


def posteriors(T, Pi, e, a):
    logs, alphas = forward(T, Pi, e, a)
    betas = backward(T, e, a)
    g = alphas * betas
    return logs.sum(), alphas, g / g.sum(-1, keepdims=True), betas


def expected_counts(T, Pi, e, a):
    _, alphas = forward(T, Pi, e, a)
    betas = backward(T, e, a)
    C = np.zeros_like(T)
    for t in range(1, len(e)):
        xi = alphas[t - 1][:, None] * T[a[t - 1]] * (e[t] * betas[t])[None, :]
        C[a[t - 1]] += xi / xi.sum()
    return C


def em_step(T, Pi, e, a, pseudocount):
    C = expected_counts(T, Pi, e, a) + pseudocount
    s = C.sum(-1, keepdims=True)
    return np.where(s > 0, C / np.where(s > 0, s, 1), 0)


def viterbi(T, Pi, e, a):
    """Max-product in log space with first-index tie-breaking."""
    with np.errstate(divide="ignore"):
        logT, logPi, loge = np.log(T), np.log(Pi), np.log(e)
    score = logPi + loge[0]
    pointers = []
    for t in range(1, len(e)):
        cand = score[:, None] + logT[a[t - 1]]
        pointers.append(np.argmax(cand, axis=0))
        score = cand.max(0) + loge[t]
    path = [int(np.argmax(score))]
    best = score[path[0]]
    for p in reversed(pointers):
        path.insert(0, int(p[path[0]]))
    return np.array(path), best


def brute_force(T, Pi, e, a):
    """Enumerate every state path: likelihood, marginals, pair counts, best path."""
    n_steps, n = e.shape
    total = 0.0
    marg = np.zeros((n_steps, n))
    counts = np.zeros_like(T)
    best, best_p = None, -1.0
    for z in itertools.product(range(n), repeat=n_steps):
        p = Pi[z[0]] * e[0, z[0]]
        for t in range(1, n_steps):
            p *= T[a[t - 1], z[t - 1], z[t]] * e[t, z[t]]
        if p == 0:
            continue
        total += p
        for t in range(n_steps):
            marg[t, z[t]] += p
        for t in range(1, n_steps):
            counts[a[t - 1], z[t - 1], z[t]] += p
        if p > best_p:
            best, best_p = z, p
    if total == 0:
        return {"log_likelihood": -np.inf}
    return {
        "log_likelihood": np.log(total),
        "smoothed": marg / total,
        "counts": counts / total,
        "best_path": np.array(best),
        "best_log_prob": np.log(best_p),
    }
