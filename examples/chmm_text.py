"""A character-level cloned HMM on Python's own standard library, against n-grams.

The text is the source of a few modules of the standard library that ships with the
interpreter running the script (so no download). Characters are the symbols (the
most frequent ones, the rest pooled into one "other" symbol), there is a single
action, and each symbol gets the same number of clones: thousands of clones in all,
stored as a `SparseCHMM` (every symbol pair allowed, so the model is a full cloned
HMM; the block layout is what the large models use) and trained with streaming EM
(chunks of the training text). Held-out text (another module) is scored in bits per
character, against add-k smoothed n-gram models (orders 1 to 3) fitted in this
script on the same symbols. Last, the trained model writes a sample of its own
text (pooled characters shown as `~`).

Usage: `python examples/chmm_text.py [--smoke]`.
"""

import collections
import math
import os
import time

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _common import parse_args, save_summary

from eqx_models.chmm import (
    bits_per_step,
    log_likelihood,
    sample,
    SparseCHMM,
    streaming_em,
)


TRAIN = ["textwrap.py", "argparse.py", "collections/__init__.py", "functools.py"]
HELD_OUT = "difflib.py"


def read(name: str) -> str:
    with open(os.path.join(os.path.dirname(os.__file__), name), encoding="utf-8") as f:
        return f.read()


def sizes(args) -> dict:
    if args.smoke:
        return dict(
            symbols=24, clones=8, train=4_000, test=1_000, em=4, chunk=1_000, sample=80
        )
    return dict(
        symbols=48,
        clones=50,
        train=120_000,
        test=20_000,
        em=20,
        chunk=20_000,
        sample=400,
    )


def ngram_bits(train: np.ndarray, test: np.ndarray, order: int, k: int) -> float:
    """Held-out bits per character of an add-`alpha` smoothed n-gram model."""
    alpha = 0.1
    counts = collections.Counter()
    context = collections.Counter()
    for t in range(order - 1, len(train)):
        history = tuple(train[t - order + 1 : t])
        counts[history + (train[t],)] += 1
        context[history] += 1
    total = 0.0
    for t in range(order - 1, len(test)):
        history = tuple(test[t - order + 1 : t])
        p = (counts[history + (test[t],)] + alpha) / (context[history] + alpha * k)
        total -= math.log2(p)
    return total / (len(test) - order + 1)


def main(argv=None):
    args = parse_args(__doc__, argv)
    cfg = sizes(args)
    train_text = "".join(read(name) for name in TRAIN)[: cfg["train"]]
    test_text = read(HELD_OUT)[: cfg["test"]]
    frequent = [c for c, _ in collections.Counter(train_text).most_common()]
    vocab = {c: i for i, c in enumerate(frequent[: cfg["symbols"] - 1])}
    other = cfg["symbols"] - 1

    def encode(text):
        return np.array([vocab.get(c, other) for c in text], np.int32)

    x_train, x_test = encode(train_text), encode(test_text)
    a_train = np.zeros_like(x_train)
    n_clones = [cfg["clones"]] * cfg["symbols"]
    model = SparseCHMM.random(n_clones, 1, key=jr.key(0))
    print(
        f"{sum(n_clones)} clones, {model.n_blocks} blocks of {cfg['clones']}^2; "
        f"{len(x_train)} training characters, {len(x_test)} held out"
    )
    start = time.perf_counter()
    model, curve = streaming_em(
        model,
        x_train,
        a_train,
        n_iter=cfg["em"],
        chunk_size=cfg["chunk"],
        pseudocount=1e-3,
        progress=True,
    )
    seconds = time.perf_counter() - start
    train_bits = float(bits_per_step(curve[-1], len(x_train)))
    lnl = log_likelihood(
        model, jnp.asarray(x_test), jnp.zeros_like(jnp.asarray(x_test))
    )
    test_bits = float(bits_per_step(lnl, len(x_test)))
    baselines = {
        f"{n}-gram held-out bits/char": round(
            ngram_bits(x_train, x_test, n, cfg["symbols"]), 3
        )
        for n in (1, 2, 3)
    }
    symbols, _ = sample(model, jnp.zeros(cfg["sample"], jnp.int32), key=jr.key(1))
    decode = {i: c for c, i in vocab.items()}
    text = "".join(decode.get(int(i), "~") for i in symbols)
    print(f"sampled text:\n{text}")
    save_summary(
        "chmm_text",
        {
            "clones": sum(n_clones),
            "training bits/char": round(train_bits, 3),
            "CHMM held-out bits/char": round(test_bits, 3),
            **baselines,
            "streaming EM seconds": round(seconds, 1),
        },
    )


if __name__ == "__main__":
    main()
