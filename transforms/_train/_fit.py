"""The training loop: `fit` drives any step over any data for a number of steps.

It owns what a loop adds to a step: the schedule of evaluations and checkpoints,
resume (with the configuration check and the restored data position), the NaN
guard's decision to stop with the last good state, the progress bar and the
history of metrics. The step itself is built in `_train_step.py`.
"""

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
from tqdm.auto import tqdm

from .._grad._fallback import FallbackStep
from .._privacy._accounting import FitPrivacy, PrivacyBudget
from .._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_size,
    check_type,
    describe,
    fail,
)
from ._checkpoint import (
    _json_mapping,
    check_checkpoint_metadata,
    load_checkpoint,
    save_checkpoint,
)
from ._sharded_checkpoint import ShardedCheckpoints
from ._train_step import nonfinite_mask, nonfinite_parts


# The guard for steps that report no `nonfinite` metric: the parameters and the
# optimiser state they return, checked on the device (one scalar comes back).
_state_mask = eqx.filter_jit(
    lambda model, opt_state: nonfinite_mask(0.0, 0.0, model, opt_state)
)


def _watched(finite_metrics: Sequence[str] | None, record: dict) -> tuple[str, ...]:
    """The metrics to keep finite, checked against those the step reports."""
    if finite_metrics is None:
        return ("loss",) if "loss" in record else ()
    unknown = [m for m in finite_metrics if m not in record]
    if unknown:
        raise ValueError(
            f"fit: `finite_metrics` names {unknown}, which the step does not "
            f"report; its metrics are {sorted(record)}."
        )
    return tuple(finite_metrics)


def _alive(tree) -> bool:
    """Whether no array of `tree` was donated (deleted) by a step."""
    return not any(
        isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(tree)
    )


class NonFiniteLossError(FloatingPointError):
    """Training met a non-finite step: its loss, gradient, updated parameters or
    optimiser state, or a watched metric, was NaN or infinite.

    **Attributes:**

    - `step`: the 0-based index of the failing step.
    - `nonfinite`: what was not finite, a tuple of names among `"loss"`,
        `"gradient"`, `"parameters"`, `"optimiser state"` and the watched metrics.
    - `metrics`: the failing step's metrics, as floats.
    - `checkpoint_step`: the step of the last good checkpoint kept on disk, or `None`
        if none was written.
    - `model`, `opt_state`: the last good model and optimiser state, from before
        the failing step (never the non-finite ones); `None` if a step of your own
        donated their buffers.
    """

    def __init__(
        self,
        message: str,
        step: int,
        metrics: dict,
        checkpoint_step,
        *,
        nonfinite: tuple[str, ...] = (),
        model=None,
        opt_state=None,
    ):
        super().__init__(message)
        self.step = step
        self.nonfinite = nonfinite
        self.metrics = metrics
        self.checkpoint_step = checkpoint_step
        self.model = model
        self.opt_state = opt_state


class FitResult(NamedTuple):
    """What [`transforms.fit`][] returns."""

    model: Any
    opt_state: Any
    step: int
    key: Any
    history: list[dict[str, float]]


def _batches(data, start: int) -> Callable[[int], Any]:
    if callable(data):
        return data
    iterator = iter(data)
    for skipped in range(start):
        try:
            next(iterator)
        except StopIteration:
            raise ValueError(
                f"fit: `data` ran out after {skipped} batches while skipping to the "
                f"resumed step {start}."
            ) from None

    def next_batch(i):
        try:
            return next(iterator)
        except StopIteration:
            raise ValueError(f"fit: `data` ran out of batches at step {i}.") from None

    return next_batch


def _inner(step: Callable) -> Any:
    """The step itself, out of a `with_fallback` wrapper."""
    return step.step if isinstance(step, FallbackStep) else step


def _deterministic(step: Callable) -> Callable:
    """`step` compiled for run-to-run determinism, where it has that option."""
    inner: Any = _inner(step)
    if isinstance(inner, eqx.Module) and hasattr(inner, "deterministic"):
        inner = dataclasses.replace(inner, deterministic=True)  # pyright: ignore
        return FallbackStep(inner) if isinstance(step, FallbackStep) else inner
    raise TypeError(
        "fit: `deterministic=True` needs a step with a `deterministic` option, such "
        f"as one from `make_train_step`; got {type(step).__name__}. Build your own "
        "step's compiled function with XLA's `xla_gpu_deterministic_ops` option "
        "instead, and leave `deterministic=False` here."
    )


class _SingleFile:
    """The single-file checkpoint at `path` behind the interface `fit` uses for both
    formats (that of `ShardedCheckpoints`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = path

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def check_metadata(self, expected_metadata, *, caller: str) -> None:
        check_checkpoint_metadata(self.path, expected_metadata, caller=caller)

    def restore(self, *, model, opt_state, key):
        return load_checkpoint(self.path, model=model, opt_state=opt_state, key=key)

    def save(self, step: int, **state) -> None:
        save_checkpoint(self.path, step=step, **state)

    def close(self) -> None:
        pass


_CHECKPOINT_FORMATS = ("auto", "file", "sharded")


def _checkpoints(path, checkpoint_format: str, step: Callable):
    """Where `fit` keeps its checkpoints: one file, or a directory of sharded ones
    (`"auto"`: sharded when the step splits its parameters over a mesh)."""
    if path is None:
        return None
    split = getattr(_inner(step), "parameter_sharding", None) is not None
    if checkpoint_format == "auto":
        checkpoint_format = "sharded" if split else "file"
    if checkpoint_format == "file" and split and jax.process_count() > 1:
        # The file is written from whole arrays, and no process holds another
        # process's shards.
        raise ValueError(
            "fit: `checkpoint_format` must be 'sharded' or 'auto' when the "
            "parameters are split over the devices of several processes (here "
            f"{jax.process_count()}), got 'file': a single file needs every array "
            "whole in one process."
        )
    if checkpoint_format == "sharded":
        return ShardedCheckpoints(path)
    return _SingleFile(path)


def _starting_state(
    store,
    step: Callable,
    model,
    opt_state,
    key,
    *,
    resume: bool,
    expected_metadata,
    allow_config_change: bool,
    on_resume,
):
    """`(model, opt_state, start, key)` of a run: the ones given, or those of the
    checkpoint it resumes."""
    if not resume and isinstance(store, ShardedCheckpoints) and store.exists():
        # Orbax never overwrites a step; a fresh run would collide with the old
        # one's steps, or keep them beside its own. Every process of a
        # multi-process run sees the same steps (process 0 lists them), so all
        # refuse together and none is left waiting in a collective.
        raise ValueError(
            f"fit: `checkpoint_path` {store.directory!r} holds sharded checkpoints of "
            f"an earlier run (latest step {store.latest_step()}); pass "
            "`resume=True` to continue it, or write to a new directory."
        )
    if not (resume and store is not None and store.exists()):
        return model, opt_state, 0, key
    if expected_metadata is not None and not allow_config_change:
        store.check_metadata(expected_metadata, caller="fit")
    place = getattr(_inner(step), "place", None)
    if isinstance(store, ShardedCheckpoints) and place is not None:
        # Templates in the step's layout: each device reads only its own
        # shards, instead of every process reading whole arrays onto one
        # device for the step to split again.
        model, opt_state = place(model, opt_state)
    restored = store.restore(model=model, opt_state=opt_state, key=key)
    model, opt_state = restored.model, restored.opt_state
    if on_resume is not None:
        model, opt_state = on_resume(model, opt_state)
    return model, opt_state, restored.step, restored.key


def fit(
    step: Callable,
    model,
    opt_state,
    data: Callable[[int], Any] | Iterable,
    *,
    n_steps: int,
    key=None,
    eval_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    checkpoint_format: str = "auto",
    resume: bool = False,
    metadata: Mapping[str, Any] | None = None,
    expected_metadata: Mapping[str, Any] | None = None,
    allow_config_change: bool = False,
    on_resume: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    finite_metrics: Sequence[str] | None = None,
    deterministic: bool = False,
    progress: bool | None = None,
    privacy: PrivacyBudget | None = None,
) -> FitResult:
    """Run a training step over a stream of batches, with evaluation and checkpoints.

    Step `i` (0-based) receives the batch `data(i)` (or the next item of an iterable)
    and the key `jax.random.fold_in(key, i)`, so a run resumed from a checkpoint at
    step `k` sees exactly the batches and keys of an uninterrupted run and ends with
    bit-identical parameters: on a CPU always, on a GPU with `deterministic=True`.

    Every step is checked before its result is adopted. A step from
    [`transforms.make_train_step`][] reports a `nonfinite` metric, computed inside
    the compiled step, that flags a non-finite loss, gradient (global norm),
    updated parameters or new optimiser state, and it hands back its inputs
    unchanged when one is set. For a step of your own that reports no `nonfinite`
    the returned parameters and optimiser state are checked here, on the device
    (one more small compiled reduction per step); a step of your own that does
    report `nonfinite` must follow the same contract (return its inputs on a
    non-zero value). The metrics in `finite_metrics` must stay finite too. The
    first failure raises [`transforms.NonFiniteLossError`][]: the failing state is
    never adopted, evaluated or written, and the checkpoint on disk stays the last
    good one.

    **Arguments:**

    - `step`: `step(model, opt_state, batch, key) -> (model, opt_state, metrics)`, e.g.
        from [`transforms.make_train_step`][].
    - `model`, `opt_state`: the starting model and optimiser state (also the templates
        when resuming).
    - `data`: a function `data(i) -> batch` of the step index (preferred: resuming
        costs nothing), or an iterable of batches (on resume its first `k` items are
        skipped).
    - `n_steps`: total number of steps of the run, counting those before a resume.
    - `key`: the run's PRNG key, or `None` if the step needs none.
    - `eval_fn`: `eval_fn(model) -> dict` of scalars, run every `eval_every` steps;
        the values enter the history with an `eval_` prefix.
    - `eval_every`: evaluation period in steps (0: never).
    - `checkpoint_path`: where to write checkpoints ([`transforms.save_checkpoint`][]).
    - `checkpoint_every`: checkpoint period in steps (0: only at the end); needs
        `checkpoint_path`.
    - `checkpoint_format`: `"file"`, a single file written atomically
        ([`transforms.save_checkpoint`][]; the arrays are gathered on the host);
        `"sharded"`, a directory of checkpoints written asynchronously by orbax
        ([`transforms.ShardedCheckpoints`][]: each device writes its own shards,
        training goes on while they are written, and a resumed run may use
        another number of devices; needs the `orbax` extra); `"auto"` (default):
        `"sharded"` when the step splits its parameters over a mesh (a
        `parameter_sharding` given to [`transforms.make_train_step`][]), else
        `"file"` (which a run of several processes can use only while every
        array is whole in each process). On resume the state is read into the
        templates' shardings (the step places them where it needs them); for
        sharded checkpoints and a step with a `place` method (from
        `make_train_step`) the templates are placed first, so each device reads
        only its own shards. In a run of several
        processes every process calls `fit` alike (see the "Scaling" page).
    - `resume`: continue from `checkpoint_path` if a checkpoint exists there.
    - `metadata`: JSON-serialisable data stored with every checkpoint, typically the
        run's whole configuration.
    - `expected_metadata`: when resuming, values the checkpoint's metadata must hold
        (typically the same configuration as `metadata`), checked by
        [`transforms.check_checkpoint_metadata`][] before anything else is read.
    - `allow_config_change`: resume even if the checkpoint's metadata differs from
        `expected_metadata`: the run continues from the stored arrays (which must
        still fit the templates) with the configuration given now, and its next
        checkpoint records the new `metadata`. `False` (default) refuses the
        checkpoint, naming every differing field.
    - `on_resume`: `on_resume(model, opt_state) -> (model, opt_state)`, applied to
        the state restored from a checkpoint before the first step, e.g. to lay a
        schedule kept in the optimiser state out over a new run length. Not called
        on a fresh start.
    - `finite_metrics`: names of metrics that must stay finite, besides the guard
        above; each must be among the step's metrics. `None` (default) watches
        `loss` if the step reports one.
    - `deterministic`: run the step compiled for run-to-run determinism on a GPU
        (see `deterministic` in [`transforms.make_train_step`][]), so that a resumed
        run is bit-identical to an uninterrupted one there too, at a cost in speed
        (the "On a GPU" page of the docs gives it). It applies to steps with a
        `deterministic` option (from `make_train_step`, possibly inside
        `with_fallback`); `True` with another step raises `TypeError`. `False`
        (default) runs the step as it was built.
    - `progress`: show a tqdm progress bar: `None` (default) shows it when standard
        error is a terminal (or in a notebook) and stays quiet when the output goes
        to a file or a pipe, `True` always, `False` never.
    - `privacy`: a [`transforms.PrivacyBudget`][] for differentially private
        training with a step from [`transforms.make_dp_train_step`][]: before the
        first step, the ε that `n_steps` steps spend (counted from step 0, so a
        resumed run counts the steps before the resume) is checked against the
        budget, and the run is refused, or shortened with `on_exceed="stop"`; the
        ε spent after each step enters the history as `epsilon` and shows in the
        progress bar. The noise multiplier comes from the step, the sampling from
        `data` (a [`transforms.PoissonSampler`][] or [`transforms.ShuffleSampler`][])
        or from the budget's `sampling_rate`. Needs the `dp` extra. `None`
        (default): no accounting.

    **Returns:**

    A [`transforms.FitResult`][] `(model, opt_state, step, key, history)`; `history`
    holds one dict per step with the step's metrics as floats (`nonfinite` among
    them, 0 on every recorded step, for steps that report it), `step` and
    `step_time` (wall-clock seconds measured outside the compiled step, after
    `block_until_ready`; the first step includes compilation).

    **Raises:**

    [`transforms.NonFiniteLossError`][] at the first non-finite step, naming the step
    and what was not finite (loss, gradient, parameters, optimiser state or a
    watched metric), holding the last good model and optimiser state; the last
    checkpoint written before it stays on disk untouched, and the message mentions
    it only if there is one.
    [`transforms.CheckpointError`][] when resuming from a checkpoint whose metadata
    differs from `expected_metadata` (unless `allow_config_change`), or that is
    corrupted, truncated, malformed or does not fit the templates.
    `ValueError` for inconsistent arguments, `checkpoint_format="file"` with
    parameters split over the devices of several processes (each holds only its
    own shards: use `"sharded"`), a data iterable that runs out, or
    `finite_metrics` naming a metric the step does not report (at the first step).
    `TypeError` for `deterministic=True` with a step that has no such option, a
    string as `finite_metrics`, or if `metadata` is not a JSON-serialisable mapping
    (before any step). Before anything runs: `TypeError` if `step`, `eval_fn` or
    `on_resume` is not callable, `data` neither callable nor iterable, a flag not
    a bool, or `n_steps`, `eval_every` or `checkpoint_every` not an integer;
    `ValueError` if one of those is negative.
    [`transforms.PrivacyBudgetError`][] (a `ValueError`) before any step if
    `n_steps` steps would spend more than the `privacy` budget; `TypeError` if
    `privacy` is not a `PrivacyBudget` or is given with a step that adds no noise
    of its own (not from `make_dp_train_step`); `ValueError` if the sampling rate
    is unknown or contradicts the sampler's; `ImportError` naming the `dp` extra
    without `dp-accounting`.
    """
    check_callable("fit", "step", step)
    if isinstance(data, (str, bytes)) or not (
        callable(data) or isinstance(data, Iterable)
    ):
        expected = "a function of the step index or an iterable of batches"
        raise fail("fit", "data", expected, describe(data), TypeError)
    n_steps = check_size("fit", "n_steps", n_steps, minimum=0)
    eval_every = check_size("fit", "eval_every", eval_every, minimum=0)
    checkpoint_every = check_size(
        "fit", "checkpoint_every", checkpoint_every, minimum=0
    )
    for arg, function in (("eval_fn", eval_fn), ("on_resume", on_resume)):
        if function is not None:
            check_callable("fit", arg, function)
    for arg, flag in (
        ("resume", resume),
        ("allow_config_change", allow_config_change),
        ("deterministic", deterministic),
    ):
        check_bool("fit", arg, flag)
    if progress is not None:  # None: a bar only on a terminal
        check_bool("fit", "progress", progress)
    if eval_every and eval_fn is None:
        raise ValueError("fit: `eval_every` > 0 needs an `eval_fn`.")
    check_choice("fit", "checkpoint_format", checkpoint_format, _CHECKPOINT_FORMATS)
    if (checkpoint_every or resume) and checkpoint_path is None:
        raise ValueError(
            "fit: `checkpoint_every` and `resume` need a `checkpoint_path`."
        )
    if isinstance(finite_metrics, str):
        raise TypeError(
            "fit: `finite_metrics` must be a sequence of metric names, got the "
            f"string {finite_metrics!r}; write ({finite_metrics!r},)."
        )
    if metadata is not None:
        # Refused now rather than at the first checkpoint, after the training it took.
        _json_mapping(metadata, "metadata", "fit")
    accounting = None
    if privacy is not None:
        check_type("fit", "privacy", privacy, PrivacyBudget, "a PrivacyBudget or None")
        accounting = FitPrivacy(privacy, step, data, n_steps)
        n_steps = accounting.n_steps

    if deterministic:
        step = _deterministic(step)

    store = _checkpoints(checkpoint_path, checkpoint_format, step)
    try:
        model, opt_state, start, key = _starting_state(
            store,
            step,
            model,
            opt_state,
            key,
            resume=resume,
            expected_metadata=expected_metadata,
            allow_config_change=allow_config_change,
            on_resume=on_resume,
        )
        if start > n_steps:
            raise ValueError(
                f"fit: the checkpoint is at step {start}, beyond `n_steps`={n_steps}."
            )
        next_batch = _batches(data, start)
    except BaseException:
        # Released on the way out, as the loop below releases it: orbax's
        # manager holds threads (and, across processes, takes part in barriers).
        if store is not None:
            store.close()
        raise
    checkpoint_step = start if resume and start > 0 else None

    def checkpoint(done):
        nonlocal checkpoint_step
        assert store is not None
        store.save(done, model=model, opt_state=opt_state, key=key, metadata=metadata)
        checkpoint_step = done

    history = []
    watched = None
    # `disable=None` is tqdm's own test: quiet unless its stream is a terminal.
    disable = None if progress is None else not progress
    bar = tqdm(total=n_steps, initial=start, disable=disable, desc="fit")
    try:
        for i in range(start, n_steps):
            batch = next_batch(i)
            step_key = None if key is None else jax.random.fold_in(key, i)
            t0 = time.perf_counter()
            out = jax.block_until_ready(step(model, opt_state, batch, step_key))
            elapsed = time.perf_counter() - t0
            new_model, new_opt_state, metrics = out
            record = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if watched is None:
                watched = _watched(finite_metrics, record)
            if "nonfinite" in record:
                mask = int(record["nonfinite"])
                # On a non-finite step the step handed its inputs back.
                last_good = (new_model, new_opt_state)
            else:
                mask = int(_state_mask(new_model, new_opt_state))
                last_good = (model, opt_state)
            parts = nonfinite_parts(mask)
            bad = parts + tuple(
                m for m in watched if not math.isfinite(record[m]) and m not in parts
            )
            if bad:
                where = (
                    f"the last good checkpoint (step {checkpoint_step}) is kept at "
                    f"{os.fspath(checkpoint_path)!r}"
                    if checkpoint_step is not None and checkpoint_path is not None
                    else "no checkpoint was written"
                )
                shown = dict.fromkeys(("loss", "grad_norm", *watched))
                values = ", ".join(f"{m}={record[m]}" for m in shown if m in record)
                values = f" ({values})" if values else ""
                good_model, good_opt_state = (
                    last_good if _alive(last_good) else (None, None)
                )
                raise NonFiniteLossError(
                    f"fit: non-finite {', '.join(bad)} at step {i}{values}; {where}.",
                    step=i,
                    metrics=record,
                    checkpoint_step=checkpoint_step,
                    nonfinite=bad,
                    model=good_model,
                    opt_state=good_opt_state,
                )
            model, opt_state = new_model, new_opt_state
            record["step"] = i
            record["step_time"] = elapsed
            if eval_every and (i + 1) % eval_every == 0:
                assert eval_fn is not None
                evaluated = jax.device_get(dict(eval_fn(model)))
                record.update({f"eval_{k}": float(v) for k, v in evaluated.items()})
            if accounting is not None:
                accounting.report(i + 1, record)
            history.append(record)
            if checkpoint_every and (i + 1) % checkpoint_every == 0:
                checkpoint(i + 1)
            bar.update(1)
            loss = f"{record['loss']:.4g}" if "loss" in record else ""
            if accounting is not None and accounting.latest is not None:
                bar.set_postfix(loss=loss, eps=f"{accounting.latest:.3g}")
            else:
                bar.set_postfix(loss=loss)
        if store is not None and checkpoint_step != n_steps:
            checkpoint(n_steps)
    finally:
        bar.close()
        if store is not None:
            # Sharded saves run in the background: on disk before fit returns
            # (or raises).
            store.close()
    return FitResult(
        model=model, opt_state=opt_state, step=n_steps, key=key, history=history
    )
