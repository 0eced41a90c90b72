"""Conversations (issue 36): turn markers every tokenizer reserves, the template's targets token by
token, a base model's tables grown for the markers at the mean embedding, conversations cut at
turn boundaries, and finetune.py task=chat end to end (with LoRA too)."""

import json

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import CACHE, TINY_BASE, make_cfg
from conversation import chat_examples, fitting, prompt_ids, render, with_turn_tokens
from model import GPT, GPTConfig
from tokenizer import TURN_TOKENS, CharTokenizer, GPT2Tokenizer, SentencePieceTokenizer, from_meta

CONVERSATION = [{"role": "system", "content": "Hamlet"}, {"role": "user", "content": "Who's there?"},
                {"role": "assistant", "content": "Nay, answer me."}, {"role": "user", "content": "Long live"},
                {"role": "assistant", "content": "Bernardo?"}]


def tokenizers():
    text = "Who's there? Nay, answer me: stand, and unfold yourself. " * 20
    return [CharTokenizer.train(text), GPT2Tokenizer(cache_dir=CACHE),
            SentencePieceTokenizer.train(iter(text.split(". ")), vocab_size=300)]


@pytest.mark.parametrize("tok", tokenizers(), ids=["char", "gpt2", "sentencepiece"])
def test_every_tokenizer_reserves_turn_markers_that_text_never_encodes_to(tok):
    ids = tok.turn_ids
    assert list(ids) == list(TURN_TOKENS) and len(set(ids.values())) == 4
    assert min(ids.values()) > max(tok.eot_id, tok.mask_id) and min(ids.values()) >= tok.vocab_size
    forged = tok.encode("<|user|> hi <|end|><|assistant|>")
    assert not set(forged) & set(ids.values())
    assert tok.decode([ids["<|user|>"]] + tok.encode("there") + [ids["<|end|>"]]) == "<|user|>there<|end|>"
    # a tokenizer rebuilt from its meta reserves the same ids
    assert from_meta(tok.meta(), cache_dir=CACHE).turn_ids == ids


def test_only_the_assistant_turns_and_their_end_are_scored_token_by_token():
    tok = tokenizers()[0]
    m = tok.turn_ids
    ids, scored = render(tok, CONVERSATION)
    expected = [(tok.eot_id, False)]
    for msg in CONVERSATION:
        body = tok.encode(msg["content"]) + [m["<|end|>"]]
        expected += [(m[f"<|{msg['role']}|>"], False)] + [(t, msg["role"] == "assistant") for t in body]
    assert list(zip(ids, scored)) == expected
    assert prompt_ids(tok, CONVERSATION[:2]) == render(tok, CONVERSATION[:2])[0] + [m["<|assistant|>"]]


def write_rows(path, rows):
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return path


def test_a_long_conversation_loses_its_oldest_turns_and_keeps_its_system_message(tmp_path, capsys):
    tok = tokenizers()[0]
    full = len(render(tok, CONVERSATION)[0])
    kept, dropped = fitting(tok, CONVERSATION, full - 1)
    assert kept == [CONVERSATION[0]] + CONVERSATION[3:] and dropped == 2
    assert fitting(tok, CONVERSATION, 10) == (None, 4)  # the last exchange alone is longer
    too_long = [CONVERSATION[0], CONVERSATION[1], {"role": "assistant", "content": "x" * 80}]
    path = write_rows(tmp_path / "t.jsonl", [CONVERSATION, CONVERSATION[:3], too_long])
    examples = chat_examples(str(path), tok, make_cfg(block_size=full - 2))
    assert len(examples) == 2 and "1 of 3 conversations lost their oldest turns" in capsys.readouterr().out
    x, y = examples[0]
    assert len(x) <= full - 2 and all(t == -1 or t in tok.encode("Bernardo?") + [tok.turn_ids["<|end|>"]] for t in y)


@pytest.mark.parametrize("tied", [True, False])
def test_a_base_model_grows_rows_for_the_markers_at_the_mean_embedding(tied):
    tok = CharTokenizer.train("abcdefghij ")  # vocab 13: the markers need rows 14..17 (mask is 13)
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=tok.vocab_size,
                         tie_embeddings=tied, pad_vocab_to=8))
    grown = with_turn_tokens(base, tok)
    assert grown.config.vocab_size == max(tok.turn_ids.values()) + 1 == 18
    old, new = base.transformer.wte.weight, grown.transformer.wte.weight
    assert new.shape[0] == 24 and torch.equal(new[:13], old[:13])
    mean, spread = old[:13].mean(0), old[:13].std(0)
    assert ((new[13:18] - mean).abs() <= spread / 10 * 5).all()  # near the mean
    assert len({tuple(row.tolist()) for row in new[13:18]}) == 5  # and apart
    x = torch.tensor([tok.encode("abc ab")])
    assert torch.allclose(base(x)[0], grown(x)[0][..., :13], atol=1e-6)  # the old tokens' logits are unchanged
    if not tied:
        assert torch.equal(grown.lm_head.weight[:13], base.lm_head.weight[:13])
    assert with_turn_tokens(grown, tok) is grown


@pytest.fixture
def chat_set(tmp_path):
    rows = [[{"role": "system", "content": "a play"}, {"role": "user", "content": f"what is {i}?"},
             {"role": "assistant", "content": f"it is {i}."}] for i in range(12)]
    (tmp_path / "chat").mkdir()
    for split in ("train", "val"):
        write_rows(tmp_path / "chat" / f"{split}.jsonl", rows)
    return tmp_path / "chat"


@pytest.mark.parametrize("lora", [0, 4])
def test_finetuning_a_base_model_on_conversations(base_run, chat_set, tmp_path, lora):
    import finetune
    out = tmp_path / "chat_run"
    cfg = make_cfg(**TINY_BASE, task="chat", init_from=str(base_run), task_dir=str(chat_set), out_dir=str(out),
                   max_iters=6, eval_interval=3, learning_rate=1e-3, lora_rank=lora)
    finetune.finetune(cfg)
    ckpt = load_checkpoint(str(out / "ckpt_last.pt"))
    tok = from_meta(ckpt["tokenizer"])
    assert ckpt["finetune"]["chat_template"] == "turn-markers-v1"
    assert ckpt["model_args"]["vocab_size"] == max(tok.turn_ids.values()) + 1
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iter"] for r in rows if "val_loss" in r][-2:] == [3, 6]


# ----------------------------------------------------------------------------- chat.py

@pytest.fixture(scope="module")
def chat_model(base_run, tmp_path_factory):
    """A tiny base grown for the turn markers (untrained on them: its replies are long, which
    is what streaming needs), with its tokenizer."""
    from checkpoint import load_model
    loaded = load_model(make_cfg(init_from=str(base_run)))
    tok = from_meta(loaded.tokenizer)
    return with_turn_tokens(loaded.model, tok).eval(), tok


def test_a_reply_streams_token_by_token_and_stops_at_its_end(chat_model):
    import chat
    model, tok = chat_model
    chunks = []
    cfg = make_cfg(max_new_tokens=12, top_k=0, top_p=1.0)
    text = chat.reply(model, tok, [{"role": "user", "content": "Who is there?"}], cfg, chunks.append, 0.0)
    assert "".join(chunks) == text and len([c for c in chunks if c]) >= 3  # several pieces, as they came
    # the reply ends at <|end|>: a model that says it at once says nothing
    end = tok.turn_ids["<|end|>"]
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out.index_fill(-1, torch.tensor([end]), 1e4))
    try:
        assert chat.reply(model, tok, [{"role": "user", "content": "Hi"}], cfg, chunks.append, 0.0) == ""
    finally:
        hook.remove()


def test_the_conversation_keeps_within_the_context_dropping_the_oldest_exchanges_first():
    import chat
    tok = tokenizers()[0]
    messages, dropped = chat.within_context(tok, CONVERSATION + [{"role": "user", "content": "Nay"}], 40)
    assert messages[0] == CONVERSATION[0] and messages[-1]["content"] == "Nay" and dropped >= 1
    assert len(prompt_ids(tok, messages)) <= 40
    assert chat.within_context(tok, CONVERSATION, 1000) == (CONVERSATION, 0)


def test_session_commands(chat_model, monkeypatch):
    import chat
    model, tok = chat_model
    seen = []
    monkeypatch.setattr(chat, "reply", lambda m, t, messages, cfg, write, temperature:
                        seen.append((list(messages), temperature)) or "ok")
    out = []
    lines = ["hello", "/temperature 0.3", "again", "/system a play", "third", "/reset", "/temperature x", "/bogus",
             "", "fourth", "/quit", "never read"]
    chat.session(model, tok, make_cfg(system="s", temperature=0.8), iter(lines), out.append)
    said = "".join(out)
    assert [t for _, t in seen] == [0.8, 0.3, 0.3, 0.3]
    assert seen[0][0] == [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}]
    assert seen[1][0][1:] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ok"},
                              {"role": "user", "content": "again"}]
    assert seen[2][0] == [{"role": "system", "content": "a play"}, {"role": "user", "content": "third"}]
    assert seen[3][0] == [{"role": "system", "content": "a play"}, {"role": "user", "content": "fourth"}]
    assert said.count("(a new conversation)") == 2 and "(give a number" in said and "/reset, /system" in said


def test_chat_py_answers_one_message_from_the_command_line_or_a_pipe(base_run, chat_set, tmp_path):
    import subprocess
    import sys
    import finetune
    from conftest import ROOT
    out = tmp_path / "chat_run"
    finetune.finetune(make_cfg(**TINY_BASE, task="chat", init_from=str(base_run), task_dir=str(chat_set),
                               out_dir=str(out), max_iters=4, eval_interval=4))
    command = [sys.executable, "chat.py", f"--out_dir={out}", "--temperature=0", "--max_new_tokens=10", "--device=cpu"]
    given = subprocess.run(command + ["--prompt=what is 3?"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    piped = subprocess.run(command, input="what is 3?\n", cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert given.returncode == piped.returncode == 0, given.stderr + piped.stderr
    assert given.stdout == piped.stdout and given.stdout.endswith("\n")


def test_an_exported_gpt2_chat_model_carries_the_template_for_transformers(tmp_path):
    """transformers' apply_chat_template on the export gives our tokens, and its GPT-2 our logits."""
    transformers = pytest.importorskip("transformers")
    from hf import export_hf
    tok = GPT2Tokenizer(cache_dir=CACHE)
    torch.manual_seed(0)
    model = with_turn_tokens(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size,
                                           bias=True, tie_embeddings=True)), tok).eval()
    export_hf(model, str(tmp_path / "hf"), tok.meta(), chat_template="turn-markers-v1")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids, _ = render(tok, CONVERSATION)
    assert theirs.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False) == ids
    assert theirs.apply_chat_template(CONVERSATION[:2], tokenize=True, add_generation_prompt=True,
                                   return_dict=False) == \
        prompt_ids(tok, CONVERSATION[:2])
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.tensor([ids[:40]])
    assert torch.allclose(hf_model(x).logits, model(x)[0], atol=1e-4)


def test_ctrl_c_stops_a_reply_and_keeps_what_was_written(chat_model):
    from conversation import reply
    model, tok = chat_model
    pieces = []

    def write(piece):  # the user presses Ctrl-C once three pieces are on the screen
        pieces.append(piece)
        if len([p for p in pieces if p]) == 3:
            raise KeyboardInterrupt
    text = reply(model, tok, [{"role": "user", "content": "Who is there?"}], make_cfg(max_new_tokens=50, top_k=0),
                 write, 0.0)
    assert pieces[-1] == " [stopped]" and text == "".join(pieces[:3])


def test_the_conversation_set_is_split_by_play_and_every_row_is_a_conversation():
    from conversation import check_messages
    from prepare.chat import chat_splits
    from prepare.shakespeare import TEST_WORKS, VAL_WORKS
    splits, stats = chat_splits(CACHE)
    titles = {split: {r["messages"][0]["content"].split(",")[0] for r in rows if r["messages"][0]["role"] == "system"}
              for split, rows in splits.items()}
    assert titles["val"] == {w.replace("_", " ").title() for w in VAL_WORKS}
    assert titles["test"] == {w.replace("_", " ").title() for w in TEST_WORKS}
    assert not titles["train"] & (titles["val"] | titles["test"])
    for split, rows in splits.items():
        for i, r in enumerate(rows):
            check_messages(r["messages"], f"{split} {i}")
            assert [m["role"] for m in r["messages"] if m["role"] != "system"][::2] == \
                ["user"] * ((len(r["messages"]) - ("system" == r["messages"][0]["role"])) // 2)
        assert sum(r["messages"][0]["role"] == "user" for r in rows) == stats["addition"][split]
