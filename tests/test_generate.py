"""Generation: the KV cache against recomputation, sampling options, windows past block_size."""

import pytest
import torch

from generate import KVCache, generate
from test_model import seeded_model, tiny


@pytest.mark.parametrize("kw", [dict(), dict(pos="rope", n_kv_head=1), dict(n_kv_head=2, attn_window=6),
                                dict(attn_backend="math", qk_norm=True, mlp="swiglu")])
def test_kv_cache_equals_recompute(kw):
    m = seeded_model(tiny(**kw))
    prompts = [[3, 4, 5, 6, 7], [9, 8], [1]]
    cached = generate(m, prompts, 60, temperature=0, use_cache=True)   # runs past block_size=32
    fresh = generate(m, prompts, 60, temperature=0, use_cache=False)
    assert cached == fresh
    for p, out in zip(prompts, cached):  # a padded batch gives what each prompt gives alone
        assert generate(m, [p], 60, temperature=0)[0] == out


def test_greedy_cache_equals_full_forward_argmax():
    """Within the block, cached greedy decoding = argmax of a full forward over the sequence."""
    m = seeded_model(tiny(pos="rope"))
    seq = [5, 6, 7]
    out = generate(m, [seq], 20, temperature=0)[0]
    for t in out:
        with torch.no_grad():
            assert m(torch.tensor([seq]))[0][0, -1].argmax().item() == t
        seq.append(t)


def test_sampling_options_and_stops():
    m = seeded_model(tiny())
    g = torch.Generator().manual_seed(0)
    greedy = generate(m, [[1, 2]], 10, temperature=0)[0]
    assert generate(m, [[1, 2]], 10, temperature=1.0, top_k=1, generator=g)[0] == greedy
    assert generate(m, [[1, 2]], 10, temperature=1.0, top_p=1e-6, generator=g)[0] == greedy
    out = generate(m, [[1, 2]], 10, temperature=0, stop_ids={greedy[3]})[0]
    assert out == greedy[: greedy.index(greedy[3]) + 1]
    assert generate(m, [[1, 2]], 10, temperature=0, should_stop=lambda ids: len(ids) == 4)[0] == greedy[:4]
    samples = generate(m, [[1]] * 8, 30, temperature=2.0, generator=g)
    assert all(0 <= t < 97 for s in samples for t in s)  # never a padding id (vocab padded to 128)


def test_long_prompt_is_cropped_with_warning():
    m = seeded_model(tiny())
    with pytest.warns(UserWarning, match="block_size"):
        out = generate(m, [list(range(1, 60))], 3, temperature=0)[0]
    assert out == generate(m, [list(range(1, 60))[-31:]], 3, temperature=0)[0]


def test_kv_cache_rollback():
    m = seeded_model(tiny())
    cache = KVCache(m, 1, 32)
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        m(idx, cache=cache)
        h1 = m(torch.tensor([[5]]), cache=cache)[0]
        cache.length = 4  # forget token 5
        h2 = m(torch.tensor([[5]]), cache=cache)[0]
    assert torch.equal(h1, h2) and cache.length == 5




def test_a_top_p_below_float32s_range_keeps_the_likeliest_token():
    from generate import sample_next
    logits = torch.tensor([[0.1, 3.0, -1.0, 0.5]])
    assert sample_next(logits, 1.0, 0, 1e-300).tolist() == [1]  # (it dropped every token: NaN probabilities)
