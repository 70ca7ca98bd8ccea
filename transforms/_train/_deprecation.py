"""Old public names kept for one release, with a warning naming the new one.

Why a module of its own: both packages rename public names the same way (a module
`__getattr__` that serves the old name and warns), and the wording is written once.
"""

import warnings
from collections.abc import Callable, Mapping
from typing import Any


def deprecated_aliases(
    module: str, aliases: Mapping[str, tuple[str, Any]]
) -> Callable[[str], Any]:
    """A module-level `__getattr__` serving renamed objects under their old names.

    **Arguments:**

    - `module`: the public module's name, e.g. `"eqx_models.tidhy"`.
    - `aliases`: `{old_name: (new_name, object)}`.

    **Returns:**

    The `__getattr__` function: looking up an old name returns the object and emits
    a `DeprecationWarning` naming its new name; any other unknown name raises
    `AttributeError`. Old names stay out of `dir(module)` and the API pages.
    """

    def __getattr__(name: str) -> Any:
        if name in aliases:
            new, value = aliases[name]
            warnings.warn(
                f"{module}.{name} is deprecated and will be removed in the next "
                f"release; use {module}.{new}.",
                DeprecationWarning,
                stacklevel=2,
            )
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
