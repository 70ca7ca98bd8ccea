"""The blocked parallel passes against the sequential scan, block layout by layout.

The public tests run the parallel strategy with the block count its cost model picks,
which for their tiny models is one step per block; here the same passes run with all
steps in one block and with several blocks of several steps and a padded tail.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_models.chmm import _parallel, _scan
from eqx_models.chmm._chain import make_chain

from .test_inference import ACTIONS, as_model, BLOCKS, case, close, UNEVEN


@functools.partial(jax.jit, static_argnames=("layout", "blocks"))
def _both(T, Pi, x, a, length, *, layout, blocks):
    """Every pass and the gradient of `lnL` by the scan and by the blocked products."""

    def lnl(T, Pi, x, parallel):
        chain = make_chain(as_model(layout, T, Pi), x, a, length=length)
        if parallel:
            return _parallel.parallel_log_likelihood(chain, blocks)
        return _scan.scan_log_likelihood(chain)

    chain = make_chain(as_model(layout, T, Pi), x, a, length=length)
    alphas, log_norms = _scan.forward_scan(chain)
    us, gammas, _ = _scan.backward_scan(chain, alphas, accumulate=False)
    argnums = (0, 1, 2) if jnp.issubdtype(x.dtype, jnp.floating) else (0, 1)
    grad = jax.grad(lnl, argnums)
    scan = (alphas, log_norms, us, gammas, lnl(T, Pi, x, False), grad(T, Pi, x, False))
    parallel = (
        *_parallel.parallel_smooth(chain, blocks),
        lnl(T, Pi, x, True),
        grad(T, Pi, x, True),
    )
    forward = _parallel.parallel_forward(chain, blocks)
    return scan, parallel, forward


# Eight steps: in one block of seven, in three blocks of three (two padded), or in
# seven blocks of one (a product tree of nine elements, padded at two levels).
@pytest.mark.parametrize("blocks", [1, 3, 7])
@pytest.mark.parametrize(
    "layout, evidence, length",
    [(BLOCKS, False, None), (UNEVEN, False, None), (BLOCKS, True, None)]
    # Padded sequences (as in learning): identity steps from `length` on.
    + [(BLOCKS, False, 5), (UNEVEN, False, 2)],
)
def test_passes_and_gradients_match_the_scan(x64, layout, evidence, length, blocks):
    T, Pi, x, a = case(layout, n_steps=8, seed=1)
    if evidence:
        rng = np.random.default_rng(1)
        x = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(8, len(layout)))))
    length = None if length is None else jnp.asarray(length)
    scan, parallel, forward = _both(
        jnp.asarray(T),
        jnp.asarray(Pi),
        jnp.asarray(x),
        jnp.asarray(a),
        length,
        layout=layout,
        blocks=blocks,
    )
    for got, want in zip(jax.tree.leaves(parallel), jax.tree.leaves(scan)):
        close(got, want)
    for got, want in zip(forward, scan[:2]):
        close(got, want)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 49_999])
@pytest.mark.parametrize("size", [3, 70])
@pytest.mark.parametrize("blocks", [1, 3, 1024, None])
def test_block_shapes_cover_the_steps_with_least_padding(n, size, blocks):
    n_blocks, length = _parallel.block_shape(n, size, blocks)
    assert n_blocks * length >= n
    # No block is only padding, and a requested count is not exceeded.
    assert (n_blocks - 1) * length < n
    if blocks is not None:
        assert n_blocks <= blocks


def test_the_graph_grows_with_neither_the_length_nor_the_tree():
    T, Pi, _, _ = case(BLOCKS)
    model = as_model(BLOCKS, T, Pi, jnp.float32)

    def counts(n_steps, blocks):
        rng = np.random.default_rng(12)
        x = jnp.asarray(rng.integers(0, len(BLOCKS), n_steps))
        a = jnp.asarray(rng.integers(0, ACTIONS, n_steps))

        def passes(model, x, a):
            chain = make_chain(model, x, a)

            def lnl(src):
                return _parallel.parallel_log_likelihood(
                    chain._replace(src=src), blocks
                )

            return _parallel.parallel_smooth(chain, blocks), jax.grad(lnl)(chain.src)

        text = jax.jit(passes).lower(model, x, a).as_text()
        return text.count("stablehlo.while"), text.count("stablehlo.dot_general")

    # An associative scan over the steps unrolls about log2(T) levels, each with its
    # own matrix products; the blocked passes have the same loops and products at
    # every length, and the product tree across the blocks runs its levels (depth
    # ceil(log2(K + 2)): 4, 5 and 8 here) as loops too.
    assert counts(100, 10) == counts(20_000, 10)
    assert counts(20_000, 10) == counts(20_000, 20) == counts(20_000, 150)
