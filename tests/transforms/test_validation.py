"""The validation module: every check eagerly on concrete values, inside `jit` by
`eqx.error_if`, and the message form `"<fn>: `<arg>` must be <expected>, got <x>."`."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from jaxtyping import Array, Float, Int, TypeCheckError

from transforms.validation import (
    check_bool,
    check_callable,
    check_choice,
    check_finite,
    check_ids,
    check_in_range,
    check_interval,
    check_probabilities,
    check_size,
    check_sorted,
    check_type,
    checked_eagerly,
    Checks,
    describe,
    is_concrete,
    stochastic_tolerance,
    typechecked,
)


# The form every message takes; the expected part may itself hold punctuation.
_FORM = re.compile(r"^f: `x` must be .+, got .+\.$", re.S)


def _message(call) -> tuple[type, str]:
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    return info.type, str(info.value)


def _run_time_message(fn, *args) -> str:
    with pytest.raises(eqx.EquinoxRuntimeError) as info:
        jax.block_until_ready(eqx.filter_jit(fn)(*args))
    return str(info.value)


@pytest.mark.parametrize(
    "value, kwargs",
    [
        (float("nan"), {}),
        (float("inf"), {}),
        (-1.0, dict(low=0)),
        (0.0, dict(low=0, inclusive=(False, True))),
        (1.0, dict(low=0, high=1, inclusive=(True, False))),
        (np.float32("nan"), dict(low=0, finite=False)),
        (jnp.asarray(2.0), dict(high=1)),
    ],
)
def test_in_range_rejects_nan_and_out_of_range(value, kwargs):
    error, message = _message(lambda: check_in_range("f", "x", value, **kwargs))
    assert error is ValueError
    assert _FORM.match(message), message


@pytest.mark.parametrize("value", [True, "0.5", None, [0.5], 1 + 2j])
def test_in_range_rejects_non_numbers_with_a_type_error(value):
    error, message = _message(lambda: check_in_range("f", "x", value, low=0))
    assert error is TypeError and _FORM.match(message), message


def test_in_range_returns_valid_values_untouched():
    assert check_in_range("f", "x", 0.5, low=0, high=1) == 0.5
    x = jnp.arange(3.0)
    assert check_in_range("f", "x", x, low=0) is x
    assert check_in_range("f", "x", float("inf"), low=0, finite=False) == float("inf")


def test_in_range_checks_every_entry_and_names_the_first_bad_one():
    _, message = _message(
        lambda: check_finite("f", "x", jnp.array([[1.0, 2.0], [jnp.nan, 3.0]]))
    )
    assert "got nan at index (1, 0)" in message


def test_in_range_inside_jit_and_vmap():
    fn = lambda x: check_in_range("f", "x", x, low=0)
    np.testing.assert_array_equal(eqx.filter_jit(fn)(jnp.arange(3.0)), [0, 1, 2])
    assert "f: `x` must be all finite" in _run_time_message(fn, jnp.array([1.0, -1]))
    with pytest.raises(eqx.EquinoxRuntimeError, match="f: `x` must be"):
        jax.vmap(eqx.filter_jit(fn))(jnp.array([1.0, jnp.nan]))
    # The check is the identity for the gradient.
    grad = jax.grad(lambda x: jnp.sum(fn(x) ** 2))(jnp.array([1.0, 2.0]))
    np.testing.assert_array_equal(grad, [2.0, 4.0])


@pytest.mark.parametrize(
    "value, error",
    [(True, TypeError), (3.0, TypeError), ("3", TypeError), (0, ValueError)],
)
def test_size_rejects_bools_floats_strings_and_zero(value, error):
    got, message = _message(lambda: check_size("f", "x", value))
    assert got is error and _FORM.match(message), message
    assert "a positive integer" in message


def test_size_accepts_numpy_and_concrete_jax_integers():
    assert check_size("f", "x", np.int64(3)) == 3
    assert check_size("f", "x", jnp.int32(4)) == 4
    assert check_size("f", "x", 0, minimum=0) == 0
    with pytest.raises(ValueError, match=r"an integer in \[1, 5\], got 6"):
        check_size("f", "x", 6, maximum=5)
    with pytest.raises(TypeError, match="got a traced array"):
        jax.jit(lambda n: check_size("f", "x", n))(3)


def test_choice_type_callable_bool():
    with pytest.raises(ValueError, match=r"f: `x` must be one of \('a', 'b'\)"):
        check_choice("f", "x", "c", ("a", "b"))
    # `1 == True` must not make 1 a valid choice among booleans.
    with pytest.raises(ValueError):
        check_choice("f", "x", 1, (True, False))
    with pytest.raises(ValueError):
        check_choice("f", "x", np.array(["a"]), ("a", "b"))
    assert check_choice("f", "x", "b", ("a", "b")) == "b"
    with pytest.raises(TypeError, match="f: `x` must be callable, got 3"):
        check_callable("f", "x", 3)
    with pytest.raises(TypeError, match="f: `x` must be a bool, got 'yes'"):
        check_bool("f", "x", "yes")
    with pytest.raises(TypeError, match="f: `x` must be a tuple, got 'ab'"):
        check_type("f", "x", "ab", tuple, "a tuple")


def test_interval():
    assert check_interval("f", "x", [0.1, 0.2], low=0) == (0.1, 0.2)
    with pytest.raises(ValueError, match=r"f: `x` must be a \(low, high\) pair"):
        check_interval("f", "x", (0.3, 0.2))
    with pytest.raises(ValueError, match=r"f: `x\[1\]` must be a finite"):
        check_interval("f", "x", (0.1, float("nan")))
    with pytest.raises(TypeError, match=r"f: `x` must be a \(low, high\) pair"):
        check_interval("f", "x", 0.5)


def test_ids_eager_jit_and_masked():
    ids = jnp.array([0, 2, 3])
    with pytest.raises(ValueError, match=r"ids in \[0, 3\), got 3 at index \(2,\)"):
        check_ids("f", "x", ids, 3)
    with pytest.raises(ValueError, match=r"ids in \[0, n\) = \[0, 3\), got -1"):
        check_ids("f", "x", jnp.array([-1]), 3, upper_name="n")
    # Unselected positions may hold anything (padding).
    assert check_ids("f", "x", ids, 3, where=jnp.array([True, True, False])) is ids
    with pytest.raises(TypeError, match="integer ids"):
        check_ids("f", "x", jnp.array([0.0]), 3)
    with pytest.raises(TypeError, match="integer ids"):
        check_ids("f", "x", True, 3)
    fn = lambda ids: check_ids("f", "x", ids, 3)
    np.testing.assert_array_equal(eqx.filter_jit(fn)(jnp.array([0, 2])), [0, 2])
    assert "f: `x` must be integer ids in [0, 3)" in _run_time_message(fn, ids)


def test_sorted():
    assert check_sorted("f", "x", jnp.array([0.0, 0.0, 1.0])) is not None
    with pytest.raises(ValueError, match="non-decreasing .* got 2.0 followed by 1.0"):
        check_sorted("f", "x", jnp.array([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="increasing along axis -1, got 0.0 followed"):
        check_sorted("f", "x", jnp.array([0.0, 0.0]), strict=True)
    with pytest.raises(ValueError, match="all finite"):
        check_sorted("f", "x", jnp.array([0.0, jnp.nan]))
    fn = lambda x: check_sorted("f", "x", x)
    assert "non-decreasing" in _run_time_message(fn, jnp.array([1.0, 0.0]))


@given(
    st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6),
    st.floats(1.01, 10.0) | st.floats(0.0, 0.99),
)
def test_probabilities_reject_unnormalised_rows(raw, factor):
    p = np.asarray(raw) / np.sum(raw)
    check_probabilities("f", "x", jnp.asarray(p, jnp.float32))
    check_probabilities("f", "x", jnp.log(jnp.asarray(p, jnp.float32)), log=True)
    with pytest.raises(ValueError, match=r"f: `x` must be probabilities .* got a sum"):
        check_probabilities("f", "x", jnp.asarray(factor * p, jnp.float32))
    with pytest.raises(ValueError, match=r"`x` must be log-probabilities .* got a sum"):
        check_probabilities("f", "x", jnp.log(factor * p), log=True)


def test_probabilities_entries_zero_rows_mask_and_tolerance():
    with pytest.raises(ValueError, match="got an entry -0.5 at index"):
        check_probabilities("f", "x", jnp.array([1.5, -0.5]))
    with pytest.raises(ValueError, match="got an entry nan"):
        check_probabilities("f", "x", jnp.array([jnp.nan, 1.0]))
    with pytest.raises(ValueError, match="got an entry inf"):
        check_probabilities("f", "x", jnp.array([jnp.inf, 0.0]), log=True)
    rows = jnp.array([[0.5, 0.5], [0.0, 0.0]])
    check_probabilities("f", "x", rows, allow_zero=True)
    with pytest.raises(ValueError, match=r"a sum of 0.0 at index \(1,\)"):
        check_probabilities("f", "x", rows)
    check_probabilities("f", "x", rows, where=jnp.array([True, False]))
    # The stated tolerance: sqrt(eps) of the dtype.
    assert stochastic_tolerance(jnp.float32) == pytest.approx(3.4527e-4, rel=1e-3)
    tol = stochastic_tolerance(jnp.float32)
    check_probabilities("f", "x", jnp.array([0.5, 0.5 + 0.5 * tol]))
    with pytest.raises(ValueError, match="within 0.00035"):
        check_probabilities("f", "x", jnp.array([0.5, 0.5 + 2 * tol]))
    with pytest.raises(TypeError, match="floating-point probabilities"):
        check_probabilities("f", "x", jnp.array([1, 0]))
    fn = lambda p: check_probabilities("f", "x", p)
    assert "f: `x` must be probabilities" in _run_time_message(fn, 2 * rows[:1])


def test_deferred_checks_raise_the_first_failing_message():
    def fn(ids, p):
        checks = Checks()
        ids = check_ids("f", "ids", ids, 3, checks=checks)
        p = check_probabilities("f", "p", p, checks=checks)
        return checks.guard((ids, p))

    good = (jnp.array([0, 1]), jnp.array([0.5, 0.5]))
    eqx.filter_jit(fn)(*good)
    assert "`p` must be probabilities" in _run_time_message(
        fn, good[0], jnp.array([1.0, 1.0])
    )
    assert "`ids` must be integer ids" in _run_time_message(
        fn, jnp.array([5, 0]), jnp.array([1.0, 1.0])
    )
    # Concrete inputs are still checked at once.
    with pytest.raises(ValueError, match="`ids` must be integer ids"):
        fn(jnp.array([5, 0]), good[1])


def test_describe_never_prints_a_pytree():
    model = eqx.nn.MLP(2, 2, 8, 2, key=jax.random.key(0))
    assert describe(model) == "an object of type MLP"
    assert (
        describe(jnp.zeros((100, 3))) == "an array of shape (100, 3) and dtype float32"
    )
    assert describe({"a": 1, "b": 2}) == "a dict of 2 items"
    assert len(describe("x" * 500)) <= 60


@typechecked
def _annotated(x: Float[Array, " n"], ids: Int[Array, " n"], model: eqx.nn.Linear):
    return x


def test_typechecked_errors_name_the_argument_without_the_pytree():
    model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    with pytest.raises(TypeCheckError) as info:
        _annotated(jnp.ones(3), jnp.ones(4, int), model)
    message = str(info.value)
    assert message.startswith("_annotated: `ids` must be Int[Array, 'n'], got i32[4].")
    assert "n=3" in message and "Linear(" not in message
    with pytest.raises(TypeCheckError, match="_annotated: `model` must be Linear"):
        _annotated(jnp.ones(3), jnp.ones(3, int), "model")
    # A valid call goes through.
    assert _annotated(jnp.ones(3), jnp.ones(3, int), model).shape == (3,)


def test_checked_eagerly_runs_the_precheck_only_on_concrete_calls():
    seen = []

    def precheck(x, *, scale=1.0):
        seen.append(scale)
        check_in_range("f", "x", x, low=0)

    @checked_eagerly(precheck)
    @eqx.filter_jit
    def f(x, *, scale=1.0):
        return check_in_range("f", "x", x, low=0) * scale

    assert float(f(jnp.asarray(2.0), scale=3.0)) == 6.0 and seen == [3.0]
    # Concrete: the plain error at the call, before the compiled function runs.
    kind, message = _message(lambda: f(jnp.asarray(-1.0)))
    assert kind is ValueError and _FORM.match(message) and "got -1.0" in message
    # Traced (under the caller's jit): no precheck, the compiled check guards.
    seen.clear()
    assert "(checked at run time)" in _run_time_message(
        lambda x: f(x), jnp.asarray(-1.0)
    )
    assert seen == []


def test_is_concrete():
    assert is_concrete(1.0, jnp.ones(2), {"a": np.ones(3)}, None)
    jax.jit(lambda x: assert_traced(x))(jnp.ones(2))


def assert_traced(x):
    assert not is_concrete(jnp.ones(2), [x])
    return x
