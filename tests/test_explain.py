"""explain.py against independent references: attention weights against a float64 forward
written out here, the logit lens's last layer against the model's logits, windowed surprisal
against one forward per token, occlusion against what causality allows; every picture a PNG of
the size it says; and its bad inputs, one line each."""

import json
import math
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import explain
from checkpoint import build_model
from conftest import ROOT, TINY_BASE, make_cfg
from errors import ConfigError
from model import GPTConfig

TEXT = "ROMEO: But soft, what light\nthrough yonder window breaks?"


def tiny(arch="gpt", **kw):
    torch.manual_seed(0)
    config = GPTConfig(**{**dict(arch=arch, vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16), **kw})
    return build_model(config).double().eval()


def hand_attention(model, ids):
    """The classic GPT (learned positions, LayerNorm, GELU MLP) written out in float64: each
    layer's softmax(q kᵀ / √hd) under the causal mask, (layers, heads, T, T)."""
    x = model.transformer.wte.weight[ids] + model.transformer.wpe.weight[: len(ids)]  # (T, C)
    T, C, nh = len(ids), model.config.n_embd, model.config.n_head
    hd, maps = C // nh, []
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for block in model.transformer.h:
        h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias, model.config.norm_eps)
        q, k, v = (h @ block.attn.c_attn.weight.T + block.attn.c_attn.bias).split(C, dim=-1)
        q, k, v = (t.view(T, nh, hd).transpose(0, 1) for t in (q, k, v))  # (nh, T, hd)
        weights = torch.softmax((q @ k.transpose(1, 2) / math.sqrt(hd)).masked_fill(future, -math.inf), dim=-1)
        maps.append(weights)
        y = (weights @ v).transpose(0, 1).reshape(T, C)
        x = x + y @ block.attn.c_proj.weight.T + block.attn.c_proj.bias
        h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias, model.config.norm_eps)
        h = F.gelu(h @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias, approximate="tanh")
        x = x + h @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias
    return torch.stack(maps)


def test_attention_maps_equal_a_float64_hand_computation():
    model = tiny(attn_backend="sdpa")  # explain switches to the math backend itself, and back
    ids = torch.randint(0, 40, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    maps = explain.attention_maps(model, ids)
    assert maps.shape == (2, 2, 20, 20) and model.config.attn_backend == "sdpa"
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 20), atol=1e-6)
    assert torch.allclose(maps, hand_attention(model, torch.tensor(ids)).float(), atol=1e-6)


def test_attention_maps_follow_the_models_own_window_and_gqa():
    model = tiny(pos="rope", n_head=4, n_kv_head=2, attn_window=5, qk_norm=True)
    maps = explain.attention_maps(model, list(range(1, 21)))
    assert maps.shape == (2, 4, 20, 20)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 20), atol=1e-6)
    q, k = torch.arange(20)[:, None], torch.arange(20)[None, :]
    outside = (k > q) | (q - k >= 5)
    assert (maps[..., outside] == 0).all() and (maps[..., ~outside] > 0).all()


@pytest.mark.parametrize("arch", ["gpt", "cnn"])
def test_the_logit_lens_last_layer_is_the_models_own_prediction(arch):
    model = tiny(arch, logit_softcap=5.0)
    ids = list(range(3, 23))
    lens = explain.logit_lens(model, ids)
    assert lens.shape == (2, 20, 40)
    own = torch.log_softmax(model(torch.tensor([ids]))[0][0], dim=-1).float()
    assert torch.allclose(lens[-1], own, atol=1e-6)
    assert not torch.allclose(lens[0], own, atol=1e-3)  # (an earlier layer predicts otherwise)


def test_windowed_surprisal_equals_one_forward_per_token():
    """A text three times the context: every token scored once, each with at least half a
    window before it. The CNN reads 3 tokens back, so that equals reading the token's own last
    block_size - 1 tokens: one forward per token, the reference."""
    model = tiny("cnn", conv_kernel=2, conv_dilation=1, block_size=16)
    ids = torch.randint(0, 40, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    got = explain.surprisal(model, ids)
    want = []
    for t in range(1, len(ids)):
        context = torch.tensor([ids[max(0, t - 15):t]])
        want.append(-torch.log_softmax(model(context)[0][0, -1], dim=-1)[ids[t]].item())
    assert got.shape == (49,) and torch.allclose(got, torch.tensor(want).float(), atol=1e-6)
    short = ids[:12]  # within the context: one forward, the plain cross-entropy
    logits = model(torch.tensor([short]))[0][0]
    assert torch.allclose(explain.surprisal(model, short), F.cross_entropy(logits[:-1], torch.tensor(short[1:]),
                                                                           reduction="none").float(), atol=1e-6)


def test_occluding_a_token_after_the_pooled_position_changes_nothing():
    from adapters import classifier
    torch.manual_seed(0)
    model = classifier(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16), 3).double().eval()
    ids = list(range(5, 25))
    probs, importance = explain.occlusion(model, ids, occluder=0, pooled_at=11)
    assert probs.shape == (3,) and abs(probs.sum().item() - 1) < 1e-6
    assert (importance[12:] == 0).all()  # a causal trunk's position 11 never reads them
    assert (importance[:12] != 0).sum() >= 10
    whole, _ = explain.occlusion(model, ids[:12], occluder=0)
    assert torch.allclose(whole, probs)


# ----------------------------------------------------------------------------- the script


def png_size(path):
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def lm_run(char_data, tmp_path_factory):
    import train
    out = tmp_path_factory.mktemp("lm")
    train.train(make_cfg(**{**TINY_BASE, "block_size": 32}, data_dir=str(char_data), out_dir=str(out),
                         max_iters=4, eval_interval=4))
    return out


def test_every_view_is_written_and_every_picture_is_the_size_it_says(lm_run, capsys):
    written = explain.main([f"--out_dir={lm_run}", f"--text={TEXT}", "--overwrite=True"])
    out = capsys.readouterr().out
    names = {w.split(" (")[0].rsplit("/", 1)[1] for w in written}
    assert names == {"surprisal.html", "surprisal.png", "attention.png", "logit_lens.png", "logit_lens.md"}
    for entry in written:
        if entry.endswith(")"):
            path, size = entry[:-1].split(" (")
            assert png_size(path) == tuple(map(int, size.split("x"))), entry
    assert "bits per character over 57 characters" in out
    assert "longer than the context; they read its last 32 tokens" in out  # 58 tokens, windowed
    page = open(lm_run / "explain" / "surprisal.html", encoding="utf-8").read()
    assert page.count("<span") == 57 and "bits per character" in page
    table = open(lm_run / "explain" / "logit_lens.md", encoding="utf-8").read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(rows) == 1 + 2 and all(row.count(" | ") == 31 for row in rows)  # header, a row per layer; 31 predictions


def test_an_earlier_explanation_is_kept_unless_overwrite(lm_run):
    explain.main([f"--out_dir={lm_run}", "--text=ROMEO", "--views=surprisal", "--overwrite=True"])
    before = (lm_run / "explain" / "surprisal.html").read_bytes()
    with pytest.raises(ConfigError, match="holds an earlier explanation"):
        explain.main([f"--out_dir={lm_run}", "--text=JULIET"])
    assert (lm_run / "explain" / "surprisal.html").read_bytes() == before


def test_cnn_and_lstm_runs_get_the_views_they_have(char_data, tmp_path, capsys):
    import train
    for arch in ("cnn", "lstm"):
        out = tmp_path / arch
        train.train(make_cfg(**{**TINY_BASE, "block_size": 32}, data_dir=str(char_data), out_dir=str(out), arch=arch,
                             max_iters=2, eval_interval=2))
        written = explain.main([f"--out_dir={out}", "--text=ROMEO: soft"])
        said = capsys.readouterr().out
        names = {w.split(" (")[0].rsplit("/", 1)[1] for w in written}
        if arch == "cnn":
            assert names == {"surprisal.html", "surprisal.png", "logit_lens.png", "logit_lens.md", "receptive_field.md"}
            assert "| 1 | 2 | 10 |" in (out / "explain" / "receptive_field.md").read_text()  # 1 + 3 * (1 + 2)
        else:
            assert names == {"surprisal.html", "surprisal.png"}
            assert "logit_lens: skipped (arch=lstm has no residual stream to read)" in said
        assert f"attention: skipped (arch={arch} has no attention)" in said
        with pytest.raises(ConfigError, match=f"views=attention: arch={arch} has no attention"):
            explain.main([f"--out_dir={out}", "--text=x", "--views=attention", "--overwrite=True"])


def test_a_classifier_shows_which_tokens_moved_its_decision(base_run, tmp_path, capsys):
    from finetune import finetune
    from test_posttrain import write_splits
    rows = [{"text": "merry jest" if i % 2 else "grave blood", "label": "comedy" if i % 2 else "tragedy"}
            for i in range(8)]
    task_dir = write_splits(tmp_path / "genre", {"train": rows, "val": rows})
    out = tmp_path / "cls"
    finetune(make_cfg(**TINY_BASE, task="classify", init_from=str(base_run), out_dir=str(out),
                      task_dir=str(task_dir), max_iters=2, eval_interval=2))
    written = explain.main([f"--out_dir={out}", "--text=a merry jest"])
    said = capsys.readouterr().out
    assert [w.split(" (")[0].rsplit("/", 1)[1] for w in written] == ["occlusion.html", "attention.png"]
    assert "predicted '" in said and "comedy: 0." in said and "tragedy: 0." in said
    page = (out / "explain" / "occlusion.html").read_text(encoding="utf-8")
    assert page.count("<span") == len("a merry jest") + 1  # end-of-text opens the text
    with pytest.raises(ConfigError, match="views=surprisal: a classifier run has occlusion, attention"):
        explain.main([f"--out_dir={out}", "--text=x", "--views=surprisal", "--overwrite=True"])


# ----------------------------------------------------------------------------- bad input (the rest: test_bad_inputs.py)


@pytest.mark.slow
def test_an_encoder_classifier_asked_for_attention_is_one_line(char_data, tmp_path):
    """From the command line: one `error:` line, no traceback."""
    import train
    from finetune import finetune
    from test_posttrain import write_splits
    base, out = tmp_path / "bert", tmp_path / "cls"
    train.train(make_cfg(**{**TINY_BASE, "block_size": 32}, arch="bert", data_dir=str(char_data), out_dir=str(base),
                         max_iters=2, eval_interval=2))
    rows = [{"text": "ab" if i % 2 else "cd", "label": str(i % 2)} for i in range(4)]
    finetune(make_cfg(**{**TINY_BASE, "block_size": 32}, task="classify", classify_pool="first", init_from=str(base),
                      out_dir=str(out), task_dir=str(write_splits(tmp_path / "t", {"train": rows, "val": rows})),
                      max_iters=2, eval_interval=2))
    done = subprocess.run([sys.executable, "explain.py", f"--out_dir={out}", "--text=ab", "--views=attention",
                           "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "error: views=attention: attention maps are drawn along a decoder's causal path and this classifier's trunk "
        "is arch=bert; its occlusion view explains it"]
    assert not (out / "explain").exists()
    json.loads((out / "config.json").read_text())  # the run folder is untouched
