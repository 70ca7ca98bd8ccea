"""The benchmark's GPT in PyTorch, for `torch.func` per-sample gradient norms.

Same architecture as the Equinox model in `benchmarks/ghost.py` (pre-LN blocks, fused
qkv projection, causal attention, tanh-GELU MLP, final LayerNorm, head tied to the
token embedding), so the per-sample norms agree when the weights are copied over.
"""

import math

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
        T, D = h.shape
        H = self.n_heads
        q, k, v = self.qkv(self.ln1(h)).reshape(T, 3, H, D // H).unbind(1)
        q, k, v = (z.transpose(0, 1) for z in (q, k, v))  # (H, T, dh)
        if manual_attention:
            scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)
            mask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
            a = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.attn_proj(a.transpose(0, 1).reshape(T, D))
        return h + self.proj(F.gelu(self.fc(self.ln2(h)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, n_heads: int, n_layers: int, length: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim, eps=1e-5)
        self.manual_attention = False

    def forward(self, tokens):
        T = tokens.shape[0]
        h = self.wte(tokens) + self.wpe(torch.arange(T, device=tokens.device))
        for block in self.blocks:
            h = block(h, self.manual_attention)
        return self.ln_f(h) @ self.wte.weight.T


def load_from_equinox(model: GPT, eqx_model) -> None:
    """Copy the weights of `benchmarks/ghost.py`'s Equinox GPT into `model`."""

    def put(param, array):
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.array(array, dtype=np.float32)))

    put(model.wte.weight, eqx_model.wte.weight)
    put(model.wpe.weight, eqx_model.wpe.weight)
    put(model.ln_f.weight, eqx_model.ln_f.weight)
    put(model.ln_f.bias, eqx_model.ln_f.bias)
    stacked = eqx_model.blocks
    for n, block in enumerate(model.blocks):
        for name in ("ln1", "ln2"):
            put(getattr(block, name).weight, getattr(stacked, name).weight[n])
            put(getattr(block, name).bias, getattr(stacked, name).bias[n])
        for name in ("qkv", "attn_proj", "fc", "proj"):
            put(getattr(block, name).weight, getattr(stacked, name).weight[n])
            put(getattr(block, name).bias, getattr(stacked, name).bias[n])


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
