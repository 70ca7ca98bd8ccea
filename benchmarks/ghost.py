"""Ghost engines on a GPT: attribution and per-sample norms against a plain step.

Usage: `python benchmarks/ghost.py [--size tiny|gpt2] [--no-torch]
[--sweep-batch B [B ...]] [--results-dir DIR]`. The default size
is `gpt2` on a GPU (GPT-2 small: 124M parameters with the head tied to the token
embedding, d 768, 12 layers, 12 heads, T = 1024, batch 16, bfloat16 compute with float32
master weights) and `tiny` on the CPU (float32). Rows, all on the same model and
device, in one process:

- (a) a plain AdamW training step on the training batch (B) and on train + validation
  (2B examples: the same number of examples as (b));
- (b) the attribution step (`make_attribution_step`, ghost): update with the mean
  training gradient plus `<∇l_i, ḡ_val>` for every training example, validation batch B;
- (c) per-sample gradient norms by the ghost path (B examples);
- (d) the same quantities by `vmap(grad)`: the attribution step with `method="vmap"`
  and per-sample norms with `method="vmap"` (with `--jvp`, also the attribution step
  with `method="jvp"`);
- (e) per-sample gradient norms by `torch.func` (`vmap(grad)`) on the same model in
  PyTorch (CUDA when available), weights copied from the JAX model.

With `--sweep-batch 1 4 16`, the script measures only a batch-size sweep on the same
model: the plain step (a), ghost per-sample norms (c) and `vmap(grad)` norms (d) at each
batch size given (workloads `batch sweep/...`), and merges those rows into the
existing result file (rows of a batch size measured again are replaced, the rest
kept), so run the full benchmark first. A batch size that does not fit in memory is
recorded as a failure, and larger ones are not tried for that implementation.

Memory for the JAX rows is the compiled executable's footprint from XLA's memory
analysis (arguments + outputs + temporaries − aliased), for the torch row the
allocator's peak during the call minus the memory held before it. FLOPs are XLA's
cost analysis.
"""

import argparse
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from _harness import Results, time_callable

from transforms import make_attribution_step, per_sample_grad_norms


SIZES = {
    "tiny": dict(vocab=512, dim=64, heads=2, layers=2, length=64, batch=8),
    "gpt2": dict(vocab=50257, dim=768, heads=12, layers=12, length=1024, batch=16),
}
COMPUTE = {"tiny": "f32", "gpt2": "bf16"}


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    attn_proj: eqx.nn.Linear
    ln2: eqx.nn.LayerNorm
    fc: eqx.nn.Linear
    proj: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    attention: Any = eqx.field(static=True)

    def __init__(self, dim, heads, key, attention=None):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.attention = attention
        self.ln1 = eqx.nn.LayerNorm(dim)
        self.qkv = eqx.nn.Linear(dim, 3 * dim, key=k1)
        self.attn_proj = eqx.nn.Linear(dim, dim, key=k2)
        self.ln2 = eqx.nn.LayerNorm(dim)
        self.fc = eqx.nn.Linear(dim, 4 * dim, key=k3)
        self.proj = eqx.nn.Linear(4 * dim, dim, key=k4)
        self.heads = heads

    def __call__(self, h):
        T, D = h.shape
        qkv = jax.vmap(self.qkv)(jax.vmap(self.ln1)(h)).reshape(T, 3, self.heads, -1)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        a = jax.nn.dot_product_attention(
            q[None], k[None], v[None], is_causal=True, implementation=self.attention
        )[0]
        h = h + jax.vmap(self.attn_proj)(a.reshape(T, D))
        up = jax.nn.gelu(jax.vmap(self.fc)(jax.vmap(self.ln2)(h)), approximate=True)
        return h + jax.vmap(self.proj)(up)


class GPT(eqx.Module):
    """GPT-2 layout: learned positions, pre-LN blocks scanned over, tied head."""

    wte: eqx.nn.Embedding
    wpe: eqx.nn.Embedding
    blocks: Block
    ln_f: eqx.nn.LayerNorm

    def __init__(self, vocab, dim, heads, layers, length, key, attention=None):
        k1, k2, k3 = jr.split(key, 3)
        self.wte = eqx.nn.Embedding(vocab, dim, key=k1)
        self.wpe = eqx.nn.Embedding(length, dim, key=k2)
        self.blocks = eqx.filter_vmap(lambda k: Block(dim, heads, k, attention))(
            jr.split(k3, layers)
        )
        self.ln_f = eqx.nn.LayerNorm(dim)

    def __call__(self, tokens):
        T = tokens.shape[0]
        h = jax.vmap(self.wte)(tokens) + jax.vmap(self.wpe)(jnp.arange(T))
        params, static = eqx.partition(self.blocks, eqx.is_array)
        h, _ = jax.lax.scan(lambda h, p: (eqx.combine(p, static)(h), None), h, params)
        return jax.vmap(self.ln_f)(h) @ self.wte.weight.T


def make_loss(compute_dtype):
    def loss_fn(model, tokens):
        """Next-token cross-entropy of ONE sequence, computed in `compute_dtype`."""
        model = jax.tree.map(
            lambda x: x.astype(compute_dtype) if eqx.is_inexact_array(x) else x, model
        )
        logits = model(tokens[:-1]).astype(jnp.float32)
        return jnp.mean(
            optax.softmax_cross_entropy_with_integer_labels(logits, tokens[1:])
        )

    return loss_fn


def _footprint(compiled) -> dict:
    out = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        out["temp_bytes"] = int(analysis.temp_size_in_bytes)
        out["peak_bytes"] = int(
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes
        )
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        out["flops"] = float(cost["flops"])
    return out


def measure(fn, *args, repeats):
    """Compile `fn` once, read its footprint, then time the compiled executable."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    row = {"compile_s": compile_s, **_footprint(compiled)}
    row.update(time_callable(lambda: compiled(*args), warmup=1, repeats=repeats))
    row.pop("first_call_s")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=list(SIZES), default=None)
    parser.add_argument("--no-torch", action="store_true", help="skip the torch row")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--attention",
        choices=["auto", "xla", "cudnn"],
        default="auto",
        help="implementation of jax.nn.dot_product_attention (auto: cuDNN on a GPU)",
    )
    parser.add_argument(
        "--jvp", action="store_true", help="also time the jvp attribution step"
    )
    parser.add_argument(
        "--sweep-batch",
        type=int,
        nargs="+",
        metavar="B",
        help="only the batch-size sweep at these batch sizes, merged into the file",
    )
    parser.add_argument(
        "--results-dir", default=None, help="where to write (default: results/)"
    )
    args = parser.parse_args(argv)
    platform = jax.devices()[0].platform
    size = args.size or ("tiny" if platform == "cpu" else "gpt2")
    cfg = SIZES[size]
    repeats = args.repeats or (5 if size == "gpt2" else 10)
    compute = jnp.bfloat16 if COMPUTE[size] == "bf16" else jnp.float32
    B = cfg["batch"]
    results = Results(
        "ghost",
        "Ghost engines: attribution step and per-sample norms on a GPT",
        "A GPT-2-layout model (tied head, scan over layers) with float32 master "
        f"weights and {COMPUTE[size]} compute. (a) plain AdamW step on B and on 2B "
        "examples, (b) attribution step (ghost) with a validation batch of B, (c) "
        "ghost per-sample gradient norms, (d) the same by vmap(grad) (and the jvp "
        "attribution step), (e) torch.func vmap(grad) per-sample norms on the same "
        "model.",
    )
    attention = None if args.attention == "auto" else args.attention
    model = GPT(
        cfg["vocab"],
        cfg["dim"],
        cfg["heads"],
        cfg["layers"],
        cfg["length"],
        jr.key(0),
        attention,
    )
    n_params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    sizes = dict(cfg, compute=COMPUTE[size], params=n_params)
    tokens = jr.randint(jr.key(1), (2 * B, cfg["length"] + 1), 0, cfg["vocab"])
    train, val = (tokens[:B],), (tokens[B:],)
    loss_fn = make_loss(compute)
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.adamw(3e-4)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    def plain_step(params, opt_state, batch):
        def mean_loss(params):
            m = eqx.combine(params, static)
            return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(m, *batch))

        value, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def attribution(method):
        step = make_attribution_step(loss_fn, optimizer, method=method, donate=False)

        def run(params, opt_state, train, val):
            model, opt_state, metrics, dots = step(
                eqx.combine(params, static), opt_state, train, val
            )
            return eqx.filter(model, eqx.is_array), opt_state, metrics, dots

        return run

    def norms(method):
        fn = per_sample_grad_norms(loss_fn, method=method)
        return lambda params, batch: fn(eqx.combine(params, static), batch)

    def add(label, workload, row):
        return results.add(workload=workload, impl=label, sizes=sizes, **row)

    if args.sweep_batch:
        # The optimiser state is an argument, not a closure: a closed-over array
        # would be compiled in as a constant.
        candidates = {
            "plain step": ("train step", plain_step, (params, opt_state)),
            "per-sample norms, ghost": ("per-sample norms", norms("ghost"), (params,)),
            "per-sample norms, vmap(grad)": (
                "per-sample norms",
                norms("vmap"),
                (params,),
            ),
        }
        batch_sweep(results, candidates, cfg, sizes, args.sweep_batch, repeats)
        results.save(args.results_dir, merge_key=_sweep_key)
        return

    rows = {}
    rows["a"] = add(
        "(a) plain step, B",
        "train step",
        measure(plain_step, params, opt_state, train, repeats=repeats),
    )
    both = (tokens,)
    rows["a2"] = add(
        "(a) plain step, 2B",
        "train step",
        measure(plain_step, params, opt_state, both, repeats=repeats),
    )
    rows["b"] = add(
        "(b) attribution step, ghost",
        "train step + dots",
        measure(attribution("ghost"), params, opt_state, train, val, repeats=repeats),
    )
    rows["c"] = add(
        "(c) per-sample norms, ghost",
        "per-sample norms",
        measure(norms("ghost"), params, train, repeats=repeats),
    )
    rows["d_step"] = add(
        "(d) attribution step, vmap(grad)",
        "train step + dots",
        measure(attribution("vmap"), params, opt_state, train, val, repeats=repeats),
    )
    if args.jvp:
        add(
            "attribution step, jvp",
            "train step + dots",
            measure(attribution("jvp"), params, opt_state, train, val, repeats=repeats),
        )
    rows["d_norms"] = add(
        "(d) per-sample norms, vmap(grad)",
        "per-sample norms",
        measure(norms("vmap"), params, train, repeats=repeats),
    )
    if not args.no_torch:
        try:
            rows["e"] = _torch_row(
                results, model, cfg, COMPUTE[size], sizes, tokens[:B], loss_fn, repeats
            )
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
            # The peer shares the device with this process's JAX memory pool.
            message = str(error).splitlines()[0][:200]
            results.add(
                workload="per-sample norms", impl="(e) torch.func", error=message
            )

    def ratio(x, y, key="median_s"):
        if x is None or y is None or key not in x or key not in y:
            return "n/a"
        return f"{x[key] / y[key]:.3f}"

    e = rows.get("e")
    results.note(
        f"(b)/(a, 2B) time {ratio(rows['b'], rows['a2'])}, (b)/(a, B) time "
        f"{ratio(rows['b'], rows['a'])}; target (b)/(a, 2B) <= 1.15."
    )
    results.note(
        f"(c)/(a, B) time {ratio(rows['c'], rows['a'])}, peak memory "
        f"{ratio(rows['c'], rows['a'], 'peak_bytes')}; targets <= 1.3 and <= 1.2."
    )
    results.note(
        f"vmap(grad)/ghost: step time {ratio(rows['d_step'], rows['b'])}, step memory "
        f"{ratio(rows['d_step'], rows['b'], 'peak_bytes')}; norms time "
        f"{ratio(rows['d_norms'], rows['c'])}, norms memory "
        f"{ratio(rows['d_norms'], rows['c'], 'peak_bytes')}."
    )
    if e is not None:
        results.note(
            f"torch.func/ghost norms: time {ratio(e, rows['c'])}, memory "
            f"{ratio(e, rows['c'], 'peak_bytes')} (torch memory: allocator peak)."
        )
    results.note(f"size {size} on {platform}; {n_params / 1e6:.1f}M parameters.")
    results.save(args.results_dir)


def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _sweep_key(row):
    """What identifies a row when a sweep is merged into a result file."""
    return row.get("workload"), row.get("impl"), row.get("sizes", {}).get("batch")


def batch_sweep(results, candidates, cfg, sizes, batches, repeats):
    """Time and footprint of each candidate at each batch size, on fresh tokens.

    `candidates` maps an implementation's name to `(workload, fn, args)`, measured as
    `fn(*args, batch)` with the batch `(tokens,)` of `B` sequences.
    """
    failed = {}
    for B in sorted(set(batches)):
        tokens = jr.randint(jr.key(2), (B, cfg["length"] + 1), 0, cfg["vocab"])
        for impl, (workload, fn, args) in candidates.items():
            if impl in failed:
                continue
            row = dict(
                workload=f"batch sweep/{workload}",
                impl=impl,
                sizes=dict(sizes, batch=B),
            )
            try:
                row.update(measure(fn, *args, (tokens,), repeats=repeats))
            except RuntimeError as error:  # XLA's out-of-memory error is one
                if not _out_of_memory(error):
                    raise
                failed[impl] = B
                row["error"] = str(error).splitlines()[0][:200]
            results.add(**row)
    env = results.environment
    note = (
        f"Batch-size sweep (B = {', '.join(map(str, sorted(set(batches))))}; T = "
        f"{cfg['length']}, {sizes['params'] / 1e6:.1f}M parameters, "
        f"{sizes['compute']} compute): measured {env['date']} on {env['device']}, "
        f"jax {env['versions'].get('jax')}."
    )
    if failed:
        note += " Out of memory, larger batches not tried: " + ", ".join(
            f"{impl} at B = {B}" for impl, B in failed.items()
        )
        note += "."
    results.note(note)


def _torch_row(results, model, cfg, compute, sizes, tokens, loss_fn, repeats):
    import torch
    from _ghost_torch import GPT as TorchGPT, load_from_equinox, per_sample_norms

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_model = TorchGPT(
        cfg["vocab"], cfg["dim"], cfg["heads"], cfg["layers"], cfg["length"]
    )
    load_from_equinox(torch_model, model)
    torch_model = torch_model.to(device)
    dtype = torch.bfloat16 if compute == "bf16" else torch.float32
    x = torch.from_numpy(np.asarray(tokens)).to(device)
    sync = (
        (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    )
    fn = per_sample_norms(torch_model, dtype)
    try:
        got = fn(x)
    except RuntimeError:
        # Fall back to hand-written attention if vmap cannot batch the fused kernel.
        torch_model.manual_attention = True
        fn = per_sample_norms(torch_model, dtype)
        got = fn(x)
    expected = per_sample_grad_norms(loss_fn, method="ghost")(model, (tokens,))
    difference = float(
        np.max(
            np.abs(got.float().cpu().numpy() - np.asarray(expected))
            / np.asarray(expected)
        )
    )
    row = {}
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        sync(fn(x))
        row["peak_bytes"] = int(torch.cuda.max_memory_allocated() - before)
    row.update(time_callable(lambda: fn(x), sync=sync, warmup=1, repeats=repeats))
    row["max_rel_diff_vs_jax"] = difference
    row["attention"] = "manual" if torch_model.manual_attention else "sdpa"
    return results.add(
        workload="per-sample norms",
        impl=f"(e) torch.func vmap(grad) ({device})",
        sizes=sizes,
        **row,
    )


if __name__ == "__main__":
    main()
