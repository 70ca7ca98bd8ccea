"""The benchmark's GPT in PyTorch, and the worker that measures PyTorch's per-sample
gradient norms on it, in a process of its own.

Same architecture as the Equinox model in `benchmarks/_gpt.py` (learned positions,
pre-LN blocks, fused qkv projection, causal attention, tanh-GELU MLP, final LayerNorm,
head tied to the token embedding), so the per-sample norms agree when the weights are
copied over.

Usage (started by `ghost.py` or `dp.py`, which write the two files): `python
benchmarks/_ghost_torch.py --peer torch.func|opacus|opacus-dp --weights W.npz
--tokens X.npy --heads H [--compute f32|bf16] [--device cpu|cuda] [--repeats N]
[--clip-norm C] [--noise-multiplier S]`. `W.npz` holds the
weights under the names of this module's `GPT.state_dict()`, `X.npy` the token
sequences, `(B, T + 1)` integers. The worker prints one JSON line: the timing (the
first call, then the median of `repeats` calls, each ended by
`torch.cuda.synchronize` on a GPU), `peak_bytes` (the allocator's peak during one
call minus the memory held before it; left out on the CPU), the per-sample norms, and a
`note`; or `error` (the call failed: out of memory, say) or `skipped` (a package is
missing) instead. Its own process: it shares no memory pool with the parent's JAX,
and running out of memory ends only this measurement.

Peers:

- `torch.func`: `vmap(grad)` of one sequence's loss, computed in `--compute`
  (parameters cast inside the loss, float32 master weights), then the norm of each
  example's gradient.
- `opacus`: Opacus' ghost clipping (`GradSampleModuleFastGradientClipping` with
  `use_ghost_clipping=True`): one forward and backward pass of the batch (bf16 under
  `torch.autocast`), norms from the hooks of its `nn.Linear`, `nn.Embedding` and
  `nn.LayerNorm` layers.
- `opacus-dp`: a whole DP-SGD step of Opacus with ghost clipping, for
  `benchmarks/dp.py`: the module above, `DPOptimizerFastGradientClipping` around
  AdamW (noise `--noise-multiplier` times `--clip-norm`, divided by the batch size)
  and `DPLossFastGradientClipping`, whose `backward()` runs the two backward passes
  (norms, then the loss reweighted by the clip factors) from one forward pass. The
  result holds the timing and memory, no norms.
"""

import argparse
import json
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=1e-5)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim, eps=1e-5)
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)
        self.n_heads = n_heads

    def forward(self, h, manual_attention: bool):
        *batch, T, D = h.shape
        H = self.n_heads
        qkv = self.qkv(self.ln1(h)).reshape(*batch, T, 3, H, D // H)
        # (..., H, T, dh) each
        q, k, v = (qkv.select(-3, i).transpose(-3, -2) for i in range(3))
        if manual_attention:
            scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)
            mask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
            a = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.attn_proj(a.transpose(-3, -2).reshape(*batch, T, D))
        return h + self.proj(F.gelu(self.fc(self.ln2(h)), approximate="tanh"))


class GPT(nn.Module):
    """Takes one sequence `(T,)` or a batch `(B, T)` of token ids."""

    def __init__(self, vocab: int, dim: int, n_heads: int, n_layers: int, length: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim, eps=1e-5)
        self.manual_attention = False

    def forward(self, tokens):
        T = tokens.shape[-1]
        # Positions with the tokens' batch shape, in memory of their own: Opacus
        # reads the batch size of every layer's input and views the ids flat.
        positions = torch.arange(T, device=tokens.device).expand_as(tokens).contiguous()
        h = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            h = block(h, self.manual_attention)
        return self.ln_f(h) @ self.wte.weight.T


def from_state(state: dict[str, np.ndarray], n_heads: int) -> GPT:
    """A `GPT` holding `state` (arrays named as in `GPT.state_dict()`)."""
    vocab, dim = state["wte.weight"].shape
    length = state["wpe.weight"].shape[0]
    n_layers = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    model = GPT(vocab, dim, n_heads, n_layers, length)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model


def per_sample_norms(model: GPT, compute_dtype: torch.dtype):
    """`fn(tokens) -> [B]` per-example gradient norms by `vmap(grad)` of torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(params, tokens):
        cast = {k: v.to(compute_dtype) for k, v in params.items()}
        logits = functional_call(model, cast, (tokens[:-1],))
        return F.cross_entropy(logits.float(), tokens[1:])

    per_example = vmap(grad(loss), in_dims=(None, 0))

    def norms(tokens):
        grads = per_example(params, tokens)
        squares = [g.float().pow(2).flatten(1).sum(1) for g in grads.values()]
        return torch.stack(squares).sum(0).sqrt()

    return norms


# Why Opacus' norms differ from the others on this model (checked with opacus 1.6).
OPACUS_NOTE = (
    "Opacus computes norms from the hooks of nn.Linear, nn.Embedding and nn.LayerNorm "
    "layers; the tied head multiplies by the token-embedding matrix outside them, so "
    "its share of that matrix's gradient is left out of these norms (a tied nn.Linear "
    "head is refused under ghost clipping: parameter tying is not supported)."
)


def opacus_norms(model: GPT, compute_dtype: torch.dtype):
    """`fn(tokens) -> [B]` per-example gradient norms by Opacus' ghost clipping.

    One forward and one backward pass of the batch through
    `GradSampleModuleFastGradientClipping`; the summed loss makes each example's
    backpropagated gradient its own.
    """
    from opacus.grad_sample import (  # pyright: ignore[reportMissingImports]
        GradSampleModuleFastGradientClipping,
    )

    # The token ids need no gradient, so the hooks fire on the layers' outputs: as
    # Opacus intends.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    wrapped = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="sum", use_ghost_clipping=True
    )
    device = next(model.parameters()).device.type
    mixed = compute_dtype != torch.float32

    def norms(tokens):
        with torch.autocast(device, dtype=compute_dtype, enabled=mixed):
            logits = wrapped(tokens[:, :-1].contiguous())
        losses = F.cross_entropy(
            logits.float().transpose(1, 2), tokens[:, 1:], reduction="none"
        ).mean(1)
        losses.sum().backward()
        model.zero_grad(set_to_none=True)
        return wrapped.get_norm_sample()

    return norms


def opacus_dp_step(
    model: GPT, compute_dtype: torch.dtype, clip_norm: float, noise_multiplier: float
):
    """`fn(tokens)`: one DP-SGD step of Opacus with ghost clipping on `tokens`.

    The optimiser is built at the first call, when the batch size (Opacus'
    expected batch size, the noisy sum's denominator) is known.
    """
    from opacus.grad_sample import (  # pyright: ignore[reportMissingImports]
        GradSampleModuleFastGradientClipping,
    )
    from opacus.optimizers import (  # pyright: ignore[reportMissingImports]
        DPOptimizerFastGradientClipping,
    )
    from opacus.utils.fast_gradient_clipping_utils import (  # pyright: ignore[reportMissingImports]
        DPLossFastGradientClipping,
    )

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    wrapped = GradSampleModuleFastGradientClipping(
        model,
        batch_first=True,
        loss_reduction="mean",
        # (Opacus annotates the clipping norm as an int; it is a float norm.)
        max_grad_norm=clip_norm,  # pyright: ignore[reportArgumentType]
        use_ghost_clipping=True,
    )
    device = next(model.parameters()).device.type
    mixed = compute_dtype != torch.float32
    built: dict = {}

    def step(tokens):
        if not built:
            optimizer = DPOptimizerFastGradientClipping(
                torch.optim.AdamW(model.parameters(), lr=3e-4),
                noise_multiplier=noise_multiplier,
                max_grad_norm=clip_norm,
                expected_batch_size=tokens.shape[0],
                loss_reduction="mean",
            )
            built["optimizer"] = optimizer
            built["criterion"] = DPLossFastGradientClipping(
                wrapped, optimizer, nn.CrossEntropyLoss(), loss_reduction="mean"
            )
        optimizer, criterion = built["optimizer"], built["criterion"]
        with torch.autocast(device, dtype=compute_dtype, enabled=mixed):
            logits = wrapped(tokens[:, :-1].contiguous())
        B, T, V = logits.shape
        # `shape` makes the per-example loss the mean over each sequence's tokens.
        loss = criterion(
            logits.float().reshape(B * T, V),
            tokens[:, 1:].reshape(B * T),
            shape=(B, T, V),
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure(fn, tokens, repeats: int) -> tuple[dict, torch.Tensor]:
    """Time `fn(tokens)` and read the allocator's peak during one call."""
    cuda = tokens.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    norms = fn(tokens)
    sync()
    row: dict = {"first_call_s": time.perf_counter() - t0}
    if cuda:
        del norms
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        norms = fn(tokens)
        sync()
        row["peak_bytes"] = int(torch.cuda.max_memory_allocated() - before)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(tokens)
        sync()
        times.append(time.perf_counter() - t0)
    # Raw times: the parent summarises them as every other row (`_harness`).
    return {**row, "times": times}, norms


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def run(args) -> dict:
    """One peer's measurement, or the reason there is none."""
    if args.peer in ("opacus", "opacus-dp"):
        try:
            import opacus  # pyright: ignore[reportMissingImports]
        except ImportError as error:
            return {"skipped": f"opacus is not installed ({_first_line(error)})"}
        note = f"Opacus {opacus.__version__}. {OPACUS_NOTE}"
    else:
        note = None
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.compute == "bf16" else torch.float32
    with np.load(args.weights) as state:
        model = from_state(dict(state), args.heads).to(device)
    tokens = torch.from_numpy(np.load(args.tokens).astype(np.int64)).to(device)
    out: dict = {"device": device.type, "torch": torch.__version__}
    if note is not None:
        out["note"] = note
    try:
        if args.peer == "opacus-dp":
            step = opacus_dp_step(model, dtype, args.clip_norm, args.noise_multiplier)
            timing, _ = measure(step, tokens, args.repeats)
            return {**out, **timing}
        if args.peer == "opacus":
            timing, norms = measure(opacus_norms(model, dtype), tokens, args.repeats)
        else:
            try:
                fn = per_sample_norms(model, dtype)
                timing, norms = measure(fn, tokens, args.repeats)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                # vmap could not batch the fused attention kernel: spell it out.
                model.manual_attention = True
                fn = per_sample_norms(model, dtype)
                timing, norms = measure(fn, tokens, args.repeats)
            out["attention"] = "manual" if model.manual_attention else "sdpa"
    except Exception as error:  # out of memory above all: a row, not a crash
        return {**out, "error": _first_line(error)}
    return {**out, **timing, "norms": norms.detach().float().cpu().tolist()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--peer", choices=["torch.func", "opacus", "opacus-dp"], required=True
    )
    parser.add_argument("--weights", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--heads", type=int, required=True)
    parser.add_argument("--compute", choices=["f32", "bf16"], default="f32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    print(json.dumps(run(parser.parse_args(argv))), flush=True)


if __name__ == "__main__":
    main()
