"""A straightforward PyTorch TiDHy: the benchmark's peer (not part of the library).

It implements the same equations as `eqx_models.tidhy` in the reference batching
mode, the way the original code runs them: the per-time-step inner optimisation is
a Python `while` loop of autograd steps with `torch.optim.SGD` (Nesterov momentum)
and `MultiStepLR` on `r`, whose convergence test reads a value back to the host at
every iteration. The training step is a Python loop over time followed by one
backward pass and an AdamW step with three parameter groups.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class TorchTiDHy(nn.Module):
    """TiDHy with a linear decoder and MSE loss, initialised from a JAX model."""

    def __init__(self, jax_model, device):
        super().__init__()

        def tensor(a):
            return torch.tensor(np.asarray(a), dtype=torch.float32, device=device)

        d, h = jax_model.decoder.linear_in, jax_model.hypernet
        self.W = nn.Parameter(tensor(d.weight))
        self.b = nn.Parameter(tensor(d.bias))
        self.U = nn.Parameter(tensor(jax_model.temporal))
        self.L1 = nn.Linear(h.linear_in.in_features, h.linear_in.out_features)
        self.norm = nn.LayerNorm(h.norm.shape, eps=1e-5)
        self.L3 = nn.Linear(h.linear_hidden.in_features, h.linear_hidden.out_features)
        self.L4 = nn.Linear(h.linear_out.in_features, h.linear_out.out_features)
        with torch.no_grad():
            for layer, source in (
                (self.L1, h.linear_in),
                (self.L3, h.linear_hidden),
                (self.L4, h.linear_out),
            ):
                layer.weight.copy_(tensor(source.weight))
                layer.bias.copy_(tensor(source.bias))
            self.norm.weight.copy_(tensor(h.norm.weight))
            self.norm.bias.copy_(tensor(h.norm.bias))
        self.to(device)
        self.r_dim = jax_model.r_dim
        self.mix_dim = jax_model.mix_dim
        self.temp_weight = jax_model.temp_weight

    def hyper(self, r2):
        return F.relu(self.L4(self.L3(F.elu(self.norm(self.L1(r2))))))

    def decode(self, r):
        return r @ self.W.T + self.b

    def predict(self, r_prev, r2):
        w = self.hyper(r2)
        V = (w @ self.U).reshape(-1, self.r_dim, self.r_dim)
        return torch.bmm(V, r_prev.unsqueeze(2)).squeeze(2)

    def infer(self, x, r_prev, r2_init, *, lr_r, lr_r2, max_iter, tol):
        """One inner optimisation (reference batching: batch-mean energy)."""
        r = torch.zeros_like(r_prev, requires_grad=True)
        r2 = r2_init.clone().requires_grad_(True)
        opt_r = torch.optim.SGD([r], lr_r, momentum=0.9, nesterov=True)
        opt_r2 = torch.optim.SGD([r2], lr_r2, momentum=0.9, nesterov=True)
        every = max_iter // 10
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            opt_r, milestones=list(range(every, max_iter, every)), gamma=0.5
        )
        for p in self.parameters():
            p.requires_grad_(False)
        i, converged = 0, False
        while not converged and i < max_iter:
            old_r, old_r2 = r.detach().clone(), r2.detach().clone()
            spatial = ((self.decode(r) - x) ** 2).sum(1).mean()
            temporal = ((r - self.predict(r_prev, r2)) ** 2).sum(1).mean()
            loss = spatial + self.temp_weight * temporal
            loss.backward()
            opt_r.step()
            opt_r2.step()
            opt_r.zero_grad()
            opt_r2.zero_grad()
            schedule.step()
            with torch.no_grad():
                rho_r = torch.linalg.norm(r - old_r) / (
                    torch.linalg.norm(old_r) + 1e-16
                )
                rho_r2 = torch.linalg.norm(r2 - old_r2) / (
                    torch.linalg.norm(old_r2) + 1e-16
                )
            converged = bool(rho_r < tol) and bool(rho_r2 < tol)
            i += 1
        for p in self.parameters():
            p.requires_grad_(True)
        return r.detach(), r2.detach(), i

    def forward(self, X, *, lr_r, lr_r2, max_iter, tol):
        """The training forward: the three task losses and the iteration counts."""
        B, T, _ = X.shape
        r = torch.zeros(B, self.r_dim, device=X.device)
        r2 = torch.zeros(B, self.L1.in_features, device=X.device)
        hat = ((self.decode(r) - X[:, 0]) ** 2).sum(1).mean()
        bar = torch.zeros_like(hat)
        temp = torch.zeros_like(hat)
        iters = []
        for t in range(1, T):
            r_prev = r
            r, r2, n = self.infer(
                X[:, t], r_prev, r2, lr_r=lr_r, lr_r2=lr_r2, max_iter=max_iter, tol=tol
            )
            iters.append(n)
            r_bar = self.predict(r_prev, r2)
            hat = hat + ((self.decode(r) - X[:, t]) ** 2).sum(1).mean()
            bar = bar + ((self.decode(r_bar) - X[:, t]) ** 2).sum(1).mean()
            temp = temp + ((r - r_bar) ** 2).sum(1).mean()
        return hat, bar, self.temp_weight * temp, iters

    def regularisers(self, cos_eta, orth_r2):
        U = F.normalize(self.U, dim=-1)
        cos = torch.tril(U @ U.T, diagonal=-1).abs().sum() / self.mix_dim
        C = F.normalize(self.L1.weight.T, dim=-1)
        orth = torch.tril(C @ C.T, diagonal=-1).abs().sum() / self.L1.in_features
        return cos_eta * cos + orth_r2 * orth


def make_optimizer(model: TorchTiDHy, lr_s=0.01, lr_t=0.01, lr_h=0.001, wd=1e-5):
    """AdamW with the original's three parameter groups."""
    hyper = [
        p for m in (model.L1, model.norm, model.L3, model.L4) for p in m.parameters()
    ]
    return torch.optim.AdamW(
        [
            {"params": [model.W, model.b], "lr": lr_s},
            {"params": [model.U], "lr": lr_t},
            {"params": hyper, "lr": lr_h},
        ],
        weight_decay=wd,
    )


def train_step(model, optimizer, X, *, inference, cos_eta=5.0, orth_r2=5.0, clip=500.0):
    """One training step (the plain, non-GradNorm path); returns the iterations."""
    hat, bar, temp, iters = model(X, **inference)
    loss = hat + bar + temp + model.regularisers(cos_eta, orth_r2)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return iters
