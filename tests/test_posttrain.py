"""Post-training beyond SFT: DPO (task=dpo), RL with a verifiable reward (task=rl), the bias probe
(evaluate.py eval_task=bias) and the corpus term counts beside it."""

import collections
import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_checkpoint, load_for_inference, model_from_checkpoint
from conftest import ROOT, make_cfg, stop_after_steps
from conftest import TINY_BASE as BASE
from data import load_meta
from distributed import setup_processes
from errors import ConfigError
import evaluate as E
import examples as EX
import finetune as FT
from metrics import read_metrics
from prepare.addition import addition_splits, reward
from prepare.common import term_counter
from scoring import bootstrap_interval, dpo_loss, group_advantages, token_logprobs
import tasks as TK
from test_finetune import finetune_cli, one_line_error, weights
import train as T

PAIRS = [{"prompt": "the king", "chosen": " is good", "rejected": " is goode"},
         {"prompt": "my lord", "chosen": " I have it", "rejected": " I haue it"},
         {"prompt": "sweet", "chosen": " love", "rejected": " loue"},
         {"prompt": "come", "chosen": " with us", "rejected": " with vs"},
         {"prompt": "thou", "chosen": " art true", "rejected": " art trewe"}]


def write_splits(folder, rows_by_split):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def dpo_dir(tmp_path):
    return write_splits(tmp_path / "dpo", {"train": PAIRS, "val": PAIRS})


@pytest.fixture
def addition_dir(tmp_path):
    splits, _ = addition_splits()
    return write_splits(tmp_path / "addition", {"train": splits["train"][:16], "val": splits["val"][:8]})


def ft_cfg(base_run, out, **kw):
    return make_cfg(**{**BASE, "init_from": str(base_run), "out_dir": str(out), "max_iters": 4,
                       "eval_interval": 2, "learning_rate": 1e-3, **kw})


RL = dict(task="rl", reward="prepare.addition:reward", max_new_tokens=5, temperature=1.0, rl_group_size=4)


def direct_logprob(model, prompt, completion):
    """log p(completion | prompt) in float64, one token at a time from the full logits."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0][0].double(), dim=-1)  # (T, V)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion))


# ----------------------------------------------------------------------------- DPO


def test_dpo_loss_margins_and_accuracy_equal_a_direct_computation(base_run, dpo_dir, tmp_path):
    cfg = ft_cfg(base_run, tmp_path, task="dpo", task_dir=str(dpo_dir), dpo_beta=0.5, prompt_template="{prompt}")
    policy, meta = FT.load_base(cfg)
    tok = FT.from_meta(meta)
    procs = setup_processes(cfg)
    task = TK.make_task(cfg, procs, tok, meta)
    reference = model_from_checkpoint(load_checkpoint(str(base_run / "ckpt_last.pt")))
    with torch.no_grad():  # the policy moved away from the reference, so both terms count
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    task.reference = TK.FrozenReference(reference.eval())
    policy.eval()
    batch = task.loader.make_batch(range(len(PAIRS)))
    loss, chosen, rejected, _, _ = task.scores(policy, batch)
    margins = []
    for r in PAIRS:
        prompt = [tok.eot_id] + tok.encode(r["prompt"])
        c, j = (tok.encode(r[k]) + [tok.eot_id] for k in ("chosen", "rejected"))
        margins.append(0.5 * ((direct_logprob(policy, prompt, c) - direct_logprob(reference, prompt, c))
                              - (direct_logprob(policy, prompt, j) - direct_logprob(reference, prompt, j))))
    expected = np.mean([math.log1p(math.exp(-m)) for m in margins])  # -log sigmoid(m)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert (chosen - rejected).tolist() == pytest.approx(margins, rel=1e-4, abs=1e-5)
    results = task.evaluate(policy, torch.autocast("cpu", enabled=False))
    assert results["val"] == pytest.approx(expected, rel=1e-5)
    assert results["val_reward_margin"] == pytest.approx(np.mean(margins), rel=1e-4, abs=1e-5)
    assert results["val_preference_accuracy"] == pytest.approx(np.mean([m > 0 for m in margins]))
    # RPO: plus the chosen completions' mean next-token loss
    cfg.set("dpo_sft_weight", 0.5)
    chosen_ids = [tok.encode(r["chosen"]) + [tok.eot_id] for r in PAIRS]
    nll = -sum(direct_logprob(policy, [tok.eot_id] + tok.encode(r["prompt"]), c) for r, c in zip(PAIRS, chosen_ids))
    assert task.scores(policy, batch)[0].item() == pytest.approx(expected + 0.5 * nll / sum(map(len, chosen_ids)),
                                                                 rel=1e-5)
    cfg.set("dpo_sft_weight", 0.0)
    # with the policy equal to the reference every margin is 0: the loss is log 2 for any data
    task.reference = TK.FrozenReference(policy)
    assert task.scores(policy, batch)[0].item() == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_loss_function_is_the_papers():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.2)
    margin = 0.2 * ((-3.0 + 4.0) - (-5.0 + 4.5))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))))
    assert chosen.item() == pytest.approx(0.2) and rejected.item() == pytest.approx(-0.1)


@pytest.mark.parametrize("lora", [0, 4])
def test_dpo_trains_toward_chosen_and_resumes_exactly(base_run, dpo_dir, tmp_path, monkeypatch, lora):
    kw = dict(task="dpo", task_dir=str(dpo_dir), lora_rank=lora, learning_rate=3e-3, dpo_beta=0.5)
    summary = FT.finetune(ft_cfg(base_run, tmp_path / "straight", **kw))
    assert (tmp_path / "straight" / "reference.pt").exists() != bool(lora)  # LoRA: the adapters-off base
    evals = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["val_reward_margin"] > 0 and evals[-1]["val_preference_accuracy"] > 0.5
    assert summary["best"] < math.log(2)
    with stop_after_steps(monkeypatch, 2):
        FT.finetune(ft_cfg(base_run, tmp_path / "split", **kw))
    FT.finetune(ft_cfg(base_run, tmp_path / "split", **{**kw, "init_from": "resume"}))
    a, b = weights(tmp_path / "straight" / "ckpt_last.pt"), weights(tmp_path / "split" / "ckpt_last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_and_rl_start_from_a_multi_token_model(char_data, dpo_dir, addition_dir, tmp_path):
    base = tmp_path / "mtp_base"
    T.train(make_cfg(**BASE, data_dir=str(char_data), out_dir=str(base), max_iters=2, eval_interval=2,
                     mtp_heads=2))
    for name, kw in [("dpo", dict(task="dpo", task_dir=str(dpo_dir))), ("rl", dict(**RL, task_dir=str(addition_dir)))]:
        FT.finetune(ft_cfg(base, tmp_path / name, **kw, max_iters=2))
        ckpt = load_checkpoint(str(tmp_path / name / "ckpt_last.pt"))
        assert ckpt["model_args"]["mtp_heads"] == 1  # preferences and rewards judge head 1, the policy


# ----------------------------------------------------------------------------- RL


def test_group_advantages_compare_each_completion_with_its_siblings():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 4)
    first = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(adv[:4], (first - first.mean()) / (first.std() + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group that all scored alike teaches nothing


def test_rl_loss_is_the_policy_gradient_with_a_group_baseline(base_run, addition_dir, tmp_path, monkeypatch):
    cfg = ft_cfg(base_run, tmp_path, **{**RL, "rl_group_size": 2, "temperature": 0.7}, task_dir=str(addition_dir),
                 rl_kl_coef=0.3)
    policy, meta = FT.load_base(cfg)
    tok = FT.from_meta(meta)
    task = TK.make_task(cfg, setup_processes(cfg), tok, meta)
    reference = model_from_checkpoint(load_checkpoint(str(base_run / "ckpt_last.pt")))
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    task.reference = TK.FrozenReference(reference.eval())
    prompt = [tok.eot_id] + tok.encode("12 plus 3 is ")
    completions = [tok.encode("15") + [tok.eot_id], tok.encode("9")]
    rewards = torch.tensor([1.0, 0.0])
    rows = [EX.completion_example(prompt, c, cfg.block_size)[:2] for c in completions]
    monkeypatch.setattr(task, "rollout", lambda *a: (EX.pad_batch(rows, tok.eot_id), rewards))
    policy.eval()
    loss = task.loss(policy, None)
    loss.backward()
    # direct: -(1/N) sum_i A_i sum_t log pi(t) + kl * (1/N) sum (r/pi - log(r/pi) - 1), at temperature 0.7
    adv = group_advantages(rewards, 2)
    n = sum(len(c) for c in completions)
    expected = 0.0
    for a, c in zip(adv.tolist(), completions):
        ids = torch.tensor([prompt + c])
        with torch.no_grad():
            lp = F.log_softmax(policy(ids)[0][0].double() / 0.7, -1)
            lr = F.log_softmax(reference(ids)[0][0].double() / 0.7, -1)
        for j, t in enumerate(c):
            d = (lr[len(prompt) - 1 + j, t] - lp[len(prompt) - 1 + j, t]).item()
            expected += -a * lp[len(prompt) - 1 + j, t].item() / n + 0.3 * (math.exp(d) - d - 1) / n
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert task.step_metrics() == {"reward": 0.5}


def test_rl_runs_logs_rewards_and_resumes_exactly(base_run, addition_dir, tmp_path, monkeypatch):
    kw = dict(**RL, task_dir=str(addition_dir), rl_kl_coef=0.1, plot=True)
    FT.finetune(ft_cfg(base_run, tmp_path / "straight", **kw))
    rows = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert all("reward" in r for r in rows if r["kind"] == "train")
    assert all(r["val_loss"] == -r["val_reward"] for r in rows if r["kind"] == "eval")
    assert (tmp_path / "straight" / "loss.png").exists() and (tmp_path / "straight" / "reference.pt").exists()
    with stop_after_steps(monkeypatch, 2):
        FT.finetune(ft_cfg(base_run, tmp_path / "split", **kw))
    FT.finetune(ft_cfg(base_run, tmp_path / "split", **{**kw, "init_from": "resume"}))
    a, b = weights(tmp_path / "straight" / "ckpt_last.pt"), weights(tmp_path / "split" / "ckpt_last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same samples: the sampling RNG is checkpointed
    FT.finetune(ft_cfg(base_run, tmp_path / "lora", **kw, lora_rank=2))
    assert not (tmp_path / "lora" / "reference.pt").exists()


def test_rl_raises_the_reward_it_is_given(base_run, addition_dir, tmp_path, monkeypatch):
    """A reward any model can earn quickly: completions that start with a space. RL must raise the
    share of them well above where the base model starts."""
    module = tmp_path / "space_reward.py"
    module.write_text("def reward(prompt, completion):\n    return float(completion.startswith(' '))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    FT.finetune(ft_cfg(base_run, tmp_path / "rl", **{**RL, "reward": "space_reward:reward", "max_new_tokens": 2,
                                                       "rl_group_size": 8},
                       task_dir=str(addition_dir), max_iters=40, eval_interval=40, learning_rate=1e-2,
                       prompt_template="{prompt}"))
    rewards = [r["reward"] for r in read_metrics(tmp_path / "rl" / "metrics.jsonl") if r["kind"] == "train"]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.3, rewards


def test_addition_reward_checks_the_sum():
    assert reward("12 plus 30", " 42 ") == 1.0 and reward("12 plus 30", "43") == 0.0
    assert reward("999 plus 1", "1000") == 1.0
    with pytest.raises(ValueError):
        reward("twelve and thirty", "42")
    splits, _ = addition_splits()
    seen = [{r["prompt"] for r in rows} for rows in splits.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])  # no problem in two splits


def test_bad_inputs_are_one_line(base_run, dpo_dir, addition_dir, tmp_path):
    rl = [f"--init_from={base_run}", f"--out_dir={tmp_path}/o", "--task=rl", f"--task_dir={addition_dir}",
          "--max_new_tokens=4", "--temperature=1.0"]
    bad = tmp_path / "bad"
    write_splits(bad, {"train": [{"prompt": "a", "chosen": "b"}], "val": PAIRS})
    one_line_error(finetune_cli(f"--init_from={base_run}", f"--out_dir={tmp_path}/o", "--task=dpo",
                                f"--task_dir={bad}"), "train.jsonl:1: missing field 'rejected'")
    write_splits(bad, {"train": [{"prompt": "a", "chosen": "b", "rejected": "  "}], "val": PAIRS})
    one_line_error(finetune_cli(f"--init_from={base_run}", f"--out_dir={tmp_path}/o", "--task=dpo",
                                f"--task_dir={bad}"), "record 1: 'rejected' is empty")
    write_splits(bad, {"train": [{"prompt": "a", "chosen": "b", "rejected": "b"}], "val": PAIRS})
    one_line_error(finetune_cli(f"--init_from={base_run}", f"--out_dir={tmp_path}/o", "--task=dpo",
                                f"--task_dir={bad}"), "'chosen' and 'rejected' are the same text")
    one_line_error(finetune_cli(*rl), "task=rl needs reward=module:function")
    one_line_error(finetune_cli(*rl, "--reward=no_such_module:f"), "cannot import no_such_module")
    one_line_error(finetune_cli(*rl, "--reward=prepare.addition:nothing"), "has no function nothing")
    one_line_error(finetune_cli(*rl, "--reward=prepare.addition:reward", "--temperature=0"),
                   "set temperature > 0")
    (tmp_path / "rewards.py").write_text("def boom(p, c):\n    raise KeyError('x')\n"
                                         "def text(p, c):\n    return 'good'\n")
    env_rl = [*rl, f"--task_dir={addition_dir}"]
    for name, words in [("boom", ["raised KeyError"]), ("text", ["returned 'good'", "finite number"])]:
        done = subprocess.run([sys.executable, "finetune.py", *[f"--{k}={v}" for k, v in BASE.items()], *env_rl,
                               f"--reward=rewards:{name}", f"--out_dir={tmp_path}/o_{name}"], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
        one_line_error(done, f"reward=rewards:{name}", *words)
    write_splits(bad, {"train": [{"prompt": "1 plus 2" * 10}], "val": [{"prompt": "1 plus 2"}]})
    one_line_error(finetune_cli(*rl, "--reward=prepare.addition:reward", f"--task_dir={bad}",
                                "--max_new_tokens=10"), "(+ max_new_tokens=10 to answer), longer than block_size=64")


# ----------------------------------------------------------------------------- the bias probe


def test_bias_probe_gaps_equal_direct_scores_and_the_interval_covers_the_mean(base_run, tmp_path):
    rows = [{"a": "The king is wise.", "b": "The queen is wise.", "group": "king/queen"},
            {"a": "He is brave.", "b": "She is brave.", "group": "he/she"},
            {"a": "The lord weeps.", "b": "The lady weeps.", "group": "lord/lady"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(**BASE, out_dir=str(base_run), eval_task="bias", task_file=str(path))
    model, tok, loaded = load_for_inference(cfg, torch.device("cpu"))
    result = E.eval_bias(model, tok, cfg, torch.device("cpu"), loaded.data_dir)
    gaps = [direct_logprob(model, [tok.eot_id], tok.encode(r["a"])) - direct_logprob(model, [tok.eot_id],
                                                                                      tok.encode(r["b"]))
            for r in rows]
    assert result["mean_gap"] == pytest.approx(np.mean(gaps), rel=1e-4)
    assert result["share_a_preferred"] == pytest.approx(np.mean([g > 0 for g in gaps]))
    assert result["ci95_low"] <= result["mean_gap"] <= result["ci95_high"]
    assert result["king/queen"]["mean_gap"] == pytest.approx(gaps[0], rel=1e-4)
    # the data beside the model: the share of king among king + queen in the training split
    counts = load_meta(loaded.data_dir)["stats"]["bias_terms"]["train"]
    assert result["king/queen"]["corpus_share_a"] == pytest.approx(counts["king"] / (counts["king"] + counts["queen"]))


def test_bias_file_is_scored_at_every_evaluation_as_the_probe_scores_it(char_data, base_run, tmp_path):
    """train.py bias_file: each eval row holds the probe's gap and interval, and the last equals
    evaluate.py eval_task=bias on the checkpoint saved at that evaluation; loss.png gains a panel;
    finetune.py too; a classifier, which scores no sentence, refuses it."""
    rows = [{"a": "The king is wise.", "b": "The queen is wise."}, {"a": "He is brave.", "b": "She is brave."},
            {"a": "My lord weeps.", "b": "My lady weeps."}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    T.train(make_cfg(**{**BASE, "plot": True}, data_dir=str(char_data), out_dir=str(out), max_iters=4,
                     eval_interval=2, bias_file=str(path)))
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [2, 4]
    assert all(r["bias_ci95_low"] <= r["bias_gap"] <= r["bias_ci95_high"] for r in evals)
    cfg = make_cfg(**BASE, out_dir=str(out), checkpoint="last", eval_task="bias", task_file=str(path))
    model, tok, loaded = load_for_inference(cfg, torch.device("cpu"))
    assert E.eval_bias(model, tok, cfg, torch.device("cpu"), loaded.data_dir)["mean_gap"] == pytest.approx(
        evals[-1]["bias_gap"], rel=1e-5)
    from PIL import Image
    assert Image.open(out / "loss.png").size == (700, 650)  # two panels: the loss, the probe
    ft = FT.finetune(make_cfg(**BASE, init_from=str(base_run), out_dir=str(tmp_path / "ft"), task="lm",
                              data_dir=str(char_data), max_iters=2, eval_interval=2, bias_file=str(path)))
    assert "bias_gap" in read_metrics(tmp_path / "ft" / "metrics.jsonl")[-1] and ft["model"] is not None
    with pytest.raises(ConfigError, match="a classifier gives none"):
        FT.finetune(make_cfg(**BASE, init_from=str(base_run), out_dir=str(tmp_path / "cls"), task="classify",
                             bias_file=str(path)))


def test_bootstrap_interval_matches_the_normal_approximation():
    values = np.random.default_rng(0).normal(1.0, 2.0, size=400)
    low, high = bootstrap_interval(values, seed=1)
    half = 1.96 * values.std(ddof=1) / math.sqrt(len(values))  # the textbook interval for a large sample
    assert low == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.1 * half)


def test_prepare_counts_the_bias_terms_per_split(char_data):
    from prepare.shakespeare import shakespeare_splits
    stats = load_meta(str(char_data))["stats"]["bias_terms"]
    splits, _ = shakespeare_splits(make_cfg().cache_dir)
    for split in ("train", "test"):
        words = [w for _, text in splits[split] for w in re.findall(r"[a-z]+", text.lower())]  # ASCII words
        for term in ("king", "queen", "he", "she", "mistress"):
            assert stats[split][term] == words.count(term), (split, term)
    terms, count = term_counter("king/queen,He/she")
    assert terms == ["he", "king", "queen", "she"] and count("The KING, the queen's; he. she-wolf") == \
        {"king": 1, "queen": 1, "he": 1, "she": 1}
    assert term_counter("")[1] is None


def reference_term_counts(terms, text):
    """Whole-word, case-blind occurrences by a plain regex: the definition the fast counter keeps."""
    words = "|".join(map(re.escape, sorted(terms, key=len, reverse=True)))
    found = re.findall(rf"(?<![A-Za-z])(?:{words})(?![A-Za-z])", text, re.IGNORECASE)
    return collections.Counter(w.lower() for w in found)


def test_term_counter_equals_a_plain_regex_on_random_text():
    rng = random.Random(0)
    vocabulary = ["he", "she", "her", "hers", "the", "his", "him", "king", "kingdom", "ma'am", "am", "o'er", "er",
                  "sir", "sirrah", "duke", "dukes", "naïve", "日本", "2", "_"]
    for trial in range(200):
        pairs = rng.sample(vocabulary[:14], 4)
        spec = f"{pairs[0]}/{pairs[1]},{pairs[2]}/{pairs[3]}"
        pieces = [rng.choice(vocabulary) for _ in range(rng.randint(0, 30))]
        pieces = [p.upper() if rng.random() < 0.2 else p.title() if rng.random() < 0.2 else p for p in pieces]
        text = "".join(p + rng.choice([" ", "  ", "\n", ", ", "'", "-", "", "_", "3", "é"]) for p in pieces)
        terms, count = term_counter(spec)
        assert count(text) == reference_term_counts(terms, text), (spec, text)


def test_bias_probe_refuses_bad_pairs(base_run, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"a": "The king.", "b": "The king."}) + "\n")
    done = subprocess.run([sys.executable, "evaluate.py", f"--out_dir={base_run}", "--eval_task=bias",
                           f"--task_file={path}", "--device=cpu"], cwd=ROOT, capture_output=True, text=True)
    one_line_error(done, "record 1", "two different, non-empty sentences")


def test_the_shipped_bias_set_swaps_one_term():
    from prepare.bias import bias_pairs
    rows = bias_pairs()
    assert len(rows) >= 100 and len({r["group"] for r in rows}) == 11
    for r in rows:
        a, b = r["a"].lower().split(), r["b"].lower().split()
        differ = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and differ == [tuple(r["group"].split("/"))], r


def test_token_logprobs_at_a_temperature(base_run):
    model = model_from_checkpoint(load_checkpoint(str(base_run / "ckpt_last.pt"))).eval()
    x = torch.tensor([[0, 5, 6, 7]])
    y = torch.tensor([[-1, 6, 7, 8]])
    logp = token_logprobs(model, x, y, temperature=2.0)
    expected = F.log_softmax(model(x)[0][0, 1:] / 2.0, -1)[torch.arange(3), torch.tensor([6, 7, 8])]
    assert logp[0, 0] == 0 and torch.allclose(logp[0, 1:], expected)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["dpo", "rl"])
def test_under_torchrun(base_run, dpo_dir, addition_dir, tmp_path, task):
    """dpo under 2 gloo processes equals 1 process with accumulation 2 (no sampling, no dropout);
    rl runs and checkpoints both processes' sampling RNG."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kw = {**BASE, "init_from": str(base_run), "max_iters": 3, "eval_interval": 3, "dropout": 0.0,
          "gradient_accumulation_steps": 2, "task": task}
    kw.update(task_dir=str(dpo_dir)) if task == "dpo" else kw.update(**RL, task_dir=str(addition_dir))
    args = [f"--{k}={v}" for k, v in kw.items()]
    runs = {"two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]}
    if task == "dpo":
        runs["one"] = [sys.executable]
    for name, launcher in runs.items():
        done = subprocess.run([*launcher, "finetune.py", *args, f"--out_dir={tmp_path / name}"], cwd=ROOT,
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    assert len(load_checkpoint(str(tmp_path / "two" / "ckpt_last.pt"))["rng"]) == 2
    if task == "dpo":
        a, b = weights(tmp_path / "one" / "ckpt_last.pt"), weights(tmp_path / "two" / "ckpt_last.pt")
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
