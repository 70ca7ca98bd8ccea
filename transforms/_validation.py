"""The argument checks of every public entry point, in one place.

Every check names the function, the argument, what was expected and what was got:
`"<function>: `<argument>` must be <expected>, got <actual>."`. Value checks on
arrays run eagerly (a `ValueError` at the call) when the array is concrete, and as an
`eqx.error_if` on the returned array when it is traced, so that they also stop a
compiled function: the caller must use the returned value.

Scalar range checks are written `not low <= value` rather than `value < low` so
that NaN, which compares false with everything, fails them.
"""

import functools
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from beartype import beartype
from jax.core import Tracer
from jaxtyping import jaxtyped, TypeCheckError


_REPR_LIMIT = 60


def is_traced(x: Any) -> bool:
    """Whether `x` is a tracer (inside `jit`, `grad`, `vmap`), i.e. has no value yet."""
    return isinstance(x, Tracer)


def is_concrete(*trees: Any) -> bool:
    """Whether no leaf of `trees` is traced: an eager call, whose arrays have values
    that can be checked at once."""
    return not any(is_traced(leaf) for leaf in jax.tree.leaves(trees))


def checked_eagerly(precheck: Callable) -> Callable[[Callable], Callable]:
    """Run `precheck(*args, **kwargs)` before a compiled entry point when every
    argument is concrete.

    Inside a compiled function every argument is traced, so its value checks can
    only be `eqx.error_if`s, which an eager caller would meet as an
    `EquinoxRuntimeError` (or, on some backends, an XLA error wrapping it). Called
    with concrete arrays, the entry point runs the same checks first, in NumPy,
    and a bad value raises the plain `ValueError` at the call. Under an outer
    `jit` (or `vmap`, `grad`) the precheck is skipped and the compiled checks
    guard the result. The precheck costs one device-to-host copy of the checked
    arrays per eager call.

    Put it above `eqx.filter_jit`; `precheck` takes the entry point's arguments.
    """

    def decorate(compiled: Callable) -> Callable:
        @functools.wraps(compiled)
        def entry(*args, **kwargs):
            if is_concrete(args, kwargs):
                precheck(*args, **kwargs)
            return compiled(*args, **kwargs)

        return entry

    return decorate


def describe(value: Any) -> str:
    """A short description of a value for an error message: small values in full,
    arrays by dtype and shape, anything else by type (never a whole pytree)."""
    if is_traced(value):
        return f"a traced array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (np.ndarray, jax.Array)):
        if value.size <= 6:
            return f"{np.asarray(value).tolist()!r} ({value.dtype})"
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    if value is None or isinstance(value, (bool, numbers.Number, np.generic, str)):
        text = repr(value)
        return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"an object of type {type(value).__name__}"


def fail(
    fn: str, arg: str, expected: str, got: str, error: type[Exception] = ValueError
) -> Exception:
    """The error `"<fn>: `<arg>` must be <expected>, got <got>."` (to raise)."""
    return error(f"{fn}: `{arg}` must be {expected}, got {got}.")


def check_type(fn: str, arg: str, value: Any, types, expected: str) -> Any:
    """Raise a `TypeError` unless `isinstance(value, types)`; returns `value`.

    **Raises:**

    `TypeError` naming `arg`, `expected` (a phrase: `"a TaskConfig"`) and what was
    got.
    """
    if not isinstance(value, types):
        raise fail(fn, arg, expected, describe(value), TypeError)
    return value


def check_optimizer(fn: str, arg: str, value: Any) -> Any:
    """Raise a `TypeError` unless `value` is an optax optimiser; returns it.

    **Raises:**

    `TypeError` for a value that is not an `optax.GradientTransformation`.
    """
    return check_type(
        fn, arg, value, optax.GradientTransformation, "an optax.GradientTransformation"
    )


def check_callable(fn: str, arg: str, value: Any) -> Any:
    """Raise a `TypeError` unless `value` is callable; returns it.

    **Raises:**

    `TypeError` for a value that is not callable.
    """
    if not callable(value):
        raise fail(fn, arg, "callable", describe(value), TypeError)
    return value


def check_choice(fn: str, arg: str, value: Any, choices: Sequence) -> Any:
    """Raise a `ValueError` unless `value` is one of `choices`; returns it.

    **Raises:**

    `ValueError` for another value, an array, or a bool where the choices are not
    bools (`True == 1` is not taken as a match).
    """
    # `value in choices` would compare an array elementwise, or find `1 == True`.
    if isinstance(value, (np.ndarray, jax.Array)) or not any(
        isinstance(value, bool) == isinstance(c, bool) and value == c for c in choices
    ):
        raise fail(fn, arg, f"one of {tuple(choices)}", describe(value))
    return value


def check_bool(fn: str, arg: str, value: Any) -> bool:
    """Raise a `TypeError` unless `value` is a Python or NumPy bool; returns it.

    **Raises:**

    `TypeError` for anything else, `0` and `1` included.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise fail(fn, arg, "a bool", describe(value), TypeError)
    return bool(value)


def _interval(low, high, inclusive: tuple[bool, bool]) -> str:
    if low is not None and high is not None:
        left = "[" if inclusive[0] else "("
        right = "]" if inclusive[1] else ")"
        return f"in {left}{low}, {high}{right}"
    if low is not None:
        return (">= " if inclusive[0] else "> ") + str(low)
    if high is not None:
        return ("<= " if inclusive[1] else "< ") + str(high)
    return ""


def check_size(
    fn: str, arg: str, value: Any, *, minimum: int = 1, maximum: int | None = None
) -> int:
    """A concrete integer in `[minimum, maximum]` (a size, a count, an index bound).

    Rejects `bool`, floats (even `3.0`), strings and traced values with a
    `TypeError`, and values out of range with a `ValueError`.

    **Returns:**

    `value` as a Python `int`.
    """
    bounds = _interval(minimum, maximum, (True, True))
    expected = (
        "a positive integer"
        if minimum == 1 and maximum is None
        else f"an integer {bounds}"
    )
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, (np.ndarray, jax.Array))
        and value.ndim == 0
        and jnp.issubdtype(value.dtype, jnp.integer)
    )
    if isinstance(value, (bool, np.bool_)) or not integral or is_traced(value):
        raise fail(fn, arg, expected, describe(value), TypeError)
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        raise fail(fn, arg, expected, repr(number))
    return number


def _numeric(fn: str, arg: str, value: Any, expected: str) -> Any:
    """`value` itself if it is a real number or real array; else `TypeError`."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise fail(fn, arg, expected, describe(value), TypeError)
    if not isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array)):
        raise fail(fn, arg, expected, describe(value), TypeError)
    # A Python number has no dtype; NumPy gives it its default one.
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        dtype = np.asarray(value).dtype
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise fail(fn, arg, expected, describe(value), TypeError)
    return value


class Checks:
    """Run-time checks collected while tracing, raised by one
    `eqx.branched_error_if` on the outputs.

    Pass it as `checks=` to the checks of this module: inside compiled code they
    add their predicate here instead of guarding their input with an `eqx.error_if`
    of their own, so that a function with many checks pays for one device-to-host
    synchronisation, not one per check. Guarding the outputs makes sure the checks
    run before any result can be used. Concrete inputs are still checked at once.
    """

    def __init__(self):
        self.predicates: list = []
        self.messages: list[str] = []

    def add(self, predicate, message: str) -> None:
        """Fail with `message` at run time where `predicate` holds anywhere."""
        self.predicates.append(jnp.any(predicate))
        self.messages.append(message)

    def guard(self, out):
        """`out`, threaded through the collected checks."""
        if not self.predicates:
            return out
        failed = jnp.stack(self.predicates)
        return eqx.branched_error_if(
            out, jnp.any(failed), jnp.argmax(failed), self.messages
        )


def _run_time(x, predicate, message: str, checks: Checks | None):
    """`x` guarded by `predicate`, or the check deferred to `checks`."""
    if checks is not None:
        checks.add(predicate, message)
        return x
    return eqx.error_if(x, predicate, message)


def _check_values(
    fn: str,
    arg: str,
    x: Any,
    bad: Callable,
    expected: str,
    got: Callable,
    checks: Checks | None = None,
) -> Any:
    """Apply `bad(xp, values) -> bool mask` eagerly (NumPy) or in the trace (jnp).

    Concrete input: raise `ValueError` with `got(values, mask)` naming an offending
    value, else return `x` untouched. Traced input: return `x` threaded through an
    `eqx.error_if` on the same mask (or deferred to `checks`).
    """
    if is_traced(x):
        return _run_time(
            x,
            jnp.any(bad(jnp, x)),
            f"{fn}: `{arg}` must be {expected}, got an entry that is not (checked at "
            "run time).",
            checks,
        )
    values = np.asarray(x)
    mask = np.asarray(bad(np, values))
    if np.any(mask):
        raise fail(fn, arg, expected, got(values, mask))
    return x


def _first_bad(values: np.ndarray, mask: np.ndarray) -> str:
    if values.ndim == 0:
        return repr(values.item())
    index = tuple(int(i) for i in np.argwhere(mask)[0])
    if mask.ndim != values.ndim:
        return f"a bad entry at index {index}"
    return f"{values[index].item()!r} at index {index}"


def check_in_range(
    fn: str,
    arg: str,
    value: Any,
    *,
    low: float | int | None = None,
    high: float | int | None = None,
    inclusive: tuple[bool, bool] = (True, True),
    finite: bool = True,
    checks: Checks | None = None,
) -> Any:
    """A real number (or every entry of a real array) within bounds, never NaN.

    **Arguments:**

    - `fn`, `arg`: the function and argument, for the message.
    - `value`: a Python number, a NumPy or JAX scalar or array.
    - `low`, `high`: the bounds, `None` for none.
    - `inclusive`: whether each bound is allowed.
    - `finite`: also reject `±inf` (on by default).
    - `checks`: a `Checks` to defer the run-time check to, inside compiled code.

    **Returns:**

    `value` itself (an `eqx.error_if`-guarded array when traced).

    **Raises:**

    `TypeError` for a bool, a string or a non-real value; `ValueError` for NaN, an
    infinite value (with `finite`) or a value outside the bounds.
    """
    bounds = _interval(low, high, inclusive)
    if np.ndim(value) == 0:
        words = ["a", "finite" if finite else "", "real number", bounds]
        expected = " ".join(w for w in words if w)
    elif finite:
        expected = "all finite (no NaN or inf)" + (f" and {bounds}" if bounds else "")
    else:
        expected = f"all {bounds} (no NaN)" if bounds else "free of NaN"
    _numeric(fn, arg, value, expected)

    def bad(xp, v):
        ok = ~xp.isnan(v)
        if finite:
            ok = ok & xp.isfinite(v)
        if low is not None:
            ok = ok & ((v >= low) if inclusive[0] else (v > low))
        if high is not None:
            ok = ok & ((v <= high) if inclusive[1] else (v < high))
        return ~ok

    if isinstance(value, numbers.Real) and not isinstance(value, np.generic):
        # A Python number is compared as it is (an int beyond float64's range
        # included) and returned untouched.
        number: Any = value
        ok = number == number and (not finite or abs(number) != math.inf)
        if low is not None:
            ok = ok and (number >= low if inclusive[0] else number > low)
        if high is not None:
            ok = ok and (number <= high if inclusive[1] else number < high)
        if not ok:
            raise fail(fn, arg, expected, repr(value))
        return value
    return _check_values(fn, arg, value, bad, expected, _first_bad, checks)


def check_interval(
    fn: str,
    arg: str,
    value: Any,
    *,
    low: float | int | None = None,
    high: float | int | None = None,
    inclusive: tuple[bool, bool] = (True, True),
) -> tuple:
    """A `(low, high)` pair of finite numbers within bounds, with `low <= high`.

    **Returns:**

    `value` as a tuple.

    **Raises:**

    `TypeError` unless `value` is a pair of real numbers; `ValueError` for an entry
    out of bounds or NaN, or `low > high`.
    """
    bounds = _interval(low, high, inclusive)
    expected = f"a (low, high) pair with low <= high, both finite {bounds}".strip()
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise fail(fn, arg, expected, describe(value), TypeError)
    for i, end in enumerate(value):
        check_in_range(fn, f"{arg}[{i}]", end, low=low, high=high, inclusive=inclusive)
    if not value[0] <= value[1]:
        raise fail(fn, arg, expected, repr(tuple(value)))
    return tuple(value)


def check_finite(fn: str, arg: str, x: Any, *, checks: Checks | None = None) -> Any:
    """Every entry of `x` finite (no NaN, no `±inf`); see `check_in_range`.

    **Raises:**

    `TypeError` for a value that is not a real number or array; `ValueError` for a
    non-finite entry (when traced: at run time, by `eqx.error_if`).
    """
    return check_in_range(fn, arg, x, checks=checks)


def check_ids(
    fn: str,
    arg: str,
    ids: Any,
    upper: int,
    *,
    low: int = 0,
    where: Any = None,
    checks: Checks | None = None,
    upper_name: str | None = None,
) -> Any:
    """Integer ids within `[low, upper)` (at the positions selected by `where`).

    Eager for concrete arrays (the message names the first offending id and its
    position); inside compiled code an `eqx.error_if` rides on a zero added to the
    ids, so that the ids keep their sharding (or the check is deferred to
    `checks`, a `Checks`). `upper_name` names the bound in the message
    (`"n_obs"`).

    **Returns:**

    `ids` (guarded when traced).

    **Raises:**

    `TypeError` for a non-integer array; `ValueError` for an id out of range.
    """
    dtype = ids.dtype if hasattr(ids, "dtype") else np.asarray(ids).dtype
    expected = f"integer ids in [{low}, {upper})"
    if upper_name is not None:
        expected = f"integer ids in [{low}, {upper_name}) = [{low}, {upper})"
    if not jnp.issubdtype(dtype, jnp.integer) or isinstance(ids, (bool, np.bool_)):
        raise fail(fn, arg, expected, describe(ids), TypeError)

    def bad(xp, v):
        outside = (v < low) | (v >= upper)
        return outside if where is None else outside & xp.asarray(where)

    if is_traced(ids) or is_traced(where):
        ids = jnp.asarray(ids)
        message = (
            f"{fn}: `{arg}` must be {expected}, got an id that is not (checked at run "
            "time)."
        )
        if checks is not None:
            checks.add(bad(jnp, ids), message)
            return ids
        zero = jnp.zeros((), ids.dtype)
        return ids + eqx.error_if(zero, jnp.any(bad(jnp, ids)), message)
    values = np.asarray(ids)
    mask = np.asarray(bad(np, values))
    if np.any(mask):
        raise fail(fn, arg, expected, _first_bad(values, mask))
    return ids


def check_sorted(
    fn: str,
    arg: str,
    x: Any,
    *,
    strict: bool = False,
    axis: int = -1,
    checks: Checks | None = None,
) -> Any:
    """Entries non-decreasing (or, with `strict`, increasing) along `axis`, and
    finite.

    **Returns:**

    `x` (guarded when traced).

    **Raises:**

    `ValueError` for an unsorted or non-finite grid.
    """
    x = check_finite(fn, arg, x, checks=checks)
    expected = ("increasing" if strict else "non-decreasing") + f" along axis {axis}"

    def bad(xp, v):
        step = xp.diff(v, axis=axis)
        return (step <= 0) if strict else (step < 0)

    def got(values, mask):
        index = tuple(int(i) for i in np.argwhere(mask)[0])
        following = list(index)
        following[axis] += 1
        return (
            f"{values[index].item()!r} followed by "
            f"{values[tuple(following)].item()!r} at index {index}"
        )

    return _check_values(fn, arg, x, bad, expected, got, checks)


def stochastic_tolerance(dtype) -> float:
    """The tolerance on the sum of a distribution of `dtype`: `sqrt(eps)`.

    Rows normalised in floating point sum to 1 within a few ulps times their length;
    the square root of the machine epsilon (3.5e-4 in float32, 1.5e-8 in float64)
    leaves room for that and still catches unnormalised input.
    """
    return float(np.sqrt(np.finfo(dtype).eps))


def check_probabilities(
    fn: str,
    arg: str,
    p: Any,
    *,
    axis: int = -1,
    log: bool = False,
    allow_zero: bool = False,
    tol: float | None = None,
    where: Any = None,
    checks: Checks | None = None,
) -> Any:
    """Distributions along `axis`: a probability vector, a stochastic matrix (rows
    along the last axis), or any stack of them.

    Entries must be non-negative and finite (with `log`, log-probabilities: no NaN,
    no `+inf`; `-inf` is a zero probability), and each distribution must sum to 1
    within `tol` (default `stochastic_tolerance` of the dtype).

    **Arguments:**

    - `fn`, `arg`: for the message.
    - `p`: a floating array.
    - `axis`: the axis holding each distribution.
    - `log`: `p` holds log-probabilities.
    - `allow_zero`: a distribution of all zeros is allowed (a row of a transition
        matrix for a state never left).
    - `tol`: the tolerance on the sums.
    - `where`: a boolean mask over the distributions (the shape of `p` without
        `axis`); unselected ones are not checked.
    - `checks`: a `Checks` to defer the run-time check to, inside compiled code.

    **Returns:**

    `p` (guarded when traced).

    **Raises:**

    `TypeError` for a non-floating array; `ValueError` for a negative or non-finite
    entry or a sum away from 1.
    """
    dtype = p.dtype if hasattr(p, "dtype") else np.asarray(p).dtype
    kind = "log-probabilities" if log else "probabilities"
    if not jnp.issubdtype(dtype, jnp.floating):
        raise fail(fn, arg, f"floating-point {kind}", describe(p), TypeError)
    tol = stochastic_tolerance(dtype) if tol is None else tol
    zero = " (or all zero)" if allow_zero else ""
    expected = (
        f"{kind} along axis {axis} whose "
        + ("exponentials sum" if log else "entries sum")
        + f" to 1{zero} within {tol:.2g}"
    )

    def entry_bad(xp, v):
        bad = (xp.isnan(v) | (v == xp.inf)) if log else (~xp.isfinite(v) | (v < 0))
        if where is None:
            return bad
        return bad & xp.expand_dims(xp.asarray(where), axis)

    def sums(xp, v):
        probs = xp.exp(v) if log else v
        if xp is np:
            probs = probs.astype(np.float64)
        return xp.sum(xp.where(entry_bad(xp, v), 0, probs), axis=axis)

    def sum_bad(xp, total):
        bad = xp.abs(total - 1) > tol
        if allow_zero:
            bad = bad & (total != 0)
        return bad if where is None else bad & xp.asarray(where)

    if is_traced(p) or is_traced(where):
        return _run_time(
            p,
            jnp.any(entry_bad(jnp, p)) | jnp.any(sum_bad(jnp, sums(jnp, p))),
            f"{fn}: `{arg}` must be {expected}, got some that are not (checked at "
            "run time).",
            checks,
        )
    values = np.asarray(p)
    if values.ndim == 0 or not -values.ndim <= axis < values.ndim:
        raise fail(fn, arg, f"an array with an axis {axis}", describe(p))
    entries = entry_bad(np, values)
    if np.any(entries):
        raise fail(fn, arg, expected, "an entry " + _first_bad(values, entries))
    total = sums(np, values)
    wrong = sum_bad(np, total)
    if np.any(wrong):
        index = tuple(int(i) for i in np.argwhere(wrong)[0])
        where = f" at index {index}" if index else ""
        raise fail(fn, arg, expected, f"a sum of {total[index].item()!r}{where}")
    return p


_PARAMETER = re.compile(r"parameter '(\w+)'")
_ACTUAL = re.compile(r"^Actual value: (.*)$", re.M)
_EXPECTED = re.compile(r"^Expected type: (.*)\.$", re.M)
_FUNCTION = re.compile(r"checking the parameters of ([\w.<>]+)\.")


def _short_type(text: str) -> str:
    text = re.sub(r"<class '([^']*(?:'[^']*')?[^']*)'>", r"\1", text)
    text = text.replace("jaxlib._jax.Array", "Array").replace("jax.Array", "Array")
    return re.sub(r"\b(?:[a-z_]\w*\.)+([A-Z]\w*)", r"\1", text)


def concise_type_error(error: TypeCheckError) -> TypeCheckError | None:
    """jaxtyping's report of a bad argument, as `"<fn>: `<arg>` must be <type>, got
    <value>."` (the axis sizes bound so far appended); `None` if the report is not
    about one argument."""
    text = str(error)
    function, parameter = _FUNCTION.search(text), _PARAMETER.search(text)
    actual, expected = _ACTUAL.search(text), _EXPECTED.search(text)
    if not (function and parameter and actual and expected):
        return None
    # `eqx_models.chmm._model.CHMM.random` -> `CHMM.random`: what follows the
    # private module, as the library's own messages name it.
    parts = function.group(1).split(".")
    private = [
        i for i, part in enumerate(parts) if part.startswith("_") and part[1] != "_"
    ]
    if private and private[-1] + 1 < len(parts):
        parts = parts[private[-1] + 1 :]
    else:
        parts = parts[-2:] if parts[-1].startswith("__") else parts[-1:]
    name = ".".join(parts).removesuffix(".__call__")
    got = actual.group(1)
    if len(got) > 2 * _REPR_LIMIT:
        got = got[: 2 * _REPR_LIMIT] + "..."
    message = (
        f"{name}: `{parameter.group(1)}` must be {_short_type(expected.group(1))}, "
        f"got {got}."
    )
    axes = text.split("jaxtyping axis annotation are as follows.", 1)
    if len(axes) == 2 and axes[1].strip():
        sizes = ", ".join(axes[1].split())
        message += f" (Axis sizes bound by the other arguments: {sizes}.)"
    return TypeCheckError(message)


def typechecked(fn: Callable) -> Callable:
    """`jaxtyped(typechecker=beartype)` whose errors about an argument read like the
    library's own: function, argument, expected type, actual value, without the dump
    of every argument (a whole model) that jaxtyping appends.

    The error is still a `jaxtyping.TypeCheckError` (a `TypeError`).
    """
    checked = jaxtyped(typechecker=beartype)(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return checked(*args, **kwargs)
        except TypeCheckError as error:
            short = concise_type_error(error)
            if short is None:
                raise
            raise short from None

    return wrapper
