"""
Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration (Keller Jordan et
al., 2024, "Muon: an optimizer for hidden layers"). For a weight matrix W with momentum M, the
step is W -= lr * scale * orth(M), where orth(M) keeps M's singular vectors and pushes all its
singular values towards 1: every direction of the update gets a similar size, instead of a few
dominant directions taking all of it.

Muon is for 2-D hidden weights (the matmuls inside the blocks, as GPT.hidden_matrices() names
them). Embeddings, the output head, norms and biases stay with AdamW: train.configure_optimizer()
splits them and CombinedOptimizer steps both. Weight decay is decoupled, as in AdamW: each step
multiplies a matrix by 1 - lr * weight_decay, with Muon's own learning rate and decay
(muon_weight_decay), so the two optimizers' decays are set independently. Under DDP gradients
are all-reduced before step(), so every process computes the same update (redundantly; simple
and exact).

Read: newton_schulz() (the maths), Muon (momentum + orthogonalised step, same-shape matrices
batched into one bmm per shape), CombinedOptimizer (two optimizers behind one interface).
"""

import functools
from collections import defaultdict

import torch

# Quintic iteration coefficients tuned for speed of convergence at the cost of exactness: the
# singular values land in a band around 1 (about 0.7 to 1.2) rather than exactly on it, which
# is what Muon needs and what the tests check.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


@functools.cache
def fast_dtype(device):
    """bfloat16 where matmuls in it are native (GPUs, CPUs with AVX512-BF16 or AMX; the speed-up
    is in docs/LOG.md), else float32. The iteration tolerates
    bfloat16: its output only needs singular values in a band around 1."""
    if device.type == "cuda":
        return torch.bfloat16
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private but long-standing; absent: False
    if device.type == "cpu" and any(getattr(torch.cpu, f, lambda: False)() for f in checks):
        return torch.bfloat16
    return torch.float32


def newton_schulz(G, steps=5, dtype=None, eps=1e-7):
    """Approximately orthogonalise G (m, n) or a batch (k, m, n): X_{k+1} = a X + (b X X^T +
    c (X X^T)^2) X, computed in `dtype` (default: fast_dtype of G's device)."""
    a, b, c = NS_COEFFS
    X = G.to(dtype or fast_dtype(G.device)).reshape(-1, *G.shape[-2:])  # (k, m, n)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        # baddbmm(M, P, Q, beta, alpha) = beta M + alpha P Q in one kernel: no separate
        # elementwise passes (a quarter of the iteration's time in bf16 on a CPU, docs/LOG.md)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)           # a X + B X
    if tall:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        for group in self.param_groups:
            assert all(p.dim() == 2 for p in group["params"]), "Muon takes 2-D weight matrices only"

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            by_shape = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:  # frozen this step (gradual unfreezing): untouched
                    by_shape[p.shape].append(p)
            for shape, params in by_shape.items():
                updates = []
                for p in params:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.mul_(mom).add_(p.grad)
                    updates.append(p.grad.add(buf, alpha=mom) if group["nesterov"] else buf)
                orth = newton_schulz(torch.stack(updates), group["ns_steps"])  # (k, m, n): one batched iteration
                # scale so a tall matrix's update has the same per-element size as a square one's
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for p, u in zip(params, orth):
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(u, alpha=-lr * scale)


class CombinedOptimizer:
    """Several optimizers stepped as one: the training loop sees one param_groups list (each
    group with its lr_scale), one step(), one zero_grad() and one state_dict()."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
