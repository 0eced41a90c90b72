"""The lm-evaluation-harness adapter, run by the real harness on a local YAML task, offline."""

import json
import types

import pytest
import torch

from conftest import make_cfg
from tokenizer import CharTokenizer

pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (requirements-dev.txt)")
from lm_eval_adapter import HarnessLM, run_harness  # noqa: E402
from test_evaluate import BigramModel  # noqa: E402

TOK = CharTokenizer(list(" abc."))  # ' '=0 a=1 b=2 c=3 .=4, end-of-text=5


def bigram():
    table = torch.full((7, 7), -4.0)
    table[0, 2] = 3.0  # after a space: 'b'
    table[2, 4] = 3.0  # after 'b': '.'
    table[5, 1] = 3.0  # a document starts with 'a'
    return BigramModel(table)


def requests(*args):
    return [types.SimpleNamespace(args=a) for a in args]


def test_requests_directly():
    lm = HarnessLM(bigram(), TOK, "cpu")
    (lp_b, greedy_b), (lp_c, greedy_c) = lm.loglikelihood(requests(("a", " b"), ("a", " c")))
    assert lp_b > lp_c and greedy_b and not greedy_c
    [rolling] = lm.loglikelihood_rolling(requests(("a b.",)))
    parts = lm.loglikelihood(requests(("", "a b.")))[0][0]
    assert rolling == pytest.approx(parts, rel=1e-5)


def test_generate_until_stops_at_the_stop_string():
    from generate import generate
    from model import GPT, GPTConfig
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=32, n_layer=1, n_head=1, n_embd=8)).eval()
    lm = HarnessLM(model, TOK, "cpu")
    full = TOK.decode([t for t in generate(model, [[TOK.eot_id] + TOK.encode("a")], 20, temperature=0)[0]
                       if t != TOK.eot_id])
    stop = next(c for c in full if c in " abc.")
    [text] = lm.generate_until(requests(("a", {"until": [stop], "max_gen_toks": 20})))
    assert text == full.split(stop)[0] and stop not in text


def test_harness_runs_a_local_yaml_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "tiny.jsonl"
    rows = [{"context": "a", "choices": ["b", "c"], "answer": 0}, {"context": "a", "choices": ["c", "b"], "answer": 1},
            {"context": "c", "choices": ["a", "b"], "answer": 1}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny.yaml").write_text(f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    cfg = make_cfg(harness_tasks="tiny_choice", harness_include=str(tmp_path))
    result = run_harness(bigram(), TOK, cfg, "cpu")
    assert result["tiny_choice"]["acc"] == 1.0
