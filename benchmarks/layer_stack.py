"""The ghost passes over a scanned stack of layers, rolled and unrolled.

Usage: `python benchmarks/layer_stack.py [--size tiny|small|deep|gpt2] [--batch B]
[--length T] [--passes NAME ...] [--settings NAME ...] [--repeats N]
[--results-dir DIR]`.

When a loss runs its layers with `lax.scan` over stacked parameters, every ghost pass
runs that scan again with its taps inside, and the plain gradients a step takes beside
its ghost pass (the attribution step's validation gradient) evaluate the loss the same
way. The builders' `unroll_layers` chooses: unrolled (`True`), as the loss wrote it
(`False`), or by default (`"auto"`) unrolled on a GPU or TPU only. Settings
(`SETTINGS`): `rolled` and `unrolled` run a step both ways over a loss that scans
rolled; `loss unrolled` is a loss that unrolls its own scan, with the default. Each
is measured on the current backend (time, peak memory and compile time) for the
ghost per-sample norms, the attribution step and the one-pass DP step, beside a
plain AdamW step on B and on 2B examples of each loss the chosen settings run.
`--passes` with no name measures only the plain steps.

The model is `benchmarks/_gpt.py`'s GPT (tied head, scan over layers). Sizes
(`SIZES`): `tiny` and `gpt2` as in the ghost benchmark, `small` (4 layers, d = 128)
and `deep` (12 layers, d = 64) for a CPU. Rows are merged into
`results/layer_stack-<platform>.json` by (workload, setting, sizes).
"""

import argparse
import sys

import dp
import equinox as eqx
import jax
import jax.random as jr
import optax
from _gpt import COMPUTE, DTYPES, GPT, make_loss, SIZES
from _harness import measure, positive_int, Results, RESULTS_DIR

from transforms import make_attribution_step, per_sample_grad_norms


SIZES = dict(
    SIZES,
    small=dict(
        vocab=2048, dim=128, heads=4, layers=4, context=256, length=64, batch=32
    ),
    deep=dict(vocab=512, dim=64, heads=2, layers=12, context=256, length=32, batch=16),
)
COMPUTE = dict(COMPUTE, small="f32", deep="f32")
# Setting: (the loss's own scan, the builders' `unroll_layers`). "unrolled" is what
# the library gives a rolled loss on a GPU by default; "loss unrolled" is a loss that
# unrolls its own stack, every pass then unrolled by the loss itself.
SETTINGS = {
    "rolled": ("rolled", False),
    "unrolled": ("rolled", True),
    "loss unrolled": ("unrolled", "auto"),
}
# The loss's setting: its scan's `unroll` (a plain step's row is named by it).
LOSS_UNROLL = {"rolled": 1, "unrolled": True}


def programs(loss_fn, optimizer, static, params, opt_state, train, val, unroll_layers):
    """`name: (fn, args)` of the ghost passes, traced when first compiled."""
    switch = dict(unroll_layers=unroll_layers)
    att = make_attribution_step(
        loss_fn, optimizer, method="ghost", donate=False, **switch
    )
    norms = per_sample_grad_norms(loss_fn, method="ghost", **switch)

    def attribution(params, opt_state, train, val):
        model, opt_state, metrics, dots = att(
            eqx.combine(params, static), opt_state, train, val
        )
        return eqx.filter(model, eqx.is_array), opt_state, metrics, dots

    return {
        "per-sample norms, ghost": (
            lambda params, train: norms(eqx.combine(params, static), train),
            (params, train),
        ),
        "attribution step, ghost": (attribution, (params, opt_state, train, val)),
        # The DP benchmark's step: clip norm 1, noise multiplier 1, the whole batch.
        "DP step, one_pass": (
            dp.steps(loss_fn, optimizer, static, **switch)["(b) DP step, one_pass"],
            (params, opt_state, train, jr.key(1)),
        ),
    }


def plain_inputs(cfg, optimizer, unroll):
    """`(params, static, opt_state)` of the benchmark's GPT of size `cfg` whose layer
    scan has `unroll`; the parameters are the same for every `unroll` (one key)."""
    vocab, dim, heads = cfg["vocab"], cfg["dim"], cfg["heads"]
    model = GPT(
        vocab, dim, heads, cfg["layers"], cfg["context"], jr.key(0), unroll=unroll
    )
    params, static = eqx.partition(model, eqx.is_array)
    return params, static, optimizer.init(eqx.filter(model, eqx.is_inexact_array))


# `--passes` name: row label.
WORKLOADS = {
    "one_pass": "DP step, one_pass",
    "norms": "per-sample norms, ghost",
    "attribution": "attribution step, ghost",
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(SIZES), default=None)
    parser.add_argument("--batch", type=positive_int, metavar="B")
    parser.add_argument("--length", type=positive_int, metavar="T")
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument(
        "--passes", nargs="*", choices=list(WORKLOADS), default=list(WORKLOADS)
    )
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS)
    )
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    platform = jax.devices()[0].platform
    size = args.size or ("small" if platform == "cpu" else "gpt2")
    cfg = SIZES[size]
    B, T = args.batch or cfg["batch"], args.length or cfg["length"]
    repeats = args.repeats or (5 if size == "gpt2" else 10)
    loss_fn = make_loss(DTYPES[COMPUTE[size]])
    optimizer = optax.adamw(3e-4)
    params, _, _ = plain_inputs(cfg, optimizer, 1)
    tokens = jr.randint(jr.key(2), (2 * B, T + 1), 0, cfg["vocab"])
    train, val, both = (tokens[:B],), (tokens[B:],), (tokens,)
    sizes = dict(cfg, batch=B, length=T, compute=COMPUTE[size])
    sizes["params"] = sum(x.size for x in jax.tree.leaves(params))
    results = Results(
        "layer_stack",
        "Ghost passes over a scanned stack of layers, rolled and unrolled",
        "The ghost benchmark's GPT (tied head, scan over layers). Each ghost pass "
        "runs the loss's layer scan again with its taps inside: rolled, as the loss "
        "wrote it, or unrolled (the library's choice on a GPU or TPU; a CPU keeps "
        "the loss's setting). 'loss unrolled': the loss unrolls its own scan, so a "
        "step's plain passes are unrolled too. Per-sample norms, the attribution "
        "step (B training and B validation examples) and the one-pass DP step in "
        "each setting, beside a plain AdamW step on B and 2B examples of the loss "
        "rolled and unrolled.",
    )
    chosen = "rolled" if platform == "cpu" else "unrolled"
    results.note(
        f"{size}: {cfg['layers']} layers, d = {cfg['dim']}, B = {B}, T = {T}. The "
        f"library's choice on this backend: {chosen}."
    )

    def add(**row):
        # Saved after every row: a run cut short (a device call's time limit) keeps
        # what it measured.
        results.add(**row)
        results.save(
            args.results_dir,
            merge_key=lambda row: (
                row["workload"],
                row["impl"],
                tuple(sorted(row["sizes"].items())),
            ),
        )

    settings = {name: SETTINGS[name] for name in args.settings}
    # The plain step with the loss's scan as written and unrolled: the baseline a
    # user who unrolls their own stack compares with. `unroll` is a static field of
    # the model, so each setting has its own parameter and optimiser-state trees.
    for loss in dict.fromkeys(loss for loss, *_ in settings.values()):
        plain_params, plain_static, plain_opt_state = plain_inputs(
            cfg, optimizer, LOSS_UNROLL[loss]
        )
        plain = dp.steps(loss_fn, optimizer, plain_static)["(a) plain step"]
        # The attribution step is set beside a plain step on its 2B examples.
        for label, batch in (("plain step, B", train), ("plain step, 2B", both)):
            row, _ = measure(
                plain, plain_params, plain_opt_state, batch, jr.key(1), repeats=repeats
            )
            add(workload=label, impl=loss, loss=loss, sizes=sizes, **row)
    # Pass by pass, every setting: a run cut short keeps whole sets.
    for workload in [WORKLOADS[name] for name in args.passes]:
        for setting, (loss, unroll_layers) in settings.items():
            params, static, opt_state = plain_inputs(cfg, optimizer, LOSS_UNROLL[loss])
            fn, fn_args = programs(
                loss_fn, optimizer, static, params, opt_state, train, val, unroll_layers
            )[workload]
            row, _ = measure(fn, *fn_args, repeats=repeats)
            add(workload=workload, impl=setting, loss=loss, sizes=sizes, **row)


if __name__ == "__main__":
    sys.exit(main())
