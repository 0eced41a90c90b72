"""Replay (issue 35 item 5): data_dir=NEW,OLD with data_weights mixes training windows from several
datasets of one tokenizer. The mix follows the weights, is seeded, resumes exactly, and is the
same draw on 2 processes as with accumulation 2; each extra dataset is scored as val_loss_FOLDER."""

import json
import random

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import make_cfg, stop_after_steps
from data import MixedLoader
from prepare.text import prepare
import train as T

CPU = torch.device("cpu")


def corpus(folder, words, n=40, seed=0):
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"d{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)))
    return folder


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """OLD (plain words) and NEW (other words, with its own characters), NEW on OLD's tokenizer."""
    tmp = tmp_path_factory.mktemp("replay")
    common = dict(tokenizer="char", num_proc=1, val_fraction=0.2, test_fraction=0.1)
    old = prepare(make_cfg(input=str(corpus(tmp / "src_old", "the cat sat on a mat".split())),
                           data_dir=str(tmp / "old"), **common))
    new = prepare(make_cfg(input=str(corpus(tmp / "src_new", "thy dog ran by the bog, quick!".split(), seed=1)),
                           data_dir=str(tmp / "new"), tokenizer_from=str(tmp / "old"), **common))
    assert new["tokenizer"] == old["tokenizer"]
    return tmp / "new", tmp / "old"


def mixed(folders, weights=(0.8, 0.2), accum=2, world=1, rank=0, seed=5):
    return MixedLoader([str(f) for f in folders], list(weights), 4, 16, accum, world, rank, seed, CPU)


def test_windows_come_from_each_dataset_by_its_weight(two_datasets):
    loader = mixed(two_datasets)
    sources = []
    for _ in range(300):
        loader.next()
        sources += loader.picks[..., 0].flatten().tolist() if loader.pos == 1 else []
    share_new = sources.count(0) / len(sources)
    assert len(sources) == 300 // 2 * 8 and abs(share_new - 0.8) < 0.04, share_new
    # the batch holds each window from its own dataset
    x, _ = loader.next()
    picks = loader.picks[loader.pos - 1, 0].tolist()
    for row, (i, start) in zip(x, picks):
        assert row.tolist() == loader.sources[i].data[start:start + 16].tolist()


def test_the_mix_is_seeded_and_a_zero_weight_never_draws(two_datasets):
    a, b, c = mixed(two_datasets), mixed(two_datasets), mixed(two_datasets, seed=6)
    batches = [[loader.next()[0] for _ in range(6)] for loader in (a, b, c)]
    assert all(torch.equal(p, q) for p, q in zip(batches[0], batches[1]))
    assert not all(torch.equal(p, q) for p, q in zip(batches[0], batches[2]))
    only_new = mixed(two_datasets, weights=(1.0, 0.0))
    for _ in range(20):
        only_new.next()
        assert (only_new.picks[..., 0] == 0).all()


def test_a_mid_step_resume_continues_the_same_stream(two_datasets):
    straight = mixed(two_datasets)
    expected = [straight.next()[0] for _ in range(9)]
    first = mixed(two_datasets)
    for _ in range(5):  # stops after micro-batch 1 of step 3's two
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
    resumed = mixed(two_datasets)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next()[0], want) for want in expected[5:])


def test_two_processes_see_the_windows_of_accumulation_two(two_datasets):
    one = mixed(two_datasets, accum=2, world=1)
    ranks = [mixed(two_datasets, accum=1, world=2, rank=r) for r in (0, 1)]
    for _ in range(5):
        micro = [one.next()[0], one.next()[0]]
        assert all(torch.equal(ranks[r].next()[0], micro[r]) for r in (0, 1))


def test_training_on_a_mix_scores_each_dataset_and_resumes_exactly(two_datasets, tmp_path, monkeypatch):
    new, old = two_datasets
    kw = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, eval_iters=2, warmup_iters=2,
              device="cpu", dtype="float32", plot=False, max_iters=6, eval_interval=3,
              data_dir=f"{new},{old}", data_weights="0.7,0.3")
    T.train(make_cfg(out_dir=str(tmp_path / "straight"), **kw))
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    scored = [r for r in rows if "val_loss" in r]
    assert scored and all("val_loss_old" in r for r in scored)
    with stop_after_steps(monkeypatch, 4):
        assert T.train(make_cfg(out_dir=str(tmp_path / "split"), **kw))["iter_num"] == 4
    T.train(make_cfg(out_dir=str(tmp_path / "split"), init_from="resume", **kw))
    a = load_checkpoint(str(tmp_path / "straight" / "ckpt_last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "split" / "ckpt_last.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # evaluate.py scores a mixed run on its own (first) dataset unless told otherwise
    import evaluate
    evaluate.main([f"--out_dir={tmp_path / 'straight'}", "--eval_split=val", "--device=cpu", "--dtype=float32"])
    results = json.load(open(tmp_path / "straight" / "eval.json"))
    assert list(results) == ["lm:new:val"]
