"""The GPT of the ghost, DP, attribution and scaling benchmarks, and its weights for
the PyTorch peers (`_ghost_torch.py`, `_attribution_dattri.py`).

The layout is GPT-2's: learned positions, pre-LN blocks scanned over, the head tied
to the token embedding. `gpt2` is GPT-2 small (124M parameters, bfloat16 compute with
float32 master weights), `tiny` a float32 model for the CPU.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax


# The model's shape, and the default regime: a batch of `batch` sequences of `length`
# tokens.
SIZES = {
    "tiny": dict(vocab=512, dim=64, heads=2, layers=2, context=256, length=64, batch=8),
    "gpt2": dict(
        vocab=50257, dim=768, heads=12, layers=12, context=1024, length=1024, batch=16
    ),
}
# The compute dtype of each size, by the name the PyTorch peers take (`--compute`).
COMPUTE = {"tiny": "f32", "gpt2": "bf16"}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    attn_proj: eqx.nn.Linear
    ln2: eqx.nn.LayerNorm
    fc: eqx.nn.Linear
    proj: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    attention: Any = eqx.field(static=True)

    def __init__(self, dim, heads, key, attention=None):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.attention = attention
        self.ln1 = eqx.nn.LayerNorm(dim)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=k1)
        self.attn_proj = eqx.nn.Linear(dim, dim, key=k2)
        self.ln2 = eqx.nn.LayerNorm(dim)
        self.fc = eqx.nn.Linear(dim, 4 * dim, key=k3)
        self.proj = eqx.nn.Linear(4 * dim, dim, key=k4)
        self.heads = heads

    def __call__(self, h):
        T, D = h.shape
        qkv = jax.vmap(self.qkv)(jax.vmap(self.ln1)(h)).reshape(T, 3, self.heads, -1)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        a = jax.nn.dot_product_attention(
            q[None], k[None], v[None], is_causal=True, implementation=self.attention
        )[0]
        h = h + jax.vmap(self.attn_proj)(a.reshape(T, D))
        up = jax.nn.gelu(jax.vmap(self.fc)(jax.vmap(self.ln2)(h)), approximate=True)
        return h + jax.vmap(self.proj)(up)


class GPT(eqx.Module):
    """GPT-2 layout: learned positions, pre-LN blocks scanned over, tied head."""

    wte: eqx.nn.Embedding
    wpe: eqx.nn.Embedding
    blocks: Block
    ln_f: eqx.nn.LayerNorm
    # `lax.scan`'s `unroll` over the layers: 1 (rolled, the default) or True.
    unroll: int | bool = eqx.field(static=True)

    def __init__(
        self, vocab, dim, heads, layers, context, key, attention=None, unroll=1
    ):
        k1, k2, k3 = jr.split(key, 3)
        self.wte = eqx.nn.Embedding(vocab, dim, key=k1)
        self.wpe = eqx.nn.Embedding(context, dim, key=k2)
        self.blocks = eqx.filter_vmap(lambda k: Block(dim, heads, k, attention))(
            jr.split(k3, layers)
        )
        self.ln_f = eqx.nn.LayerNorm(dim)
        self.unroll = unroll

    def __call__(self, tokens):
        T = tokens.shape[0]
        h = jax.vmap(self.wte)(tokens) + jax.vmap(self.wpe)(jnp.arange(T))
        params, static = eqx.partition(self.blocks, eqx.is_array)
        h, _ = jax.lax.scan(
            lambda h, p: (eqx.combine(p, static)(h), None),
            h,
            params,
            unroll=self.unroll,
        )
        return jax.vmap(self.ln_f)(h) @ self.wte.weight.T


def make_loss(compute_dtype):
    def loss_fn(model, tokens):
        """Next-token cross-entropy of ONE sequence, computed in `compute_dtype`."""
        model = jax.tree.map(
            lambda x: x.astype(compute_dtype) if eqx.is_inexact_array(x) else x, model
        )
        logits = model(tokens[:-1]).astype(jnp.float32)
        return jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(logits, tokens[1:])
        )

    return loss_fn


def torch_state(model: GPT) -> dict[str, np.ndarray]:
    """The weights of `model` in float32, named as in `_ghost_torch.GPT.state_dict()`.

    Equinox's `Linear` stores its weight as `(out, in)`, as `torch.nn.Linear` does.
    """
    state = {
        "wte.weight": model.wte.weight,
        "wpe.weight": model.wpe.weight,
        "ln_f.weight": model.ln_f.weight,
        "ln_f.bias": model.ln_f.bias,
    }
    layers = model.blocks.qkv.weight.shape[0]
    for name in ("ln1", "qkv", "attn_proj", "ln2", "fc", "proj"):
        stacked = getattr(model.blocks, name)
        for n in range(layers):
            state[f"blocks.{n}.{name}.weight"] = stacked.weight[n]
            state[f"blocks.{n}.{name}.bias"] = stacked.bias[n]
    return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
