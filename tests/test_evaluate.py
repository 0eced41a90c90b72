import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoint import build_model
from conftest import ROOT, make_cfg
from data import DataError
import evaluate as E
from examples import read_jsonl
from model import GPTConfig
from prepare.common import write_dataset
from scoring import classification_report, continuation_score, lm_metrics, sequence_logprob
from tokenizer import CharTokenizer


def model_of(**kw):
    torch.manual_seed(0)
    c = GPTConfig(**{**dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16), **kw})
    return build_model(c).eval()


def last_logprob(model, context, target):
    """log p(target | context) from one forward over exactly `context`, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([context]))[0][0, -1].double()
    return F.log_softmax(logits, dim=-1)[target].item()


@pytest.mark.parametrize("n, stride", [(100, 1), (100, 5), (100, 12), (61, 7), (9, 8), (2, 16)])
def test_sliding_window_equals_per_token_reference(n, stride):
    """Windows of 16 tokens start at 0, stride, 2*stride, ...; token t is scored once, in the
    first window that reaches it, given everything from that window's start. The reference
    runs the model once per token on exactly that context. The model has two layers, so its
    predictions depend on the context: throwing the windows' overlap away changes the total."""
    m = model_of()
    ids = np.random.default_rng(0).integers(0, 50, n).astype(np.uint16)
    total, count, _ = lm_metrics(m, ids, stride, 4, torch.device("cpu"), progress=False)
    reference = 0.0
    for t in range(1, n):
        begin = max(0, -(-(t - 16) // stride)) * stride
        assert t - begin >= min(t, 16 - stride)  # every token keeps block_size - stride tokens of context
        reference -= last_logprob(m, ids[begin:t].tolist(), int(ids[t]))
    assert count == n - 1
    assert total == pytest.approx(reference, rel=1e-5)
    assert math.exp(total / count) == pytest.approx(math.exp(reference / (n - 1)), rel=1e-5)


def test_continuation_longer_than_the_context_is_scored_in_windows():
    """A multiple-choice answer of 30 tokens under a 16-token window: each answer token gets at
    least 8 tokens of context (the window advances by 8), the first one the longest context
    that leaves it so; greedy is judged on every token."""
    m = model_of()
    context, answer = list(range(1, 6)), [int(i) for i in np.random.default_rng(3).integers(0, 50, 30)]
    score, greedy = continuation_score(m, context, answer, torch.device("cpu"))
    ids, first = context + answer, len(context)
    start = max(0, min(first - 1 - 8, len(ids) - 1 - 16))
    reference = 0.0
    for t in range(first, len(ids)):
        begin = start + max(0, -(-(t - 16 - start) // 8)) * 8
        assert t - begin >= min(t, 8)
        reference += last_logprob(m, ids[begin:t], ids[t])
    assert score == pytest.approx(reference, rel=1e-5) and greedy is False
    short, _ = continuation_score(m, context, answer[:3], torch.device("cpu"))  # fits: one forward, full context
    assert short == pytest.approx(sum(last_logprob(m, (context + answer)[:t], answer[t - 5]) for t in range(5, 8)),
                                  rel=1e-5)


def test_each_multi_token_head_is_scored():
    """Head h (1-based) at every scored position predicts the token h steps ahead, where the
    window holds it; with stride = block the windows are independent chunks, computed by hand."""
    m = model_of(mtp_heads=3)
    ids = np.random.default_rng(2).integers(0, 50, 40).astype(np.uint16)
    total, count, heads = lm_metrics(m, ids, 16, 2, torch.device("cpu"), progress=False)
    sums, counts = [0.0] * 3, [0] * 3
    for begin in range(0, 39, 16):
        end = min(begin + 16, 39)
        x = torch.from_numpy(ids[begin:end].astype(np.int64))[None]
        y = torch.from_numpy(ids[begin + 1:end + 1].astype(np.int64))
        for h, logits in enumerate(m.multi_head_logits(x)):
            n = end - begin - h
            sums[h] += F.cross_entropy(logits[0, :n], y[h:], reduction="sum").item()
            counts[h] += n
    assert heads == pytest.approx([s / c for s, c in zip(sums, counts)], rel=1e-5)
    assert total / count == pytest.approx(heads[0]) and count == 39
    assert lm_metrics(model_of(), ids, 16, 2, torch.device("cpu"), progress=False)[2] == []


def test_stride_equal_to_block_and_short_text():
    m = model_of()
    ids = np.random.default_rng(1).integers(0, 50, 40).astype(np.uint16)
    total, count, _ = lm_metrics(m, ids, 16, 2, torch.device("cpu"), progress=False)
    expected = 0.0
    for begin in range(0, 39, 16):  # independent chunks of 16 targets
        end = min(begin + 16, 39)
        x = torch.from_numpy(ids[begin:end].astype(np.int64))[None]
        y = torch.from_numpy(ids[begin + 1:end + 1].astype(np.int64))
        expected += F.cross_entropy(m(x)[0][0], y, reduction="sum").item()
    assert count == 39 and total == pytest.approx(expected, rel=1e-5)
    short = ids[:10]  # shorter than one window: a single forward pass
    total, count, _ = lm_metrics(m, short, 8, 2, torch.device("cpu"), progress=False)
    x = torch.from_numpy(short[:-1].astype(np.int64))[None]
    ref = F.cross_entropy(m(x)[0][0], torch.from_numpy(short[1:].astype(np.int64)), reduction="sum").item()
    assert count == 9 and total == pytest.approx(ref, rel=1e-5)


def test_bits_per_character_on_a_char_model(tmp_path):
    docs = {"train": [("a", "To be, or not to be: that is the question.")],
            "val": [("b", "Whether 'tis nobler in the mind to suffer")], "test": [("c", "The slings and arrows é")]}
    cfg = make_cfg(data_dir=str(tmp_path), tokenizer="char", eval_stride=4, batch_size=4)
    tok = CharTokenizer.train(docs["train"][0][1])
    meta = write_dataset(docs, tok, cfg, {})
    tok = CharTokenizer(meta["tokenizer"]["chars"])
    m = model_of(vocab_size=tok.vocab_size)
    r = E.eval_lm(m, tok, cfg, str(tmp_path), torch.device("cpu"))
    assert r["bits_per_char"] == pytest.approx(r["loss"] / math.log(2), rel=1e-9)
    assert r["bits_per_byte"] < r["bits_per_char"]  # 'é' is two bytes
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))


class EchoModel:
    """Stands in for a GPT in eval_generate: 'generates' a fixed answer per prompt."""

    def __init__(self, tok, answers):
        self.tok, self.answers = tok, answers

    def generate(self, prompts, max_new_tokens, *args, **kw):
        assert all(p[0] == self.tok.eot_id for p in prompts)  # a prompt starts a document, as in fine-tuning
        return [self.tok.encode(self.answers[self.tok.decode(p[1:])]) + [self.tok.eot_id] for p in prompts]


def test_bleu_matches_sacrebleu(tmp_path, monkeypatch):
    sacrebleu = pytest.importorskip("sacrebleu")
    monkeypatch.setattr(E, "generate", lambda model, prompts, *a, **k: model.generate(prompts, *a, **k))
    rows = [{"prompt": "thou art", "completion": "you are"}, {"prompt": "good morrow", "completion": "good morning"},
            {"prompt": "what say'st thou", "completion": "what do you say"}]
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = CharTokenizer.train("".join(r["prompt"] + r["completion"] for r in rows) + "\n#: ")
    cfg = make_cfg(task_file=str(task), prompt_template="{prompt}\n", temperature=0.0)
    show = lambda r: cfg.prompt_template.format(prompt=r["prompt"])  # noqa: E731
    perfect = E.eval_generate(EchoModel(tok, {show(r): r["completion"] for r in rows}), tok, cfg, "cpu", tmp_path)
    assert perfect["bleu"] == pytest.approx(100.0)
    copied = E.eval_generate(EchoModel(tok, {show(r): r["prompt"] for r in rows}), tok, cfg, "cpu", tmp_path)
    ref = sacrebleu.corpus_bleu([r["prompt"] for r in rows], [[r["completion"] for r in rows]]).score
    assert copied["bleu"] == pytest.approx(ref) == pytest.approx(copied["copy_baseline_bleu"])
    disjoint = E.eval_generate(EchoModel(tok, {show(r): "mmm" for r in rows}), tok, cfg, "cpu", tmp_path)
    assert disjoint["bleu"] < 1.0
    saved = [json.loads(line) for line in (tmp_path / "generations_test.jsonl").read_text().splitlines()]
    assert [s["output"] for s in saved] == ["mmm"] * 3


def test_f1_with_a_class_never_predicted():
    gold = ["a", "a", "b", "b", "c", "c"]
    pred = ["a", "b", "b", "b", "a", "a"]
    r = classification_report(gold, pred, ["a", "b", "c"])
    # a: tp 1, predicted 3, actual 2 -> p 1/3, r 1/2, f1 0.4; b: tp 2, pred 3 -> p 2/3, r 1, f1 0.8; c: 0
    assert r["per_class"]["a"]["f1"] == pytest.approx(0.4)
    assert r["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert r["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert r["macro_f1"] == pytest.approx(0.4) and r["accuracy"] == pytest.approx(0.5)
    assert r["confusion"] == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]


class BigramModel(torch.nn.Module):
    """A hand-built LM: the next token's logits depend only on the current token."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.config = GPTConfig(vocab_size=table.shape[0], block_size=32, n_layer=1, n_head=1, n_embd=8)

    def forward(self, x):
        return self.table[x], None


def test_multiple_choice_raw_and_length_normalised(tmp_path):
    tok = CharTokenizer(list("abcx"))  # a=0 b=1 c=2 x=3
    table = torch.full((6, 6), -10.0)
    table[0, 1], table[1, 1] = 0.0, 0.0       # after 'a' and 'b': 'b' is the likeliest
    table[0, 2] = -1.0                         # after 'a': 'c' is second best
    table[2, 3], table[1, 3] = 0.0, -1.0       # after 'c': 'x' likely; after 'b': less so
    rows = [{"context": "a", "choices": ["c", "b"], "answer": 1},        # one token: b beats c
            {"context": "a", "choices": ["bbbbx", "cx"], "answer": 0}]   # raw prefers short 'cx'
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(task_file=str(task))
    r = E.eval_choice(BigramModel(table), tok, cfg, "cpu")
    scores = {c: sequence_logprob(BigramModel(table), [0], tok.encode(c), "cpu") for c in ("bbbbx", "cx")}
    assert scores["cx"] > scores["bbbbx"] and scores["bbbbx"] / 5 > scores["cx"] / 2
    assert r["accuracy"] == 0.5 and r["accuracy_length_normalised"] == 1.0


def test_zero_shot_classification_uses_label_likelihood(tmp_path):
    tok = CharTokenizer(list("abc :\n{}texLl"))
    table = torch.full((16, 16), -5.0)
    a, space = tok.encode("a")[0], tok.encode(" ")[0]
    table[space, a] = 5.0  # after a space, 'a' is the likely label
    rows = [{"text": "c", "label": "a"}, {"text": "c", "label": "b"}]
    task = tmp_path / "cls.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = E.eval_classify(BigramModel(table), tok, make_cfg(task_file=str(task), classify_template="{text}:"),
                        "cpu", tmp_path)
    assert r["confusion"] == [[1, 0], [1, 0]] and r["method"] == "zero-shot label likelihood"
    assert (tmp_path / "confusion_test.png").stat().st_size > 1000
    r = E.eval_classify(None, tok, make_cfg(task_file=str(task)), "cpu", tmp_path, classifier=lambda t: ("b", False),
                        labels=["a", "b"])
    assert r["method"] == "classification head" and r["accuracy"] == 0.5


def test_task_file_errors_name_the_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "x", "label": "a"}\n{"text": "y"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: missing field 'label'"):
        read_jsonl(str(f), ["text", "label"])
    f.write_text('{"text": "x", "label": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: not valid JSON"):
        read_jsonl(str(f), ["text", "label"])
    f.write_text("\n")
    with pytest.raises(DataError, match="empty task file"):
        read_jsonl(str(f), ["text"])
    f.write_text('{"text": "x", "label": "poem"}\n')
    with pytest.raises(DataError, match=r"record 1 has label 'poem', not in the label set"):
        E.eval_classify(None, None, make_cfg(task_file=str(f)), "cpu", tmp_path, classifier=lambda t: ("a", False),
                        labels=["a", "b"])


def evaluate_cli(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_errors_are_one_line(tmp_path, char_data):
    done = evaluate_cli(f"--out_dir={tmp_path}/none")
    assert done.returncode == 1 and done.stderr.strip().startswith("error: ") and "no checkpoint" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = evaluate_cli("--compare", str(tmp_path))
    assert done.returncode == 1 and "two run folders" in done.stderr


@pytest.mark.slow
def test_end_to_end_report_and_compare(char_data, tmp_path):
    import train as T
    runs = []
    for name, lr in (("a", 3e-3), ("b", 1e-3)):
        out = tmp_path / name
        T.train(make_cfg(data_dir=str(char_data), out_dir=str(out), n_layer=1, n_head=2, n_embd=16, block_size=32,
                         batch_size=4, max_iters=4, eval_interval=2, eval_iters=1, learning_rate=lr, device="cpu",
                         plot=False))
        runs.append(out)
    (runs[0] / "loss.png").unlink(missing_ok=True)
    old = tmp_path / "old_data"  # a folder from before shards and test splits: {train,val}.bin, no test.bin
    old.mkdir()
    meta = json.loads((char_data / "meta.json").read_text())
    del meta["shards"]
    (old / "meta.json").write_text(json.dumps(meta))
    for split in ("train", "val"):
        (old / f"{split}.bin").write_bytes((char_data / f"{split}_00000.bin").read_bytes())
    done = evaluate_cli(f"--out_dir={runs[0]}", f"--data_dir={old}", "--eval_stride=32", "--batch_size=64")
    assert done.returncode == 1 and "old_data/test.bin: missing" in done.stderr  # a data_dir named wins
    done = evaluate_cli(f"--out_dir={runs[0]}", "--eval_stride=32", "--batch_size=64")
    assert done.returncode == 0, done.stderr  # else the checkpoint's own data_dir
    done = evaluate_cli(f"--out_dir={runs[1]}", "--eval_stride=32", "--batch_size=64")
    assert done.returncode == 0, done.stderr
    result = json.loads((runs[0] / "eval.json").read_text())
    entry = next(iter(result.values()))
    assert entry["split"] == "test" and entry["tokenizer"] == "char" and entry["checkpoint"].endswith("ckpt_best.pt")
    assert (runs[0] / "loss.png").exists() and "bits_per_char" in (runs[0] / "eval.md").read_text()
    done = evaluate_cli("--compare", str(runs[0]), str(runs[1]))
    assert done.returncode == 0 and "perplexity" in done.stdout
    import shutil
    shutil.copy(runs[0] / "ckpt_best.pt", tmp_path / "ckpt_best.pt")
    ck = torch.load(tmp_path / "ckpt_best.pt", weights_only=True)
    ck["config"]["data_dir"] = str(old)
    (tmp_path / "c").mkdir()
    torch.save(ck, tmp_path / "c" / "ckpt_best.pt")
    done = evaluate_cli(f"--out_dir={tmp_path / 'c'}")
    assert done.returncode == 1 and "test.bin: missing" in done.stderr and "re-run the prepare" in done.stderr


def test_choices_longer_than_the_context_do_not_crash(tmp_path):
    tok = CharTokenizer(list("abcdefgh "))
    m = model_of(vocab_size=tok.vocab_size)  # a 16-token window
    rows = [{"context": "abc ", "choices": ["abcdefgh" * 4, "hgfedcba" * 3], "answer": 0},
            {"context": "", "choices": ["a", "b"], "answer": 1}]
    task = tmp_path / "long.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = E.eval_choice(m, tok, make_cfg(task_file=str(task)), "cpu")
    assert r["examples"] == 2 and 0 <= r["accuracy"] <= 1


def test_classification_reports_truncated_texts(tmp_path):
    tok = CharTokenizer(list("abc :\n{}texLl"))
    m = model_of(vocab_size=tok.vocab_size)
    rows = [{"text": "ab" * 30, "label": "a"}, {"text": "c", "label": "b"}]
    task = tmp_path / "cls.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = E.eval_classify(m, tok, make_cfg(task_file=str(task)), "cpu", tmp_path)
    assert r["truncated"] == 1
    from adapters import GPTClassifier
    classifier = GPTClassifier(m.config, 2).eval()
    head = E.head_classifier(classifier, tok, ["a", "b"], "cpu")
    assert head("ab")[1] is False and head("ab" * 30)[1] is True


def test_evaluate_runs_under_the_configured_autocast(char_data, tmp_path, monkeypatch):
    """Like training, evaluation computes in the configured dtype (bf16 here, on the CPU)."""
    import train as T
    T.train(make_cfg(data_dir=str(char_data), out_dir=str(tmp_path), n_layer=1, n_head=2, n_embd=16, block_size=32,
                     batch_size=4, max_iters=2, eval_interval=2, eval_iters=1, device="cpu", plot=False))
    seen = []
    real = E.load_for_inference

    def spying(cfg, device):
        model, tok, loaded = real(cfg, device)
        model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        return model, tok, loaded
    monkeypatch.setattr(E, "load_for_inference", spying)
    E.main([f"--out_dir={tmp_path}", "--dtype=bfloat16", "--eval_stride=32", "--batch_size=256", "--device=cpu"])
    assert seen and all(seen)
    assert json.loads((tmp_path / "eval.json").read_text())["lm:" + char_data.name + ":test"]["dtype"] == "bfloat16"


def test_a_stride_past_the_context_is_recorded_as_the_stride_that_ran(char_data):
    """eval_stride is capped at block_size when scoring; the result said the requested value."""
    from data import load_meta
    from tokenizer import from_meta
    model = build_model(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=86)).eval()
    cfg = make_cfg(eval_stride=1000, eval_split="val", batch_size=64)
    tok = from_meta(load_meta(str(char_data))["tokenizer"])
    result = E.eval_lm(model, tok, cfg, str(char_data), torch.device("cpu"))
    assert result["stride"] == 16 and result["context"] == 16
