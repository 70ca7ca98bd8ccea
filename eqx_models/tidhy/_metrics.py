"""Metrics of the TiDHy experiments: R², fitted linear dynamics and their timescales,
and k-NN decoding of discrete states.

Plain functions of arrays, independent of the model, so that they score TiDHy's
latents, a baseline's features and the ground truth alike.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from transforms.validation import (
    check_finite,
    check_ids,
    check_in_range,
    check_size,
    fail,
    is_traced,
    typechecked,
)


@typechecked
def r2_score(
    y_true: Float[Array, "*batch D"], y_pred: Float[Array, "*batch D"]
) -> Float[Array, ""]:
    """The coefficient of determination, averaged uniformly over features.

    All leading axes are samples: per feature `1 - Σ(y - ŷ)² / Σ(y - ȳ)²`, then the
    mean over the `D` features (scikit-learn's `uniform_average`).

    **Arguments:**

    - `y_true`, `y_pred`: arrays of the same shape `(..., D)`.

    **Returns:**

    A scalar (1 is perfect; 0 is the per-feature mean; it can be negative).

    **Raises:**

    A `TypeError` (from the shape annotations) if the shapes differ.
    """
    y = y_true.reshape(-1, y_true.shape[-1])
    p = y_pred.reshape(-1, y_pred.shape[-1])
    residual = jnp.sum((y - p) ** 2, axis=0)
    total = jnp.sum((y - jnp.mean(y, axis=0)) ** 2, axis=0)
    return jnp.mean(1 - residual / total)


@typechecked
def fit_linear_dynamics(
    z: Float[Array, "*seq T d"], mask: Bool[Array, "*seq T"] | None = None
) -> tuple[Float[Array, "d d"], Float[Array, " d"]]:
    """Least-squares linear dynamics `z_{t+1} ≈ A z_t + c`.

    Uses every transition `t -> t + 1` inside each sequence (leading axes are
    independent sequences, e.g. windows) with both ends selected by `mask`.

    **Arguments:**

    - `z`: states, shape `(..., T, d)`.
    - `mask`: which steps to use, shape `(..., T)`; all by default.

    **Returns:**

    `(A, c)` of shapes `(d, d)` and `(d,)`.

    **Raises:**

    `ValueError` if `T < 2`, if `z` is not finite, or if `mask` selects no
    transition (least squares would return zeros without a word): at once for
    concrete arrays, by `eqx.error_if` under `jit`. A `TypeError` (from the shape
    annotations) if `mask` does not match `z`.
    """
    name = "fit_linear_dynamics"
    if z.shape[-2] < 2:
        raise fail(name, "z", "an array of at least 2 time steps", f"shape {z.shape}")
    z = check_finite(name, "z", z)
    if mask is None:
        mask = jnp.ones(z.shape[:-1], bool)
    else:
        expected = "a selection of at least one transition (two consecutive steps)"
        none = ~jnp.any(mask[..., :-1] & mask[..., 1:])
        if is_traced(none):
            z = eqx.error_if(z, none, f"{name}: `mask` must be {expected}.")
        elif none:
            raise fail(name, "mask", expected, "none")
    d = z.shape[-1]
    current = z[..., :-1, :].reshape(-1, d)
    following = z[..., 1:, :].reshape(-1, d)
    weight = (mask[..., :-1] & mask[..., 1:]).reshape(-1).astype(z.dtype)
    design = jnp.concatenate([current, jnp.ones_like(current[:, :1])], axis=1)
    root = jnp.sqrt(weight)[:, None]
    solution, *_ = jnp.linalg.lstsq(root * design, root * following)
    return solution[:d].T, solution[d]


@typechecked
def timescales(A: Float[Array, "d d"]) -> Float[Array, " d"]:
    """The timescales `τ = 1 / |ln|λ||` of a linear map's eigenvalues, in steps,
    sorted from slowest to fastest.

    **Arguments:**

    - `A`: a square matrix (e.g. from [`eqx_models.tidhy.fit_linear_dynamics`][]).

    **Returns:**

    The `d` timescales, descending (`inf` for `|λ| = 1`).

    **Raises:**

    A `TypeError` (from the shape annotations) if `A` is not square; a
    `ValueError` if it is not finite (at once when concrete, by `eqx.error_if` under
    `jit`).
    """
    A = check_finite("timescales", "A", A)
    modulus = jnp.abs(jnp.linalg.eigvals(A))
    tau = 1.0 / jnp.abs(jnp.log(modulus))
    return -jnp.sort(-tau)


@typechecked
def knn_classify(
    train_x: Float[Array, "N F"],
    train_y: Int[Array, " N"],
    test_x: Float[Array, "M F"],
    *,
    n_classes: int,
    k: int = 3,
    chunk: int = 1024,
) -> Int[Array, " M"]:
    """k-nearest-neighbour classification (Euclidean, majority vote).

    Ties in the vote go to the smallest label (as scikit-learn's
    `KNeighborsClassifier`). Test points are processed `chunk` at a time so memory
    stays `O(chunk N)`.

    **Arguments:**

    - `train_x`, `train_y`: reference points and their labels in `[0, n_classes)`.
    - `test_x`: points to classify.
    - `n_classes`: the number of labels.
    - `k`: the number of neighbours (at most `N`).
    - `chunk`: test points per batch of distance computations.

    **Returns:**

    The predicted labels, shape `(M,)`.

    **Raises:**

    `ValueError` for `k` outside `[1, N]`, a label outside `[0, n_classes)` (a
    one-hot vote would drop it and predict 0), non-finite points, or a
    non-positive `n_classes` or `chunk`: at once for concrete arrays, by
    `eqx.error_if` under `jit`. A `TypeError` (from the shape annotations) for
    inconsistent shapes, or for sizes that are not integers.
    """
    name = "knn_classify"
    n_classes = check_size(name, "n_classes", n_classes)
    k = check_size(name, "k", k, maximum=train_x.shape[0])
    chunk = check_size(name, "chunk", chunk)
    train_y = check_ids(name, "train_y", train_y, n_classes, upper_name="n_classes")
    train_x = check_finite(name, "train_x", train_x)
    test_x = check_finite(name, "test_x", test_x)
    return _knn(train_x, train_y, test_x, n_classes, k, chunk)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _knn(train_x, train_y, test_x, n_classes, k, chunk):
    train_sq = jnp.sum(train_x**2, axis=1)

    def classify(point):
        distance = train_sq - 2 * train_x @ point
        _, index = jax.lax.top_k(-distance, k)
        votes = jnp.sum(jax.nn.one_hot(train_y[index], n_classes), axis=0)
        return jnp.argmax(votes)

    return jax.lax.map(classify, test_x, batch_size=chunk).astype(jnp.int32)


@typechecked
def state_decoding_accuracy(
    features: Float[Array, "N F"],
    labels: Int[Array, " N"],
    *,
    key: PRNGKeyArray,
    n_classes: int,
    k: int = 3,
    train_fraction: float = 0.75,
    block: int = 1,
) -> Float[Array, ""]:
    """Accuracy of decoding discrete states from features with a k-NN classifier.

    Splits the samples at random (`train_fraction` to fit, the rest to test, as the
    paper's 75/25 split) and returns the test accuracy of
    [`eqx_models.tidhy.knn_classify`][].

    Samples of a time series are correlated with their neighbours in time: with
    single samples split at random (`block=1`, the paper's split) a test sample's
    nearest reference points are mostly the steps just before and after it, which
    share its state, so any feature that varies smoothly in time decodes well.
    `block=L` splits whole runs of `L` consecutive samples instead (e.g. the window
    length, for features stacked window by window), which measures whether the
    features carry the state rather than the time.

    **Arguments:**

    - `features`: one feature vector per sample (e.g. `r2` per time step).
    - `labels`: the true discrete state of every sample, in `[0, n_classes)`.
    - `key`: PRNG key for the split.
    - `n_classes`, `k`: as in `knn_classify`.
    - `train_fraction`: the fraction used as reference points (of the samples, or
        of the blocks).
    - `block`: the number of consecutive samples kept together on one side of the
        split; 1 splits single samples. The last `N mod block` samples are not
        used.

    **Returns:**

    The accuracy on the held-out samples, a scalar in [0, 1].

    **Raises:**

    `ValueError` if `train_fraction` is not in `(0, 1)`, `block` is not in
    `[1, N]` or the split leaves either side empty; as
    [`eqx_models.tidhy.knn_classify`][] for the labels and sizes.
    """
    name = "state_decoding_accuracy"
    check_in_range(
        name, "train_fraction", train_fraction, low=0, high=1, inclusive=(False, False)
    )
    labels = check_ids(name, "labels", labels, n_classes, upper_name="n_classes")
    n = features.shape[0]
    check_size(name, "block", block, maximum=n)
    n_blocks = n // block
    n_train = int(round(train_fraction * n_blocks))
    if not 1 <= n_train < n_blocks:
        raise ValueError(
            f"state_decoding_accuracy: `train_fraction`={train_fraction} of {n_blocks} "
            f"{'samples' if block == 1 else f'blocks of {block} samples'} leaves an "
            "empty training or test set."
        )
    runs = jnp.arange(n_blocks * block).reshape(n_blocks, block)
    order = jr.permutation(key, n_blocks)
    train, test = runs[order[:n_train]].ravel(), runs[order[n_train:]].ravel()
    predicted = knn_classify(
        features[train], labels[train], features[test], n_classes=n_classes, k=k
    )
    return jnp.mean((predicted == labels[test]).astype(features.dtype))
