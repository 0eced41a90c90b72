import itertools

import pytest
import torch
import torch.nn.functional as F

from checkpoint import build_model
from generate import generate
from model import GPT, GPTConfig, document_ids


def tiny(**kw):
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, pad_vocab_to=64)
    return GPTConfig(**{**base, **kw})


def seeded_model(c, seed=0):
    torch.manual_seed(seed)
    return build_model(c).eval()


# ----------------------------------------------------------------------------- attention

def test_causality():
    for c in [tiny(), tiny(pos="rope", attn_backend="math"), tiny(attn_window=4, n_kv_head=1)]:
        m = seeded_model(c)
        idx = torch.randint(0, 97, (2, 20))
        changed = idx.clone()
        changed[:, 11] = (changed[:, 11] + 1) % 97
        with torch.no_grad():
            a, b = m(idx)[0], m(changed)[0]
        assert torch.equal(a[:, :11], b[:, :11])
        assert not torch.allclose(a[:, 11:], b[:, 11:])


@pytest.mark.parametrize("doc_mask, window, n_kv_head", [(False, 0, 4), (True, 0, 2), (False, 5, 1), (True, 7, 4)])
def test_backends_agree(doc_mask, window, n_kv_head):
    """math is the reference; sdpa and flex must give the same outputs for the same masks."""
    idx = torch.randint(1, 97, (2, 32), generator=torch.Generator().manual_seed(3))
    idx[0, [5, 17]] = 0  # end-of-text id 0: three documents in row 0
    idx[1, 9] = 0
    doc_ids = document_ids(idx, 0) if doc_mask else None
    outs = {}
    for backend in ("math", "sdpa", "flex"):
        m = seeded_model(tiny(attn_backend=backend, attn_window=window, n_kv_head=n_kv_head, pos="rope"))
        with torch.no_grad():
            outs[backend] = m(idx, doc_ids=doc_ids)[0]
    assert torch.allclose(outs["sdpa"], outs["math"], atol=1e-5)
    assert torch.allclose(outs["flex"], outs["math"], atol=1e-4)


def test_document_mask_isolates_documents():
    m = seeded_model(tiny(attn_backend="math"))
    a = torch.randint(1, 97, (1, 24))
    b = a.clone()
    b[0, :10] = torch.randint(1, 97, (10,))  # a different first document
    a[0, 10] = b[0, 10] = 0                  # end-of-text opens the second one
    with torch.no_grad():
        la, lb = m(a, doc_ids=document_ids(a, 0))[0], m(b, doc_ids=document_ids(b, 0))[0]
        lc = m(a)[0]
    assert torch.allclose(la[:, 10:], lb[:, 10:], atol=1e-6)  # second document cannot see the first
    assert not torch.allclose(la[:, 10:], lc[:, 10:])          # without the mask it can


# ----------------------------------------------------------------------------- options

OPTIONS = dict(norm=["layernorm", "rmsnorm"], pos=["learned", "rope"], mlp=["gelu", "swiglu", "relu2"],
               qk_norm=[False, True], tie_embeddings=[True, False], logit_softcap=[0.0, 15.0])


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_every_option_combination_overfits_one_batch(n_kv_head):
    """Each of the 96 combinations of the options above (with GQA variants) can memorise a batch."""
    torch.manual_seed(0)
    x = torch.randint(0, 97, (2, 16))
    y = torch.roll(x, -1, dims=1)
    for i, values in enumerate(itertools.product(*OPTIONS.values())):
        kw = dict(zip(OPTIONS, values))
        c = tiny(n_layer=1, block_size=16, n_kv_head=n_kv_head, bias=i % 2 == 0, **kw)
        m = seeded_model(c).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        first = None
        for _ in range(40):
            _, loss = m(x, y)
            first = first or loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.25 * first, (kw, first, loss.item())


def test_x0_mix_starts_as_the_plain_model_then_blends_in_the_embeddings():
    plain = seeded_model(tiny(pos="rope"))
    mixed = GPT(tiny(pos="rope", x0_mix=True)).eval()
    missing = mixed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["transformer.h.0.x0_weights", "transformer.h.1.x0_weights"]
    x = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        assert torch.equal(mixed(x)[0], plain(x)[0])  # a = 1, b = 0: the plain residual stream
    _, loss = mixed(x, torch.roll(x, -1, 1))
    loss.backward()
    assert all(b.x0_weights.grad[1].abs() > 0 for b in mixed.transformer.h)  # b learns from the start
    with torch.no_grad():
        for b in mixed.transformer.h:
            b.x0_weights.copy_(torch.tensor([0.7, 0.5]))
        assert not torch.allclose(mixed(x)[0], plain(x)[0])
    prompts = [[3, 4, 5], [9]]  # each position's x0 is its own token's embedding: caching still holds
    assert generate(mixed, prompts, 40, temperature=0) == generate(mixed, prompts, 40, temperature=0, use_cache=False)


def test_flex_forward_runs_without_grad_on_cpu():
    m = seeded_model(tiny(attn_backend="flex", attn_window=8))
    with torch.no_grad():
        logits, loss = m(torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 32)))
    assert logits.shape == (2, 32, 97) and torch.isfinite(loss)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="n_embd=30 must divide by n_head=4"):
        tiny(n_embd=30)
    with pytest.raises(ValueError, match="flex"):
        tiny(attn_backend="flex", dropout=0.1)
    m = seeded_model(tiny())
    with pytest.raises(ValueError, match="exceeds block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_flops_and_param_accounting():
    m = seeded_model(tiny())
    c = m.config
    assert m.num_params() - m.num_params(embeddings=False) == 128 * 32 + 32 * 32
    # per block: qkv 32x96, proj 32x32, mlp 32x128 + 128x32; plus the 128-row output head
    matmul = c.n_layer * (32 * 96 + 32 * 32 + 2 * 32 * 128) + 128 * 32
    assert m.flops_per_token() == 6 * matmul + 12 * c.n_layer * c.n_embd * c.block_size


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_left_padded_rows_agree_with_math_without_a_cache(backend):
    """A padded batch (no KV cache): padding is never attended to and positions skip it, in
    every backend; flex used to ignore the padding (1.5e-2 off the math reference)."""
    idx = torch.randint(1, 97, (2, 32), generator=torch.Generator().manual_seed(4))
    valid = torch.ones(2, 32, dtype=torch.bool)
    valid[1, :9] = False  # row 1: a 23-token prompt, left-padded
    outs = {}
    for name in ("math", backend):
        m = seeded_model(tiny(attn_backend=name, pos="rope", n_kv_head=2))
        with torch.no_grad():
            outs[name] = m(idx, valid=valid)[0]
    assert torch.allclose(outs[backend][valid], outs["math"][valid], atol=1e-4)
    alone = seeded_model(tiny(attn_backend="math", pos="rope", n_kv_head=2))
    with torch.no_grad():
        unpadded = alone(idx[1:, 9:])[0]
    assert torch.allclose(outs[backend][1, 9:], unpadded[0], atol=1e-4)


def test_flex_reuses_the_causal_block_mask():
    m = seeded_model(tiny(attn_backend="flex", attn_window=8))
    first = m.inputs(torch.zeros(2, 32, dtype=torch.long))[2]
    again = m.inputs(torch.ones(2, 32, dtype=torch.long))[2]
    assert first is again  # built once per length, not on every forward


def test_cross_entropy_never_keeps_a_float32_copy_of_bf16_logits():
    """Low-precision logits are upcast a chunk at a time under checkpointing: the same loss and
    gradient as upcasting all at once, without saving (B*T, V) float32 tensors for backward."""
    import systems as M
    logits = torch.randn(6, 50, 300, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    targets = torch.randint(0, 300, (6, 50))
    targets[0, :7] = -1
    saved = {}

    def run(fn):
        x = logits.clone().requires_grad_()
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = fn(x)
        loss.backward()
        saved[fn] = sum(sizes)
        return loss, x.grad
    full = lambda x: F.cross_entropy(x.float().flatten(0, 1), targets.flatten(), ignore_index=-1)  # noqa: E731
    old_chunk = M.CE_CHUNK_ELEMENTS
    M.CE_CHUNK_ELEMENTS = 300 * 64  # several chunks at this size
    try:
        chunked = lambda x: M.chunked_cross_entropy(x, targets)  # noqa: E731
        (loss_a, grad_a), (loss_b, grad_b) = run(full), run(chunked)
    finally:
        M.CE_CHUNK_ELEMENTS = old_chunk
    assert torch.allclose(loss_a, loss_b, rtol=1e-5) and torch.allclose(grad_a.float(), grad_b.float(), atol=1e-3)
    assert saved[full] >= logits.numel() * 4 and saved[chunked] < logits.numel() * 4


def test_kv_cache_takes_the_autocast_dtype():
    from generate import KVCache
    m = seeded_model(tiny())
    cache = KVCache(m, 1, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.tensor([[1, 2, 3]]), cache=cache)
    assert cache.k.dtype == torch.bfloat16 and cache.length == 3


@pytest.mark.slow
@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_compiled_model_with_flex_equals_math(pos):
    """compile=True with attn_backend=flex: the flex kernel inside the compiled model must read
    q and k (strided views of one tensor) correctly; it was 0.17 off with RoPE."""
    flex = seeded_model(tiny(attn_backend="flex", pos=pos, block_size=128))
    math_model = GPT(tiny(attn_backend="math", pos=pos, block_size=128)).eval()
    math_model.load_state_dict(flex.state_dict())
    x = torch.randint(0, 97, (2, 128), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(torch.compile(flex)(x)[0], math_model(x)[0], atol=1e-4)


@pytest.mark.parametrize("mtp_heads", [1, 2])
def test_activation_checkpointing_changes_nothing_but_memory(mtp_heads):
    """systems.checkpoint_blocks recomputes each block in backward: the same loss and gradients,
    and autograd keeps fewer tensors (here: the saved activations of the blocks are not held)."""
    import copy

    from systems import checkpoint_blocks, plain_name
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=32, mtp_heads=mtp_heads)
    plain = build_model(config)
    wrapped = checkpoint_blocks(copy.deepcopy(plain))
    assert wrapped.state_dict().keys() == plain.state_dict().keys()  # checkpoints do not change
    x = torch.randint(64, (2, 32))
    results = []
    for model in (plain, wrapped):
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            _, loss = model(x, x)
        loss.backward()
        results.append((loss.item(), {plain_name(n): p.grad.clone() for n, p in model.named_parameters()}, sum(saved)))
    (loss_off, grads_off, kept_off), (loss_on, grads_on, kept_on) = results
    assert loss_on == loss_off
    assert all(torch.allclose(grads_on[n], grads_off[n], atol=1e-6) for n in grads_off)
    assert kept_on < kept_off / 2
