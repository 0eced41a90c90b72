"""Multi-token prediction (Gloeckle et al. 2024): heads, targets, memory-efficient backward."""

import contextlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_checkpoint
from conftest import ROOT, make_cfg, stop_after_steps
from generate import generate
from metrics import read_metrics
from model import GPTConfig
from multitoken import MultiTokenGPT
import train as T


def mtp_model(n, **kw):
    torch.manual_seed(0)
    return MultiTokenGPT(GPTConfig(**{**dict(vocab_size=97, block_size=32, n_layer=3, n_head=4, n_embd=32, mtp_heads=n),
                                      **kw}))


def test_one_head_is_the_plain_model():
    from model import GPT
    one = mtp_model(1)
    torch.manual_seed(0)
    plain = GPT(one.config)
    x = torch.randint(0, 97, (2, 32))
    y = torch.roll(x, -1, 1)
    assert plain(x, y)[1].item() == one.head_losses(x, y, memory_efficient=False)[0].item()
    assert not list(one.mtp.parameters())


def test_head_i_predicts_token_t_plus_i():
    m = mtp_model(3).eval()
    x = torch.randint(0, 97, (2, 32))
    y = torch.roll(x, -1, 1)
    losses = m.head_losses(x, y, memory_efficient=False)
    z, (x0, rope, mask) = m.trunk(x)
    all_heads = m.multi_head_logits(x)
    for i, block in enumerate([m.transformer.h[-1], *m.mtp]):
        logits = m.head(block(z, x0, None, "causal"))
        assert torch.allclose(all_heads[i], logits, atol=1e-6)
        # head i+1 at position t predicts x[t + i + 1] = y[t + i]; the last i positions have no target
        expected = F.cross_entropy(logits[:, :32 - i].flatten(0, 1), y[:, i:].flatten())
        assert losses[i].item() == pytest.approx(expected.item(), rel=1e-6)
    assert m(x, y)[1].item() == pytest.approx(sum(losses).item() / 3, rel=1e-6)
    w = mtp_model(3, mtp_weights="1,0.5,0.25")
    lw = w.head_losses(x, y, memory_efficient=False)
    assert w(x, y)[1].item() == pytest.approx((lw[0] + 0.5 * lw[1] + 0.25 * lw[2]).item() / 1.75, rel=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(pos="rope", n_kv_head=2), dict(attn_window=5), dict(x0_mix=True)])
def test_memory_efficient_gradients_equal_naive(kw):
    x = torch.randint(0, 97, (2, 32))
    y = torch.roll(x, -1, 1)
    grads = []
    for efficient in (True, False):
        m = mtp_model(4, **kw)
        for block in [*m.transformer.h, *m.mtp]:
            if block.x0_weights is not None:  # away from the identity, so x0 carries gradient
                block.x0_weights.data = torch.tensor([0.8, 0.3])
        losses = m.head_losses(x, y, memory_efficient=efficient)
        (sum(losses) / 4).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=0), name


PEAK = """
import sys, torch
sys.path.insert(0, {root!r})
from model import GPTConfig
from multitoken import MultiTokenGPT
torch.manual_seed(0)
n, efficient = {n}, {efficient}
m = MultiTokenGPT(GPTConfig(vocab_size=32768, block_size=512, n_layer=3, n_head=2, n_embd=32, mtp_heads=n))
x = torch.randint(0, 32768, (4, 512))
y = torch.roll(x, -1, 1)
def status(field):  # KiB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))
# Reset the peak mark (VmHWM) to the resident set now: an earlier transient peak (imports) would
# hide growth. (Not ru_maxrss: Linux carries the parent's peak into it across fork and exec, so a
# pytest process that once held 1.2 GB made every child's "peak" at least that.)
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
sum(m.head_losses(x, y, memory_efficient=efficient)).backward()
print((status("VmHWM") - before) / 1024)  # KiB -> MiB
"""


def peak_mib(n, efficient):
    out = subprocess.run([sys.executable, "-c", PEAK.format(root=str(ROOT), n=n, efficient=efficient)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.slow
def test_peak_memory_of_the_heads_does_not_grow_with_n():
    """4 x 512 tokens x 32768 vocabulary: one head's logits are 256 MiB in float32."""
    one, four, naive = peak_mib(1, True), peak_mib(4, True), peak_mib(4, False)
    assert four < 1.3 * one + 64, (one, four)
    # the check can see growth: all-at-once keeps every head's 256 MiB log-probabilities alive
    assert naive > four + 2 * 256, (four, naive)


def test_training_logs_every_head_and_resumes_exactly(char_data, tmp_path, monkeypatch):
    kw = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, log_interval=1,
              warmup_iters=2, device="cpu", dtype="float32", plot=False, data_dir=str(char_data),
              mtp_heads=3, max_iters=6, eval_interval=3, learning_rate=3e-3)
    summary = T.train(make_cfg(**kw, out_dir=str(tmp_path / "straight")))
    evals = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if r["kind"] == "eval"]
    assert {"val_head1", "val_head2", "val_head3"} <= evals[-1].keys()
    assert evals[-1]["val_loss"] == evals[-1]["val_head1"] and summary["best"] == evals[-1]["val_head1"]
    with stop_after_steps(monkeypatch, 2):
        T.train(make_cfg(**kw, out_dir=str(tmp_path / "split")))
    T.train(make_cfg(**kw, out_dir=str(tmp_path / "split"), init_from="resume"))
    a = load_checkpoint(str(tmp_path / "straight" / "ckpt_last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "split" / "ckpt_last.pt"))["model"]
    assert any(k.startswith("mtp.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    out = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'straight'}", "--max_new_tokens=5",
                          "--num_samples=1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    json.dumps(evals)


def drafting_model(**kw):
    """Four heads trained briefly on a repetitive stream, so that some drafts are right."""
    torch.manual_seed(1)
    m = mtp_model(4, **kw)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.arange(64).remainder(7).view(2, 32)
    for _ in range(60):
        loss = m(x, torch.roll(x, -1, 1))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.mark.parametrize("kw", [dict(), dict(pos="rope", n_kv_head=2)])
def test_self_speculative_decoding_equals_greedy(kw):
    from generate import speculative_generate
    m = drafting_model(**kw)
    prompts = [[1, 2, 3], [5], [6, 0, 1, 2, 3, 4]]
    greedy = generate(m, prompts, 40, temperature=0)  # runs past block_size=32 too
    spec, accepted, proposed = speculative_generate(m, prompts, 40)
    assert spec == greedy
    assert proposed > 0 and accepted > 0  # the heads learned something: drafts get accepted
    stop = greedy[0][5]
    spec, _, _ = speculative_generate(m, prompts[:1], 40, stop_ids={stop})
    assert spec[0] == greedy[0][:greedy[0].index(stop) + 1]
    spec, _, _ = speculative_generate(m, prompts[:1], 40, should_stop=lambda ids: len(ids) == 7)
    assert spec[0] == greedy[0][:7]
    spec, _, _ = speculative_generate(m, prompts[:1], 3)
    assert spec[0] == greedy[0][:3]


def test_speculative_rounds_never_see_a_full_window(monkeypatch):
    """Plain decoding slides its window before it would predict from block_size tokens; a
    speculative round must not verify from such a window either (a bug found on a real model)."""
    from generate import speculative_generate
    from multitoken import MultiTokenGPT as GPTClass
    m = mtp_model(3).eval()
    seen = []
    real = GPTClass.multi_head_logits

    def spy(self, idx, cache=None, doc_ids=None, valid=None):
        seen.append(int(valid.sum(dim=1).max()))  # the longest context a prediction is made from
        return real(self, idx, cache, doc_ids, valid)

    monkeypatch.setattr(GPTClass, "multi_head_logits", spy)
    # the draft heads copy head 1 here, so every draft is accepted and rounds run up to the edge
    for head in m.mtp:
        head.load_state_dict(m.transformer.h[-1].state_dict())
    for n_prompt in range(1, 31):
        out, _, _ = speculative_generate(m, [list(range(1, n_prompt + 1))], 40)
        assert out == generate(m, [list(range(1, n_prompt + 1))], 40, temperature=0)
    assert seen and max(seen) <= m.config.block_size - 1


def test_speculative_batch_runs_one_forward_per_round(monkeypatch):
    """Rows that accept different numbers of drafts share each forward: rejected drafts become
    holes in the cache, and compaction squeezes them out, with the same tokens as row by row."""
    from generate import KVCache, speculative_generate
    m = drafting_model(pos="rope")
    prompts = [[1, 2, 3], [50, 9, 77, 3], [6, 0, 1, 2, 3, 4], [88]]
    row_by_row = [speculative_generate(m, [p], 26)[0][0] for p in prompts]
    calls, compactions = [], []
    real_forward, real_compact = MultiTokenGPT.multi_head_logits, KVCache.compact
    monkeypatch.setattr(MultiTokenGPT, "multi_head_logits", lambda self, idx, *a, **k: calls.append(idx.shape[0])
                        or real_forward(self, idx, *a, **k))
    monkeypatch.setattr(KVCache, "compact", lambda self, valid: compactions.append(1) or real_compact(self, valid))
    out, accepted, proposed = speculative_generate(m, prompts, 26)
    assert out == row_by_row == generate(m, prompts, 26, temperature=0)
    assert 0 < accepted < proposed  # rows disagree with some drafts, so holes appear
    assert set(calls) == {len(prompts)}  # every forward carries the whole batch
    assert compactions


def loss_and_grads(model, run, autocast=contextlib.nullcontext()):
    """The 3-head model's loss on a fixed batch through run (model or a wrapper), and every gradient."""
    x = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    with autocast:
        loss = run(x, torch.roll(x, -1, 1))[1]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_compiled_multi_token_loss_and_gradients_equal_eager():
    """torch.compile traces the checkpointed heads (non-reentrant checkpointing)."""
    m = mtp_model(3)
    eager_loss, eager = loss_and_grads(m, m)
    compiled_loss, compiled = loss_and_grads(m, torch.compile(m))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for n in eager:
        assert torch.allclose(compiled[n], eager[n], atol=1e-5), n


def test_multi_token_loss_under_bf16_autocast():
    """Mixed precision: the checkpointed heads recompute under the same autocast state, so the
    bf16 loss and gradients track float32's."""
    m = mtp_model(3)
    fp32_loss, fp32 = loss_and_grads(m, m)
    bf16_loss, bf16 = loss_and_grads(m, m, torch.autocast("cpu", dtype=torch.bfloat16))
    assert bf16_loss == pytest.approx(fp32_loss, rel=2e-2)
    for n in fp32:
        cos = F.cosine_similarity(bf16[n].flatten(), fp32[n].flatten(), dim=0)
        assert bf16[n].dtype == torch.float32 and cos > 0.95, n
