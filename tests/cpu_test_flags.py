"""The XLA flags the test suite compiles with on a CPU, in one place.

`tests/conftest.py` sets them for pytest and its subprocesses; CI sets them for the
example tour: `XLA_FLAGS="$(python tests/cpu_test_flags.py)"`.
"""

import importlib.metadata
import importlib.util
import os
from collections.abc import Mapping


def _cpu_only(environ: Mapping[str, str]) -> bool:
    """Whether JAX will run on the CPU alone here: `JAX_PLATFORMS=cpu`, or no
    accelerator plugin installed (JAX finds them as `jax_plugins` entry points or
    modules, and TPUs through `libtpu`)."""
    if environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return True
    return not (
        importlib.metadata.entry_points(group="jax_plugins")
        or importlib.util.find_spec("jax_plugins")
        or importlib.util.find_spec("libtpu")
    )


def _jaxlib_version() -> tuple[int, ...]:
    release = importlib.metadata.version("jaxlib").split("+")[0]
    return tuple(int(part) for part in release.split(".")[:2] if part.isdigit())


def cpu_test_flags(environ: Mapping[str, str] = os.environ) -> str:
    """`XLA_FLAGS` of `environ` with the suite's CPU settings added, for a process
    with that environment (a subprocess with `JAX_PLATFORMS=cpu` gets them also on
    a machine with an accelerator).

    Most of the suite's time on a CPU is XLA compiling hundreds of small programs
    that then run for milliseconds (every operation run eagerly is a program of its
    own), so two settings that make compiling cheaper save most of its time:

    - LLVM's optimisation level 1 instead of XLA's default 2: most of a compilation
      is LLVM optimising the machine code. (Level 0 is no faster, and there the
      causal model's max-pool gets NaN gradients: JAX's gradient of `jnp.max`
      divides by the number of elements equal to the maximum, and at level 0 the
      fusion that compares them rounds differently from the one that reduced.)
    - XLA's older emitter for fused elementwise code instead of the MLIR fusion
      emitters, where XLA still has it (jaxlib < 0.11; XLA aborts on a flag it does
      not know): it compiles a small program in about two thirds of the time
      (measured: 60 against 90 ms for one eager operation; 55 against 75 s for the
      README's causal example).

    XLA's own optimisations (fusion decisions, layouts, buffer assignment: what the
    memory analyses read) are the same; results can differ from the defaults' in
    the last bits, far inside the float32 tolerances of the tests. On a machine with
    an accelerator nothing is added (the suite compiles as users do), and a flag
    the caller already set is kept.
    """
    current = environ.get("XLA_FLAGS", "").strip()
    if not _cpu_only(environ):
        return current
    flags = {"xla_backend_optimization_level": "1"}
    if _jaxlib_version() < (0, 11):
        flags["xla_cpu_use_fusion_emitters"] = "false"
    added = [
        f"--{name}={value}" for name, value in flags.items() if name not in current
    ]
    return " ".join([current, *added]).strip()


if __name__ == "__main__":
    print(cpu_test_flags())
