"""Canaries and exposure (privacy.py, issue 35 item 4): where prepare puts them, what deduplication
does to them, and exposure against its two anchors (a model that learned one canary alone: the
most there is; a model that never saw it: about 1.4 bits) and against a float64 count of ranks."""

import math
import random

import numpy as np
import pytest
import torch

from conftest import make_cfg
from model import GPT, GPTConfig
from prepare.text import prepare
from privacy import (PREFIX, SPACE, CanaryFeed, canary_copies, exposures, plan_canaries, rank_of, secret_text,
                     with_canaries)
from tokenizer import CharTokenizer


def corpus(folder, n=60, seed=0):
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"d{i:03d}.txt").write_text(" ".join(rng.choice("the quick brown fox jumps".split())
                                                         for _ in range(200)))
    return folder


def prep(out, source, **kw):
    return prepare(make_cfg(input=str(source), data_dir=str(out), tokenizer="char", num_proc=1, val_fraction=0.2,
                            test_fraction=0.2, **kw))


def count_in(data_dir, split, text, tok):
    """How many times text's tokens occur in a split's token stream."""
    from data import SplitTokens
    tokens = SplitTokens(str(data_dir), split)
    ids = np.asarray(tokens[0:len(tokens)], dtype=np.int64)
    pattern = np.asarray(tok.encode(text))
    windows = np.lib.stride_tricks.sliding_window_view(ids, len(pattern))
    return int((windows == pattern).all(1).sum())


@pytest.mark.parametrize("dedup", [True, False])
def test_canaries_go_into_the_training_split_only_k_times_or_once_after_dedup(tmp_path, dedup):
    meta = prep(tmp_path / "d", corpus(tmp_path / "src"), canaries=2, canary_repeats="1,5", dedup=dedup)
    from tokenizer import from_meta
    tok = from_meta(meta["tokenizer"])
    record = meta["stats"]["canaries"]
    assert [c["repeats"] for c in record["canaries"]] == [1, 1, 5, 5] and record["prefix"] == PREFIX
    for c in record["canaries"]:
        text = f"{PREFIX} {c['secret']}"
        expected = 1 if dedup else c["repeats"]
        assert c["copies"] == expected
        assert count_in(tmp_path / "d", "train", text, tok) == expected
        assert count_in(tmp_path / "d", "val", text, tok) == count_in(tmp_path / "d", "test", text, tok) == 0
    names = meta["stats"]["train"]["names"]
    # spread among the documents, not bunched at one end
    places = [i for i, n in enumerate(names) if n.startswith("canary ")]
    assert places[0] < len(names) // 2 < places[-1]


def test_the_builtin_path_writes_canaries_the_same_way(tmp_path):
    from prepare.shakespeare import prepare as prepare_shakespeare
    cfg = make_cfg(tokenizer="char", data_dir=str(tmp_path / "s"), canaries=1, canary_repeats="3", dedup=False)
    meta = prepare_shakespeare(cfg)
    (canary,) = meta["stats"]["canaries"]["canaries"]
    assert canary["copies"] == 3 and canary["secret"] == plan_canaries(cfg)[0][0]
    assert sum(n.startswith("canary ") for n in meta["stats"]["train"]["names"]) == 3
    assert meta["stats"]["val"]["documents"] == meta["stats"]["test"]["documents"] == 3


def test_the_feed_places_every_copy_once_in_order():
    copies = canary_copies([("1 2 3 4 5 6", 3), ("6 5 4 3 2 1", 2)], seed=7)
    docs = [(f"doc{i}", "x") for i in range(10)]
    out = with_canaries(docs, copies)
    assert [d for d in out if d[0].startswith("doc")] == docs
    assert sorted(n for n, _ in out if n.startswith("canary")) == sorted(c[1] for c in copies)
    names = [n for n, _ in out]
    for place, name, _ in copies:  # after ceil(place * 10) of the documents
        assert sum(n.startswith("doc") for n in names[:names.index(name)]) == math.ceil(place * 10)
    feed = CanaryFeed(copies, 100.0)
    assert feed.due(-1) == [] and len(feed.due(50)) + len(feed.due()) == 5 and feed.due() == []


def test_secrets_are_distinct_six_digit_strings_from_the_seed():
    cfg = make_cfg(canaries=50, canary_repeats="1,2,3")
    secrets = [s for s, _ in plan_canaries(cfg)]
    assert len(set(secrets)) == 150 and all(len(s.split()) == 6 for s in secrets)
    assert plan_canaries(cfg) == plan_canaries(make_cfg(canaries=50, canary_repeats="1,2,3"))
    assert plan_canaries(cfg) != plan_canaries(make_cfg(canaries=50, canary_repeats="1,2,3", seed=1))
    assert secret_text(42) == "0 0 0 0 4 2"


def test_rank_matches_a_float64_count_when_exact_and_estimates_it_when_sampled():
    rng = np.random.default_rng(0)
    everything = rng.normal(40, 3, SPACE)  # every candidate's loss
    for loss in (30.0, 37.0, 40.0, 45.0):
        true_rank = 1 + int((everything < loss).sum())
        assert rank_of(loss, everything, exact=True) == (true_rank, "exact")
        sample = everything[rng.integers(0, SPACE, 20_000)]
        rank, how = rank_of(loss, sample, exact=False)
        if how == "sampled":  # the share below, within sampling error
            assert abs(math.log2(rank) - math.log2(true_rank)) < 0.3
        else:  # none of 20,000 below: the normal's tail, which is the distribution here
            assert how == "extrapolated" and loss == 30.0
            tail = 0.5 * math.erfc((40 - loss) / (3 * math.sqrt(2)))
            assert abs(math.log2(rank) - math.log2(1 + (SPACE - 1) * tail)) < 0.2
    assert rank_of(0.0, everything[:1000], exact=False)[0] == pytest.approx(1.0)  # far below every candidate


def canary_model(seed=0):
    torch.manual_seed(seed)
    tok = CharTokenizer.train(PREFIX + " 0123456789")
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=48, block_size=32, vocab_size=tok.vocab_size, dropout=0.0))
    return model, tok


def record_of(secrets):
    return {"prefix": PREFIX, "digits": 6, "canaries": [{"secret": s, "repeats": 1, "copies": 1} for s in secrets]}


def test_a_model_that_learned_one_canary_alone_gives_it_the_most_exposure_there_is():
    model, tok = canary_model()
    secret = "3 1 4 1 5 9"
    ids = torch.tensor([[tok.eot_id] + tok.encode(f"{PREFIX} {secret}")] * 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    result = exposures(model, tok, record_of([secret]), samples=2000, seed=0, device="cpu")
    (row,) = result["canaries"]
    assert row["exposure"] == pytest.approx(math.log2(SPACE), abs=0.01) and row["estimate"] == "extrapolated"
    assert result["by_repeats"]["K=1"]["mean_exposure"] == pytest.approx(math.log2(SPACE), abs=0.01)


def test_an_untrained_model_gives_canaries_about_one_bit():
    model, tok = canary_model()
    model.eval()
    secrets = [secret_text(v) for v in random.Random(0).sample(range(SPACE), 40)]
    result = exposures(model, tok, record_of(secrets), samples=2000, seed=0, device="cpu")
    mean = result["by_repeats"]["K=1"]["mean_exposure"]
    # a uniform rank averages log2(e) = 1.44 bits; 40 canaries put the mean within ~0.5 of it
    assert 0.6 < mean < 2.3, mean
    assert {r["estimate"] for r in result["canaries"]} <= {"sampled", "extrapolated"}
