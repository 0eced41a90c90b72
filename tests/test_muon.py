"""Muon: the orthogonalisation against a float64 SVD, the parameter split, convergence, resume."""

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import make_cfg, stop_after_steps
from metrics import read_metrics
from model import GPT, GPTConfig
from muon import CombinedOptimizer, Muon, newton_schulz
import train as T


def matrix(m, n, smallest, seed):
    """A float64 m x n matrix with known singular vectors and values log-spaced down to `smallest`."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    S = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k, dtype=torch.float64)
    return U[:, :k] @ torch.diag(S) @ V[:, :k].T, U[:, :k], S, V[:, :k]


SHAPES = [(64, 64, 1e-2), (128, 32, 1e-3), (32, 384, 0.5), (96, 96, 1e-4)]


@pytest.mark.parametrize("dtype, off_tol, lo, hi", [(torch.float32, 2e-3, 0.68, 1.21),
                                                    (torch.bfloat16, 0.1, 0.65, 1.25)])  # bf16: rounding widens it
@pytest.mark.parametrize("m, n, smallest", SHAPES)
def test_newton_schulz_against_svd(m, n, smallest, dtype, off_tol, lo, hi):
    G, U, S, V = matrix(m, n, smallest, seed=m + n)
    X = newton_schulz(G.float(), dtype=dtype).double()
    inner = U.T @ X @ V  # = diag(p(S)) when the singular vectors are kept
    diag = inner.diagonal()
    off = inner - torch.diag(diag)
    assert off.abs().max() < off_tol, "singular vectors preserved"
    # the known band of 5 quintic steps in exact arithmetic: every singular value above 0.0016 of
    # the Frobenius norm ends in [0.68, 1.21]; smaller ones are only partly lifted, never above it
    big = S / S.norm() >= 0.0016
    assert ((diag[big] > lo) & (diag[big] < hi)).all()
    assert (diag[~big] < hi).all() and (diag >= -off_tol).all()
    assert torch.linalg.svdvals(X).max() < hi


def test_batched_equals_one_by_one():
    G = torch.randn(4, 16, 48)
    one_by_one = torch.stack([newton_schulz(g, dtype=torch.float32) for g in G])
    assert torch.allclose(newton_schulz(G, dtype=torch.float32), one_by_one, atol=1e-5)


def names_in(opt, model):
    name = {id(p): n for n, p in model.named_parameters()}
    return {name[id(p)] for g in opt.param_groups for p in g["params"]}


def test_parameter_split_is_exact_with_multi_token_heads():
    """Muon takes the hidden matrices as the model names them: the extra heads' blocks too (a
    name match on '.h.' used to leave those with AdamW)."""
    from multitoken import MultiTokenGPT
    m = MultiTokenGPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False,
                                mtp_heads=3))
    cfg = make_cfg(optimizer="muon", learning_rate=1e-3, muon_lr=0.02)
    opt = T.configure_optimizer(m, cfg, torch.device("cpu"))
    assert isinstance(opt, CombinedOptimizer)
    adamw, muon = opt.optimizers
    muon_names, adamw_names = names_in(muon, m), names_in(adamw, m)
    assert not muon_names & adamw_names and muon_names | adamw_names == {n for n, _ in m.named_parameters()}
    blocks = [*m.transformer.h, *m.mtp]
    expected = set()
    for prefix, group in (("transformer.h", m.transformer.h), ("mtp", m.mtp)):
        for i, block in enumerate(group):
            expected |= {f"{prefix}.{i}.{n}" for n, p in block.named_parameters() if p.dim() == 2}
    assert muon_names == expected and len(expected) == 4 * len(blocks)
    assert any(n.startswith("mtp.") for n in muon_names)
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"} <= adamw_names
    assert all(g["lr_scale"] == pytest.approx(20.0) for g in muon.param_groups)
    assert 6 * sum(p.numel() for p in m.hidden_matrices()) < m.flops_per_token()  # the FLOP count agrees


def test_lora_adapters_train_with_muon_alone():
    """With LoRA only the adapters train, all of them matrices inside the blocks: Muon takes them
    and no empty AdamW is built (that crashed with 'optimizer got an empty parameter list')."""
    from adapters import add_lora
    m = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16))
    add_lora(m, rank=2, alpha=4.0, dropout=0.0, targets=["c_attn", "c_fc"])
    for name, p in m.named_parameters():
        p.requires_grad_("lora_" in name)
    opt = T.configure_optimizer(m, make_cfg(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, Muon) and names_in(opt, m) == {n for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_each_optimizer_decays_by_its_own_key(optimizer):
    """With a zero gradient an update is pure decay: AdamW multiplies its 2-D weights by
    1 - lr * weight_decay, Muon its matrices by 1 - muon_lr * muon_weight_decay."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False))
    cfg = make_cfg(optimizer=optimizer, learning_rate=0.01, muon_lr=0.05, weight_decay=0.3, muon_weight_decay=0.7)
    opt = T.configure_optimizer(m, cfg, torch.device("cpu"))
    for group in opt.param_groups:
        group["lr"] = cfg.learning_rate * group["lr_scale"]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    (sum(p.sum() for p in m.parameters()) * 0).backward()
    opt.step()
    hidden = {id(p) for p in m.hidden_matrices()}
    for name, p in m.named_parameters():
        if optimizer == "muon" and id(p) in hidden:
            factor = 1 - 0.05 * 0.7
        else:
            factor = 1 - 0.01 * 0.3 if p.dim() == 2 else 1.0
        assert torch.allclose(p, before[name] * factor, rtol=0, atol=1e-7), name


def test_muon_converges_on_a_least_squares_problem():
    torch.manual_seed(0)
    A, W_true = torch.randn(256, 32), torch.randn(32, 16)
    W = torch.nn.Parameter(torch.zeros(32, 16))
    opt = Muon([W], lr=0.05, momentum=0.9)
    first = None
    for step in range(300):
        loss = ((A @ W - A @ W_true) ** 2).mean()
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = 0.05 * (1 - step / 300)  # decay: Muon's fixed-size steps need it to settle
        opt.step()
    assert loss.item() < 1e-3 * first


def test_training_with_muon_falls_and_resumes_exactly(char_data, tmp_path, monkeypatch):
    kw = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, log_interval=1,
              warmup_iters=2, device="cpu", dtype="float32", plot=False, data_dir=str(char_data),
              optimizer="muon", preset="modern", max_iters=8, eval_interval=4, learning_rate=3e-3)
    summary = T.train(make_cfg(**kw, out_dir=str(tmp_path / "straight")))
    first = read_metrics(tmp_path / "straight" / "metrics.jsonl")[0]["loss"]
    assert summary["best"] < first - 0.2
    with stop_after_steps(monkeypatch, 3):
        T.train(make_cfg(**kw, out_dir=str(tmp_path / "split")))
    T.train(make_cfg(**kw, out_dir=str(tmp_path / "split"), init_from="resume"))
    a = load_checkpoint(str(tmp_path / "straight" / "ckpt_last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "split" / "ckpt_last.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_muon_with_a_zero_learning_rate_builds_its_groups():
    """learning_rate=0 passed the config check and then divided by zero (muon_lr / learning_rate)."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    cfg = make_cfg(optimizer="muon", learning_rate=0.0)
    optimizer = T.configure_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, CombinedOptimizer)
