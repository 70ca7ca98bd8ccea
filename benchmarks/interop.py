"""Overhead of calling the JAX CHMM from PyTorch (`TorchCHMM`) against pure JAX.

Usage: `python benchmarks/interop.py [--size small|large]`. Both sides compute the
same thing: the batched soft-evidence log-likelihood and smoothed posteriors of a
cloned HMM with a softmax-parameterised transition tensor, and the gradient of
`sum(lnL) + sum(posteriors * w)` with respect to the logits and the evidence. The
JAX side is one jitted `value_and_grad`; the torch side is `TorchCHMM` forward plus
`backward` (two bridge crossings, DLPack conversions, two compiled JAX calls).
"""

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _harness import Results, time_callable

from eqx_models.chmm import CHMM, posteriors
from eqx_models.interop.torch import TorchCHMM


SIZES: dict[str, dict[str, Any]] = {
    "small": dict(batch=4, length=100, n_obs=4, clones=5, method="scan"),
    "large": dict(batch=64, length=1000, n_obs=10, clones=10, method="parallel"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(SIZES), default=None)
    args = parser.parse_args(argv)
    platform = jax.devices()[0].platform
    size = args.size or ("small" if platform == "cpu" else "large")
    cfg = SIZES[size]
    device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
    results = Results(
        "interop",
        "PyTorch interop: TorchCHMM against pure JAX",
        "Forward and backward of a batched soft-evidence cloned HMM (log-likelihood "
        "and smoothed posteriors, gradients to the transition logits and the "
        "evidence): `TorchCHMM` called from torch against one jitted JAX "
        "`value_and_grad`. The difference is the bridge: DLPack conversions, two "
        "compiled calls instead of one, and torch's autograd bookkeeping.",
    )
    rng = np.random.default_rng(0)
    n_clones = [cfg["clones"]] * cfg["n_obs"]
    n_states = sum(n_clones)
    B, T = cfg["batch"], cfg["length"]
    logits = rng.normal(size=(4, n_states, n_states)).astype(np.float32)
    evidence = np.log(rng.dirichlet(np.ones(cfg["n_obs"]), size=(B, T))).astype(
        np.float32
    )
    actions = rng.integers(0, 4, size=(B, T)).astype(np.int32)
    weights = np.linspace(0, 1, n_states, dtype=np.float32)

    def loss(logits, evidence, actions):
        model = CHMM(tuple(n_clones), jax.nn.softmax(logits, axis=-1))

        def one(e, a):
            p = posteriors(model, e, a, method=cfg["method"])
            return p.log_likelihood + jnp.sum(p.smoothed * weights)

        return jnp.sum(jax.vmap(one)(evidence, actions))

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    j_args = (jnp.asarray(logits), jnp.asarray(evidence), jnp.asarray(actions))
    sizes = dict(cfg, n_states=n_states)
    jax_row = results.add(
        workload="chmm soft evidence, forward + backward",
        impl="JAX value_and_grad",
        sizes=sizes,
        **time_callable(lambda: grad_fn(*j_args), repeats=20),
    )

    chmm = TorchCHMM(n_clones, 4, logits=torch.from_numpy(logits), method=cfg["method"])
    chmm = chmm.to(device)
    t_evidence = torch.from_numpy(evidence).to(device).requires_grad_(True)
    t_actions = torch.from_numpy(actions).to(device)
    t_weights = torch.from_numpy(weights).to(device)

    def torch_step():
        chmm.zero_grad()
        t_evidence.grad = None
        lnL, post = chmm(t_evidence, t_actions)
        total = lnL.sum() + (post * t_weights).sum()
        total.backward()
        return total

    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: 0)
    torch_row = results.add(
        workload="chmm soft evidence, forward + backward",
        impl="TorchCHMM (torch autograd through the bridge)",
        sizes=sizes,
        **time_callable(torch_step, sync=sync, repeats=20),
    )
    results.note(
        f"TorchCHMM / JAX median ratio: "
        f"{torch_row['median_s'] / jax_row['median_s']:.3f} ({size} size, torch on "
        f"{device})."
    )
    results.save()


if __name__ == "__main__":
    main()
