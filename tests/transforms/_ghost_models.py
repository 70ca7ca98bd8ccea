"""Small models shared by the ghost / per-sample tests: plain `eqx.nn` layers only."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, Float


def mlp(key, dtype=None):
    return eqx.nn.MLP(3, 2, 6, 2, activation=jnp.tanh, key=key, dtype=dtype)


def regression_loss(model, x, y):
    return jnp.sum((model(x) - y) ** 2)


def regression_batch(key, n, dtype=jnp.float32):
    kx, ky = jr.split(key)
    return (
        jr.normal(kx, (n, 3), dtype),
        jr.normal(ky, (n, 2), dtype),
    )


class ConvNet(eqx.Module):
    """Conv2d and Conv1d with bias, stride, padding and dilation, then a Linear head."""

    conv2: eqx.nn.Conv2d
    conv1: eqx.nn.Conv1d
    head: eqx.nn.Linear

    def __init__(self, key, dtype=None):
        k1, k2, k3 = jr.split(key, 3)
        self.conv2 = eqx.nn.Conv2d(
            2,
            3,
            (3, 2),
            stride=(2, 1),
            padding=((1, 0), (1, 1)),
            dilation=(1, 2),
            key=k1,
            dtype=dtype,
        )
        self.conv1 = eqx.nn.Conv1d(
            3, 4, 3, stride=2, padding=2, dilation=2, key=k2, dtype=dtype
        )
        self.head = eqx.nn.Linear(4 * 7, 3, key=k3, dtype=dtype)

    def __call__(self, x: Float[Array, "2 9 7"]) -> Float[Array, " 3"]:
        h = jnp.tanh(self.conv2(x))  # (3, 4, 7)
        h = h.reshape(3, -1)[:, :14]  # (3, 14)
        h = jnp.tanh(self.conv1(h))  # (4, 7)
        return self.head(h.reshape(-1))


def classification_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y)


def conv_batch(key, n, dtype=jnp.float32):
    kx, ky = jr.split(key)
    return jr.normal(kx, (n, 2, 9, 7), dtype), jr.randint(ky, (n,), 0, 3)


class BagOfWords(eqx.Module):
    """Embedding (used twice: tokens and a repeated lookup), LayerNorm, Linear."""

    embed: eqx.nn.Embedding
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key, vocab=7, dim=4, dtype=None):
        k1, k2 = jr.split(key)
        self.embed = eqx.nn.Embedding(vocab, dim, key=k1, dtype=dtype)
        self.norm = eqx.nn.LayerNorm(dim, dtype=dtype)
        self.head = eqx.nn.Linear(dim, 3, key=k2, dtype=dtype)

    def __call__(self, tokens):
        h = jax.vmap(self.embed)(tokens)
        h = jax.vmap(self.norm)(h)
        return self.head(jnp.mean(h, axis=0))


def token_batch(key, n, length=5, vocab=7, classes=3):
    kx, ky = jr.split(key)
    return jr.randint(kx, (n, length), 0, vocab), jr.randint(ky, (n,), 0, classes)


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    ln2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    n_heads: int = eqx.field(static=True)

    def __init__(self, dim, n_heads, key, dtype=None):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.ln1 = eqx.nn.LayerNorm(dim, dtype=dtype)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=k1, dtype=dtype)
        self.proj = eqx.nn.Linear(dim, dim, key=k2, dtype=dtype)
        self.ln2 = eqx.nn.LayerNorm(dim, dtype=dtype)
        self.up = eqx.nn.Linear(dim, 2 * dim, key=k3, dtype=dtype)
        self.down = eqx.nn.Linear(2 * dim, dim, key=k4, dtype=dtype)
        self.n_heads = n_heads

    def __call__(self, h):
        T, D = h.shape
        q, k, v = jnp.split(jax.vmap(self.qkv)(jax.vmap(self.ln1)(h)), 3, axis=-1)
        heads = lambda z: z.reshape(T, self.n_heads, D // self.n_heads)
        q, k, v = heads(q), heads(k), heads(v)
        scores = jnp.einsum("thd,shd->hts", q, k) / jnp.sqrt(D // self.n_heads)
        causal = jnp.tril(jnp.ones((T, T), bool))
        scores = jnp.where(causal, scores, -jnp.inf)
        attn = jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, axis=-1), v)
        h = h + jax.vmap(self.proj)(attn.reshape(T, D))
        up = jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.ln2)(h)))
        return h + jax.vmap(self.down)(up)


class GPT(eqx.Module):
    """A small causal transformer LM; `tied` applies the token embedding as the head.

    `scan=True` stacks the blocks and runs them with `lax.scan` (scan over layers).
    """

    embed: eqx.nn.Embedding
    pos: eqx.nn.Embedding
    blocks: Block | list
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear | None
    tied: bool = eqx.field(static=True)
    scan: bool = eqx.field(static=True)

    def __init__(
        self,
        key,
        vocab=7,
        dim=4,
        n_heads=2,
        n_layers=1,
        length=5,
        tied=False,
        scan=False,
        dtype=None,
    ):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.embed = eqx.nn.Embedding(vocab, dim, key=k1, dtype=dtype)
        self.pos = eqx.nn.Embedding(length, dim, key=k2, dtype=dtype)
        keys = jr.split(k3, n_layers)
        if scan:
            self.blocks = eqx.filter_vmap(lambda k: Block(dim, n_heads, k, dtype))(keys)
        else:
            self.blocks = [Block(dim, n_heads, k, dtype) for k in keys]
        self.ln_f = eqx.nn.LayerNorm(dim, dtype=dtype)
        self.head = None if tied else eqx.nn.Linear(dim, vocab, key=k4, dtype=dtype)
        self.tied = tied
        self.scan = scan

    def __call__(self, tokens):
        h = self.hidden(jax.vmap(self.embed)(tokens))
        if self.tied:
            return h @ self.embed.weight.T
        assert self.head is not None
        return jax.vmap(self.head)(h)

    def hidden(self, embedded):
        """Final hidden states from the token embeddings `embedded` (`[T, dim]`)."""
        T = embedded.shape[0]
        h = embedded + jax.vmap(self.pos)(jnp.arange(T))
        if self.scan:
            params, static = eqx.partition(self.blocks, eqx.is_array)

            def body(h, p):
                return eqx.combine(p, static)(h), None

            h, _ = jax.lax.scan(body, h, params)
        else:
            for block in self.blocks:
                h = block(h)
        return jax.vmap(self.ln_f)(h)


def lm_loss(model, tokens):
    logits = model(tokens[:-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[1:]))


def lm_batch(key, n, length=5, vocab=7):
    return (jr.randint(key, (n, length), 0, vocab),)


class ElementwiseScale(eqx.Module):
    """A matrix parameter used elementwise: outside the ghost layer rules."""

    scale: Float[Array, "2 3"]
    head: eqx.nn.Linear

    def __init__(self, key, dtype=None):
        k1, k2 = jr.split(key)
        self.scale = jr.normal(k1, (2, 3), dtype or jnp.float32)
        self.head = eqx.nn.Linear(6, 2, key=k2, dtype=dtype)

    def __call__(self, x: Float[Array, "2 3"]) -> Float[Array, " 2"]:
        return self.head((jnp.tanh(self.scale * x)).reshape(-1))


def elementwise_batch(key, n, dtype=jnp.float32):
    kx, ky = jr.split(key)
    return jr.normal(kx, (n, 2, 3), dtype), jr.normal(ky, (n, 2), dtype)


# A bfloat16 GPT with its head tied to a vocabulary of 11, and 6 sequences of 6
# tokens: its vocabulary-wide arrays, `[6, 5, 11]` per batch, are easy to find in a
# lowered program.
WIDE_VOCAB, WIDE_BATCH, WIDE_LENGTH = 11, 6, 6


def bfloat16_tied_gpt():
    """`(model, (tokens,))`: the bfloat16 tied GPT above and one batch for it."""
    model = GPT(
        jr.key(0),
        vocab=WIDE_VOCAB,
        dim=8,
        length=WIDE_LENGTH,
        tied=True,
        dtype=jnp.bfloat16,
    )
    batch = lm_batch(jr.key(1), WIDE_BATCH, length=WIDE_LENGTH, vocab=WIDE_VOCAB)
    return model, batch


def plain_backward_text(model, tokens) -> str:
    """The lowered program of a plain backward pass of `lm_loss` summed over a
    batch: what a ghost program's vocabulary-wide arrays are counted against."""
    grad = eqx.filter_grad(lambda m, t: jnp.sum(jax.vmap(lm_loss, (None, 0))(m, t)))
    return eqx.filter_jit(grad).lower(model, tokens).as_text()


# name -> (model, loss, batch maker); every case is exact under all methods.
def make_case(name: str, dtype=jnp.float64, n_train=3, n_val=2):
    """`(model, loss_fn, train_batch, val_batch)` for one of the shared test models."""
    key = jr.key(0)
    if name == "mlp":
        model, loss = mlp(key, dtype), regression_loss
        make = lambda k, n: regression_batch(k, n, dtype)
    elif name == "conv":
        model, loss = ConvNet(key, dtype), classification_loss
        make = lambda k, n: conv_batch(k, n, dtype)
    elif name == "embedding_layernorm":
        model, loss = BagOfWords(key, dtype=dtype), classification_loss
        make = token_batch
    elif name == "gpt":
        model, loss = GPT(key, dtype=dtype), lm_loss
        make = lm_batch
    elif name == "gpt_scan":
        model, loss = GPT(key, scan=True, n_layers=2, dtype=dtype), lm_loss
        make = lm_batch
    elif name == "gpt_tied_scan":
        model, loss = GPT(key, tied=True, scan=True, n_layers=2, dtype=dtype), lm_loss
        make = lm_batch
    elif name == "gpt_tied":
        model, loss = GPT(key, tied=True, dtype=dtype), lm_loss
        make = lm_batch
    elif name == "elementwise":
        model, loss = ElementwiseScale(key, dtype), regression_loss
        make = lambda k, n: elementwise_batch(k, n, dtype)
    else:
        raise KeyError(name)
    return model, loss, make(jr.key(1), n_train), make(jr.key(2), n_val)


CASES = ["mlp", "conv", "embedding_layernorm", "gpt_scan", "gpt_tied"]
