import itertools

import pytest
import torch

from model import GPT, GPTConfig, KVCache, document_ids, export_hf, from_hf, gpt2_config


def tiny(**kw):
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, pad_vocab_to=64)
    return GPTConfig(**{**base, **kw})


def seeded_model(c, seed=0):
    torch.manual_seed(seed)
    return GPT(c).eval()


# ----------------------------------------------------------------------------- GPT-2 exactness

@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(path)
    return hf, path


def test_import_matches_transformers_logits(hf_gpt2):
    hf, path = hf_gpt2
    ours = from_hf(str(path)).eval()
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_export_reloads_in_transformers(hf_gpt2, tmp_path):
    import transformers
    hf, path = hf_gpt2
    ours = from_hf(str(path)).eval()
    message = export_hf(ours, str(tmp_path / "out"), {"kind": "gpt2", "eot_id": 50256})
    assert "GPT2LMHeadModel" in message
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 50257, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(back(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)
    tok = transformers.GPT2Tokenizer.from_pretrained(tmp_path / "out")
    assert tok.encode("Hello world") == [15496, 995]


def test_greedy_generation_matches_transformers(hf_gpt2):
    hf, path = hf_gpt2
    ours = from_hf(str(path)).eval()
    prompt = [464, 2068, 7586, 21831]
    mine = ours.generate([prompt], 30, temperature=0)[0]
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                      max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=50256)[0, 4:]
    assert mine == ref.tolist()


def test_non_gpt2_export_says_so(tmp_path):
    msg = export_hf(seeded_model(tiny(pos="rope", norm="rmsnorm")), str(tmp_path))
    assert "cannot load" in msg and "pos='rope'" in msg and (tmp_path / "gpt_config.json").exists()


def test_gpt2_124m_parameter_count():
    c = gpt2_config("gpt2")
    c.pad_vocab_to = 1
    c.__post_init__()
    assert GPT(c).num_params() == 124_439_808


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


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("kw", [dict(), dict(pos="rope", n_kv_head=1), dict(n_kv_head=2, attn_window=6),
                                dict(attn_backend="math", qk_norm=True, mlp="swiglu")])
def test_kv_cache_equals_recompute(kw):
    m = seeded_model(tiny(**kw))
    prompts = [[3, 4, 5, 6, 7], [9, 8], [1]]
    cached = m.generate(prompts, 60, temperature=0, use_cache=True)   # runs past block_size=32
    fresh = m.generate(prompts, 60, temperature=0, use_cache=False)
    assert cached == fresh
    for p, out in zip(prompts, cached):  # a padded batch gives what each prompt gives alone
        assert m.generate([p], 60, temperature=0)[0] == out


def test_greedy_cache_equals_full_forward_argmax():
    """Within the block, cached greedy decoding = argmax of a full forward over the sequence."""
    m = seeded_model(tiny(pos="rope"))
    seq = [5, 6, 7]
    out = m.generate([seq], 20, temperature=0)[0]
    for t in out:
        with torch.no_grad():
            assert m(torch.tensor([seq]))[0][0, -1].argmax().item() == t
        seq.append(t)


def test_sampling_options_and_stops():
    m = seeded_model(tiny())
    g = torch.Generator().manual_seed(0)
    greedy = m.generate([[1, 2]], 10, temperature=0)[0]
    assert m.generate([[1, 2]], 10, temperature=1.0, top_k=1, generator=g)[0] == greedy
    assert m.generate([[1, 2]], 10, temperature=1.0, top_p=1e-6, generator=g)[0] == greedy
    out = m.generate([[1, 2]], 10, temperature=0, stop_ids={greedy[3]})[0]
    assert out == greedy[: greedy.index(greedy[3]) + 1]
    assert m.generate([[1, 2]], 10, temperature=0, should_stop=lambda ids: len(ids) == 4)[0] == greedy[:4]
    samples = m.generate([[1]] * 8, 30, temperature=2.0, generator=g)
    assert all(0 <= t < 97 for s in samples for t in s)  # never a padding id (vocab padded to 128)


def test_long_prompt_is_cropped_with_warning():
    m = seeded_model(tiny())
    with pytest.warns(UserWarning, match="block_size"):
        out = m.generate([list(range(1, 60))], 3, temperature=0)[0]
    assert out == m.generate([list(range(1, 60))[-31:]], 3, temperature=0)[0]


def test_kv_cache_rollback():
    m = seeded_model(tiny())
    cache = KVCache(m, 1, 32)
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        m.trunk(idx, cache=cache)
        h1 = m.trunk(torch.tensor([[5]]), cache=cache)
        cache.length = 4  # forget token 5
        h2 = m.trunk(torch.tensor([[5]]), cache=cache)
    assert torch.equal(h1, h2) and cache.length == 5


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
    assert mixed.generate(prompts, 40, temperature=0) == mixed.generate(prompts, 40, temperature=0, use_cache=False)


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
