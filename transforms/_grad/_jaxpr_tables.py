"""The jaxpr primitives the ghost engines treat specially, by name, in one place.

The plan (`_ghost_plan.py`) follows a parameter through them to its uses and the
evaluator (`_ghost_eval.py`) replays the same equations, so both must agree on
which primitives relabel a value, keep it, or wrap a sub-jaxpr to inline. JAX
renames primitives between releases (e.g. `remat2`, `pjit` vs `jit`); a new name is
added here once.
"""

# Ops that only relabel a parameter (dtype, axis order, shape) before it is used: the
# parameter's uses are looked for through them.
RELABEL = frozenset(
    {
        "convert_element_type",
        "transpose",
        "reshape",
        "squeeze",
        "copy",
        "copy_p",
        "rev",
        "reduce_precision",
    }
)
# Relabellings that keep the value of every element (a convert changes its dtype only):
# the validation gradient goes through them unchanged.
VALUE_KEEPING = frozenset(
    {"convert_element_type", "reduce_precision", "copy", "copy_p"}
)
INLINE_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
REMAT = frozenset({"remat2", "checkpoint", "remat"})
