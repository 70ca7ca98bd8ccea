"""PyTorch peer of the multimodal LM benchmark: the same model and loss in PyTorch.

Not part of the library. `benchmarks/multimodal.py` runs it in a subprocess
(`python benchmarks/multimodal_torch.py --config JSON`), which prints one JSON line
with its timings. The model mirrors `eqx_models.multimodal.CausalTransformerLM`
(token + type + learned position embeddings, post-LN or pre-LN blocks with causal
`scaled_dot_product_attention`, exact-GELU MLP, final LayerNorm, untied head) and the
loss mirrors `MultimodalLoss` (cross-entropy over the vocabulary, ignoring PAD, plus
0.1-weighted expected-value MSEs on at most `sample_k` sampled positions per
modality, softmax over the modality's slice in float32). Training uses
`torch.compile` on the loss, bfloat16 autocast on a GPU, fused AdamW (0.9, 0.95)
and global-norm clipping.
"""

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


PAD = 0


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, pre_ln: bool):
        super().__init__()
        self.n_heads = n_heads
        self.pre_ln = pre_ln
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)

    def attention(self, x):
        b, length, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        shape = (b, length, self.n_heads, d // self.n_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, length, d))

    def mlp(self, x):
        return self.proj(F.gelu(self.fc(x)))

    def forward(self, x):
        if self.pre_ln:
            x = x + self.attention(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attention(x))
        return self.ln2(x + self.mlp(x))


class LM(nn.Module):
    def __init__(self, vocab, n_types, max_len, d_model, n_layers, n_heads, pre_ln):
        super().__init__()
        self.token = nn.Embedding(vocab, d_model)
        self.type_embedding = nn.Embedding(n_types, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, 4 * d_model, pre_ln) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def features(self, tokens, types):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token(tokens) + self.type_embedding(types) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def multimodal_loss(model, tokens, types, columns, tables, slices, sample_k):
    hidden = model.features(tokens, types)
    d = hidden.shape[-1]
    targets = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], 1).flatten()
    columns = torch.cat([columns[:, 1:], torch.zeros_like(columns[:, :1])], 1).flatten()
    hidden = hidden.reshape(-1, d)
    logits = model.head(hidden)
    ce = F.cross_entropy(logits.float(), targets, ignore_index=PAD)
    weight, bias = model.head.weight, model.head.bias

    def sampled(start, stop, k):
        valid = (targets >= start) & (targets < stop)
        scores = torch.where(valid, torch.rand(valid.shape, device=valid.device), -1.0)
        top, rows = torch.topk(scores, min(k, valid.shape[0]))
        ok = top >= 0
        z = (hidden[rows] @ weight[start:stop].T + bias[start:stop]).float()
        return rows, ok, torch.softmax(z, dim=-1)

    def masked_mean(x, ok):
        return torch.where(ok, x, 0).sum() / ok.sum().clamp(min=1)

    def vector(name, codebook, k):
        start, stop = slices[name]
        rows, ok, probs = sampled(start, stop, k)
        target = codebook[(targets[rows] - start).clamp(0, stop - start - 1)]
        error = ((probs @ codebook - target) ** 2).mean(-1)
        return masked_mean(error, ok), ok.any()

    image, _ = vector("image", tables["image"], sample_k)
    start, stop = slices["scalar"]
    rows, ok, probs = sampled(start, stop, sample_k)
    centres = tables["scalar"][columns[rows].clamp(0, tables["scalar"].shape[0] - 1)]
    bins = (targets[rows] - start).clamp(0, stop - start - 1)
    target = centres.gather(1, bins[:, None])[:, 0]
    scalar = masked_mean(((probs * centres).sum(-1) - target) ** 2, ok)
    groups = [name for name in slices if name.startswith("spectrum:")]
    per_group = max(1, sample_k // len(groups))
    losses, present = zip(*(vector(g, tables[g], per_group) for g in groups))
    present = torch.stack(present)
    spectrum = masked_mean(torch.stack(losses), present)
    return ce + 0.1 * (image + scalar + spectrum)


def run(config: dict) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = np.load(config["data"])
    tokens = torch.as_tensor(data["tokens"], dtype=torch.long, device=device)
    types = torch.as_tensor(data["type_ids"], dtype=torch.long, device=device)
    columns = torch.as_tensor(data["columns"], dtype=torch.long, device=device)
    slices = {k: tuple(v) for k, v in config["slices"].items()}
    tables = {
        name: torch.as_tensor(data[f"table:{name}"], dtype=torch.float32, device=device)
        for name in slices
    }
    model = LM(
        config["vocab"],
        config["n_types"],
        tokens.shape[1],
        config["d_model"],
        config["n_layers"],
        config["n_heads"],
        config["pre_ln"],
    ).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": 0.1},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=3e-4,
        betas=(0.9, 0.95),
        fused=device == "cuda",
    )
    loss_fn = multimodal_loss
    if config["compile"]:
        loss_fn = torch.compile(multimodal_loss)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def step():
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = loss_fn(
                model, tokens, types, columns, tables, slices, config["sample_k"]
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(config["warmup"]):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(config["repeats"]):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    out = {
        "first_call_s": first,
        "times": times,
        "loss": float(loss.detach()),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if device == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="JSON configuration")
    args = parser.parse_args(argv)
    print(json.dumps(run(json.loads(args.config))), flush=True)


if __name__ == "__main__":
    main()
