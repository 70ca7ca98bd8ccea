"""Argument checks for entry points built on `transforms`.

The checks every public function of `transforms` and `eqx_models` runs on its
arguments, for models and transforms of your own that want the same behaviour. Each
check names the function, the argument, what was expected and what was got, in one
form: `"<function>: `<argument>` must be <expected>, got <actual>."`. Value checks of
arrays run eagerly in NumPy when the array is concrete (a `ValueError` at the call)
and through `eqx.error_if` when it is traced, so that they also stop compiled code.
"""

from ._validation import (
    check_bool as check_bool,
    check_callable as check_callable,
    check_choice as check_choice,
    check_finite as check_finite,
    check_ids as check_ids,
    check_in_range as check_in_range,
    check_interval as check_interval,
    check_optimizer as check_optimizer,
    check_probabilities as check_probabilities,
    check_size as check_size,
    check_sorted as check_sorted,
    check_type as check_type,
    checked_eagerly as checked_eagerly,
    Checks as Checks,
    describe as describe,
    fail as fail,
    is_concrete as is_concrete,
    is_traced as is_traced,
    stochastic_tolerance as stochastic_tolerance,
    typechecked as typechecked,
)
