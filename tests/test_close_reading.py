"""The bugs a close reading of the code found (issue 32), each pinned by a test that failed
before its fix."""

from types import SimpleNamespace

import pytest
import torch

from conftest import make_cfg
from errors import ConfigError, DataError
import train as T


def evaluations(values, metric="val_loss", **cfg):
    """Feed a sequence of metric values to state_after_eval; returns [(improved, stop), ...] and
    the state."""
    cfg = make_cfg(best_metric=metric, **cfg)
    state = SimpleNamespace(best=None, baseline=None, since_best=0)
    out = []
    for v in values:
        results = {"train": 0.0, "val": v} if metric == "val_loss" else {"train": 0.0, "val": 0.0, metric: v}
        out.append(T.state_after_eval(state, cfg, results))
    return out, state


def test_early_stopping_sees_a_steady_crawl_below_min_delta():
    """B2: a metric improving by 0.006 per evaluation with min_delta=0.01 improves by 0.012 every
    two evaluations: the count must reset, not stop the run after 0.018 of improvement."""
    losses = [2.0 - 0.006 * i for i in range(12)]
    steps, state = evaluations(losses, patience=3, min_delta=0.01)
    assert not any(stop for _, stop in steps)
    assert all(improved for improved, _ in steps) and state.best == losses[-1]


def test_early_stopping_still_stops_on_a_plateau():
    steps, _ = evaluations([2.0, 1.5, 1.499, 1.498, 1.497], patience=3, min_delta=0.01)
    assert [stop for _, stop in steps] == [False, False, False, False, True]


def test_head_losses_are_minimised_like_val_loss():
    """A multi-token head's val_headN is a loss: lower is better (it was maximised)."""
    steps, state = evaluations([3.0, 3.5, 2.5], metric="val_head2")
    assert [improved for improved, _ in steps] == [True, False, True] and state.best == 2.5
    steps, state = evaluations([0.5, 0.4, 0.7], metric="val_accuracy")
    assert [improved for improved, _ in steps] == [True, False, True] and state.best == 0.7


def test_self_speculative_decoding_equals_greedy_with_a_sliding_window():
    """B1: rejected drafts stay in the cache as holes; the window must count positions (real
    tokens), not cache slots, or speculative decoding differs from greedy decoding. The model
    learns a stream where the token after 0 depends on the one before the 0, so what a 3-token
    window holds decides the output (4 of these 20 prompts differed)."""
    from generate import generate, speculative_generate
    from test_mtp import mtp_model
    torch.manual_seed(1)
    m = mtp_model(3, attn_window=3)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.tensor([0, 1, 0, 2, 0, 3] * 11)[:64].view(2, 32)
    for _ in range(150):
        loss = m(x, torch.roll(x, -1, 1))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    prompts = [[0, 1 + i % 3, 0][: 1 + i % 3] if i % 2 else [i % 3 + 1, 0] for i in range(20)]
    spec, accepted, proposed = speculative_generate(m, prompts, 20)
    assert 0 < accepted < proposed  # some drafts are rejected: the cache has holes
    assert spec == generate(m, prompts, 20, temperature=0)


def test_lora_gives_the_kept_multi_token_heads_adapters():
    """B3: with keep_mtp_heads the heads' losses stay in the objective, so their blocks need
    adapters like the trunk's (they were left frozen, untrainable)."""
    from adapters import add_lora
    from test_mtp import mtp_model
    m = mtp_model(3)
    n = add_lora(m, rank=2, alpha=4, dropout=0.0, targets=["c_attn", "c_proj"])
    assert n == 3 * (m.config.n_layer + 2)  # c_attn, attn.c_proj and mlp.c_proj of every block
    for name, p in m.named_parameters():
        p.requires_grad_("lora_" in name)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # away from zero, so every adapter gets a gradient
    x = torch.randint(0, 97, (2, 16))
    m(x, torch.roll(x, -1, 1))[1].backward()
    heads = {n for n, p in m.named_parameters() if n.startswith("mtp.") and p.grad is not None}
    assert any("lora_A" in n for n in heads) and all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_a_decoder_refuses_first_token_pooling():
    """B4: in a causal model position 0 (end-of-text) sees only itself, so classify_pool=first
    made a classifier that ignores its input."""
    from finetune import check_task_fits
    with pytest.raises(ConfigError, match="classify_pool=first"):
        check_task_fits(make_cfg(task="classify", classify_pool="first"), "gpt")
    check_task_fits(make_cfg(task="classify", classify_pool="first"), "bert")
    check_task_fits(make_cfg(task="classify", classify_pool="last"), "gpt")


def test_a_new_dropout_rate_reaches_the_lstm_between_layers():
    """B5: set_dropout changed nn.Dropout layers and the config but not nn.LSTM's inter-layer
    dropout, while a resume rebuilds the LSTM from the config: a resumed run trained another
    model. Now the config is the one owner (with_dropout builds the model with the new rate), so
    the model and a rebuild from its config agree everywhere, with the same weights."""
    from finetune import with_dropout
    from model import GPTConfig
    from rnn import LSTMLM
    base = LSTMLM(GPTConfig(arch="lstm", vocab_size=50, n_layer=2, n_head=1, n_embd=16, dropout=0.0))
    m = with_dropout(base, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), m.state_dict().values()))
    rebuilt = LSTMLM(m.config)

    def rates(model):
        return [getattr(x, "p", None) or getattr(x, "dropout", None) for x in model.modules()
                if isinstance(x, (torch.nn.Dropout, torch.nn.LSTM))]
    assert rates(m) == rates(rebuilt) == [0.3, 0.3]


@pytest.mark.parametrize("kw", [dict(dropout=0.1), dict(lora_rank=4, lora_dropout=0.1)])
@pytest.mark.parametrize("task", ["dpo", "rl"])
def test_preference_and_rl_refuse_dropout(task, kw):
    """The policy was scored with dropout on, its reference with it off: at step 0 the DPO loss
    was 0.6918, not log 2. Both now run without it, or the settings are refused."""
    from finetune import check_task_fits
    with pytest.raises(ConfigError, match="dropout=0"):
        check_task_fits(make_cfg(task=task, reward="prepare.addition:reward", temperature=1.0, **kw), "gpt")


def test_zero_shot_prompts_start_with_end_of_text(tmp_path):
    """Every prompt opens a document with end-of-text, as in training; zero-shot classification's
    prompts lacked it."""
    import json

    import evaluate as E
    from test_evaluate import BigramModel
    from tokenizer import CharTokenizer
    tok = CharTokenizer(list("abc :"))
    seen = []

    class Spy(BigramModel):
        def forward(self, x):
            seen.append(x[0, 0].item())
            return super().forward(x)
    task = tmp_path / "cls.jsonl"
    task.write_text(json.dumps({"text": "c", "label": "a"}) + "\n" + json.dumps({"text": "a", "label": "b"}) + "\n")
    E.eval_classify(Spy(torch.zeros(8, 8)), tok, make_cfg(task_file=str(task), classify_template="{text}:"),
                    "cpu", tmp_path)
    assert seen and set(seen) == {tok.eot_id}


def test_a_choice_task_with_one_choice_is_a_data_error(tmp_path):
    import json

    import evaluate as E
    from test_evaluate import BigramModel
    from tokenizer import CharTokenizer
    task = tmp_path / "mc.jsonl"
    task.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "answer": 0}) + "\n"
                    + json.dumps({"context": "a", "choices": ["b"], "answer": 0}) + "\n")
    with pytest.raises(DataError, match="record 2: 'choices' must list at least two"):
        E.eval_choice(BigramModel(torch.zeros(8, 8)), CharTokenizer(list("abc")), make_cfg(task_file=str(task)),
                      "cpu")


def test_bits_per_character_streams_the_split():
    """eval_lm's character count decoded the whole split as one Python list: a FineWeb-size test
    split needed its size in RAM. It now decodes chunks cut at document boundaries, with the
    same counts."""
    import numpy as np

    import evaluate as E
    from tokenizer import CharTokenizer
    tok = CharTokenizer(list("abcdé "))
    docs = ["abc dé", "ééa", "", "b" * 40, "cab"]
    ids = np.array([t for d in docs for t in [tok.eot_id] + tok.encode(d)], dtype=np.uint16)
    decoded = []
    real_decode = tok.decode
    tok.decode = lambda ids: decoded.append(len(ids)) or real_decode(ids)
    for chunk in (5, 9, 1000):
        decoded.clear()
        n_chars, n_bytes = E.text_length(tok, ids, first=1, chunk=chunk)
        text = "".join(docs)  # ids[1:]: every document's text and the four end-of-texts after the first
        assert (n_chars, n_bytes) == (len(text) + 4, len(text.encode()) + 4)
        assert max(decoded) <= chunk


def test_fine_tuning_with_new_weights_is_reproducible(base_run, char_data, tmp_path):
    """LoRA's A matrices and a classifier head were drawn from torch's unseeded start-up RNG, so
    two identical fine-tuning runs (or two processes of one) started from different weights.
    seed now decides them, as it decides a fresh model's."""
    from conftest import TINY_BASE
    from finetune import build_finetune_model, load_base
    weights = []
    for _ in range(2):
        torch.manual_seed(int(torch.randint(1 << 30, ())) + len(weights))  # whatever state the process is in
        cfg = make_cfg(**TINY_BASE, init_from=str(base_run), data_dir=str(char_data), out_dir=str(tmp_path),
                       task="lm", lora_rank=4)
        model, _ = build_finetune_model(cfg, load_base(cfg)[0], None)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
