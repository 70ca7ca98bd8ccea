"""float64 references for per-example quantities, from `vmap(grad)` and numpy."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def per_example_grads(model, loss, batch) -> list[np.ndarray]:
    """Per-example gradients of every inexact leaf, `[B, ...]` numpy arrays."""
    grad = eqx.filter_grad(loss)
    in_axes = (None,) + (0,) * len(batch)
    grads = eqx.filter_jit(lambda m, *b: jax.vmap(grad, in_axes=in_axes)(m, *b))(
        model, *batch
    )
    return [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]


class Reference:
    """Norms, dot products and the train×val matrix of `loss` on two batches."""

    def __init__(self, model, loss, train, val):
        n_train = train[0].shape[0]
        both = tuple(jnp.concatenate([t, v]) for t, v in zip(train, val))
        grads = per_example_grads(model, loss, both)
        self.train = [g[:n_train].reshape(n_train, -1) for g in grads]
        self.val = [g[n_train:].reshape(g.shape[0] - n_train, -1) for g in grads]

    def leaf_sq_norms(self) -> list[np.ndarray]:
        return [np.sum(g * g, axis=1) for g in self.train]

    def norms(self) -> np.ndarray:
        return np.sqrt(sum(self.leaf_sq_norms()))

    def leaf_matrices(self) -> list[np.ndarray]:
        return [t @ v.T for t, v in zip(self.train, self.val)]

    def matrix(self) -> np.ndarray:
        return sum(self.leaf_matrices())

    def leaf_dots(self, reduction="mean") -> list[np.ndarray]:
        reduce = np.mean if reduction == "mean" else np.sum
        return [reduce(m, axis=1) for m in self.leaf_matrices()]

    def dots(self, reduction="mean") -> np.ndarray:
        return sum(self.leaf_dots(reduction))


def projected_reference(model, loss, batch, matrices, layout) -> np.ndarray:
    """P applied to `vmap(grad)` gradients, in numpy, block by block: the rows a
    projector with these `matrices` and `layout` must give."""
    grads = per_example_grads(model, loss, batch)
    B = batch[0].shape[0]
    parts = []
    for g, block, mats in zip(grads, layout, matrices):
        lead = block.shape[: block.stacked]
        inner = block.shape[block.stacked :]
        mats = [np.asarray(m, np.float64) for m in mats]
        if block.kind == "vector":
            v = g.reshape((B,) + lead + (-1,))
            parts.append((v @ mats[0].T if mats else v).reshape(B, -1))
        else:
            G = g.reshape((B,) + lead + (inner[0], -1))
            parts.append((mats[0] @ G @ mats[1].T).reshape(B, -1))
    return np.concatenate(parts, axis=1)
