"""The other architectures: the encoder (arch=bert, masked-LM pretraining, BERT exactly against
transformers), the recurrent baseline (arch=lstm) and the gated convolutional network
(arch=cnn) through the same training, evaluation and sampling code as the decoder."""

import json
import os

import pytest
import torch

from checkpoint import build_model
from conftest import make_cfg, stop_after_steps
from errors import ConfigError
from model import GPTConfig
from rnn import LSTMLM
from scoring import mask_tokens

# ----------------------------------------------------------------------------- who sees whom


def tiny_model(arch, **kw):
    torch.manual_seed(0)
    config = GPTConfig(arch=arch, vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32, **kw)
    return build_model(config).eval()


@pytest.mark.parametrize("backend", ["math", "sdpa", "flex"])
def test_a_changed_future_token_changes_the_encoder_and_never_the_decoder(backend):
    """Position t of a decoder (and of the LSTM and the CNN) depends on tokens up to t only; every
    position of an encoder depends on every token."""
    idx = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 15] = (idx[:, 15] + 1) % 50
    models = {arch: tiny_model(arch, attn_backend=backend) for arch in ("gpt", "bert")}
    models["lstm"], models["cnn"] = tiny_model("lstm"), tiny_model("cnn", conv_kernel=5)  # reads 13 tokens back
    with torch.no_grad():
        for arch, model in models.items():
            before, after = model(idx)[0], model(changed)[0]
            moved = (before - after).abs().amax(dim=-1) > 1e-6  # (B, T): which positions changed
            if arch == "bert":
                assert moved.all(), arch
            else:
                assert not moved[:, :15].any() and moved[:, 15:].all(), arch


def test_encoder_masks_right_padding_like_a_shorter_input():
    model = tiny_model("bert")
    idx = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([idx, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    valid = torch.arange(16)[None] < 10
    with torch.no_grad():
        alone = model(idx)[0]
        with_padding = model(padded, valid=valid)[0][:, :10]
    assert torch.allclose(alone, with_padding, atol=1e-5)


# ----------------------------------------------------------------------------- masked language modelling

def test_masking_is_80_10_10_of_15_percent_and_spares_end_of_text():
    x = torch.randint(0, 99, (64, 512), generator=torch.Generator().manual_seed(3))
    x[:, ::50] = 7  # end-of-text tokens
    inputs, targets = mask_tokens(x, mask_id=99, vocab_size=100, eot_id=7, prob=0.15,
                                  generator=torch.Generator().manual_seed(4))
    chosen = targets >= 0
    assert not chosen[x == 7].any()
    assert torch.equal(targets[chosen], x[chosen])
    eligible = (x != 7).sum().item()
    share = chosen.sum().item() / eligible
    masked = (inputs[chosen] == 99).float().mean().item()
    kept = (inputs[chosen] == x[chosen]).float().mean().item()
    randomised = 1 - masked - kept
    # 32k eligible tokens: a standard error of 0.2 points for the 15 %, ~0.5 for the shares
    assert abs(share - 0.15) < 0.01 and abs(masked - 0.8) < 0.02
    # a random token equals the original 1 time in 99, which counts as 'kept'
    assert abs(kept - (0.1 + 0.1 / 99)) < 0.015 and abs(randomised - 0.1 * 98 / 99) < 0.015
    assert torch.equal(inputs[~chosen], x[~chosen])
    assert inputs.max() < 100


def test_mlm_loss_equals_a_direct_computation_on_the_masked_positions():
    model = tiny_model("bert")
    x = torch.randint(0, 49, (3, 32), generator=torch.Generator().manual_seed(5))
    inputs, targets = mask_tokens(x, mask_id=49, vocab_size=50, eot_id=0, generator=torch.Generator().manual_seed(6))
    logits, loss = model(inputs, targets)
    direct = []
    for b, t in (targets >= 0).nonzero().tolist():
        logp = logits[b, t].double().log_softmax(dim=-1)
        direct.append(-logp[x[b, t]])
    assert len(direct) > 5
    assert torch.allclose(loss.double(), torch.stack(direct).mean(), atol=1e-5)


def test_every_tokenizer_has_a_mask_token_outside_its_text(char_data):
    from tokenizer import MASK, from_meta, model_vocab_size
    meta = json.load(open(char_data / "meta.json"))["tokenizer"]
    tok = from_meta(meta)
    assert tok.mask_id == tok.vocab_size and model_vocab_size(meta, "bert") == tok.vocab_size + 1
    assert model_vocab_size(meta, "gpt") == tok.vocab_size
    ids = tok.encode_with_masks(f"To be or {MASK} to be")
    assert ids.count(tok.mask_id) == 1 and tok.decode(ids) == f"To be or {MASK} to be"
    assert tok.mask_id not in tok.encode("To be or <|mask|> to be")  # plain text never makes it


# ----------------------------------------------------------------------------- BERT exactly

@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, max_position_embeddings=64, type_vocab_size=2)
    hf = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():  # transformers initialises biases and norms plainly: make them count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("hf_bert")
    hf.save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,!?'",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), "the", "to", "be", "or", "not", "##ing", "##ed"]
    vocab += [f"w{i}" for i in range(120 - len(vocab))]
    (path / "vocab.txt").write_text("".join(v + "\n" for v in vocab))
    return hf, path


def test_bert_import_matches_transformers_logits(hf_bert):
    from hf import from_hf
    hf, path = hf_bert
    ours = from_hf(str(path)).eval()
    assert ours.config.arch == "bert" and ours.config.norm_position == "post"
    idx = torch.randint(0, 120, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_bert_export_reloads_in_transformers(hf_bert, tmp_path):
    import transformers
    from hf import export_hf, from_hf, hf_tokenizer_meta
    hf, path = hf_bert
    ours = from_hf(str(path)).eval()
    message = export_hf(ours, str(tmp_path / "out"), hf_tokenizer_meta(str(path)))
    assert "BertForMaskedLM" in message
    back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 120, (1, 30), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.allclose(back(idx).logits, hf(idx).logits, atol=1e-4, rtol=0)
    assert (tmp_path / "out" / "vocab.txt").read_text() == (path / "vocab.txt").read_text()


def test_wordpiece_tokenizer_matches_transformers(hf_bert):
    import transformers
    from tokenizer import WordPieceTokenizer
    _, path = hf_bert
    ours, ref = WordPieceTokenizer.from_folder(str(path)), transformers.BertTokenizer(str(path / "vocab.txt"))
    for text in ["To be, or not to be!", "Thé bed's  toeing\tthe\nline?", "zzz qqq.", "a\u200bb  ,,", ""]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert ours.mask_id == ref.mask_token_id and ours.eot_id == ref.cls_token_id


def test_non_bert_encoder_export_says_so(tmp_path):
    from hf import export_hf
    msg = export_hf(tiny_model("bert"), str(tmp_path / "x"))
    assert "cannot load" in msg and "BERT" in msg and "norm_position='pre'" in msg


# ----------------------------------------------------------------------------- through the scripts

def small(data, out, **kw):
    return make_cfg(**{**dict(data_dir=str(data), out_dir=str(out), device="cpu", n_layer=2, n_head=2, n_embd=32,
                              block_size=32, batch_size=4, max_iters=6, eval_interval=3, eval_iters=2,
                              log_interval=1, warmup_iters=2, plot=False), **kw})


def test_encoder_pretrains_evaluates_and_fine_tunes_to_classify(char_data, tmp_path):
    import evaluate
    from finetune import finetune
    from train import train
    train(small(char_data, tmp_path / "bert", arch="bert", max_iters=20, eval_interval=10, learning_rate=3e-3))
    rows = [json.loads(line) for line in open(tmp_path / "bert" / "metrics.jsonl")]
    evals = [r["val_loss"] for r in rows if r["kind"] == "eval"]
    assert evals[-1] < evals[0] < 4.6  # the masked-LM loss falls from ln(vocab)
    evaluate.main([f"--out_dir={tmp_path / 'bert'}", "--batch_size=64", "--device=cpu"])
    metrics = json.load(open(tmp_path / "bert" / "eval.json"))[f"lm:{os.path.basename(char_data)}:test"]["metrics"]
    assert set(metrics) >= {"mlm_loss", "masked_accuracy"} and "perplexity" not in metrics
    assert 0.05 < metrics["masked_accuracy"] < 1
    task_dir = tmp_path / "genre"
    task_dir.mkdir()
    for split in ("train", "val"):
        with open(task_dir / f"{split}.jsonl", "w") as f:
            for i in range(12):
                f.write(json.dumps({"text": "ha ha merry jest " * (i % 3 + 1) if i % 2 else "death blood grave",
                                    "label": "comedy" if i % 2 else "tragedy"}) + "\n")
    result = finetune(small(char_data, tmp_path / "cls", task="classify", init_from=str(tmp_path / "bert"),
                            task_dir=str(task_dir), classify_pool="first", max_iters=48, eval_interval=4,
                            learning_rate=5e-3, best_metric="val_macro_f1"))  # (1e-2 diverged for 1 seed in 4)
    assert result["best"] > 0.9  # two trivially separable labels
    with pytest.raises(SystemExit, match="encoder"):
        evaluate.main([f"--out_dir={tmp_path / 'bert'}", "--eval_task=choice", "--task_file=x.jsonl"])
    with pytest.raises(ConfigError, match="encoder"):
        finetune(small(char_data, tmp_path / "sft", task="sft", init_from=str(tmp_path / "bert")))


def test_lstm_trains_evaluates_and_samples_through_the_same_scripts(char_data, tmp_path, capsys, monkeypatch):
    import evaluate
    import sample
    from train import train
    out = tmp_path / "lstm"
    result = train(small(char_data, out, arch="lstm", n_embd=64, max_iters=30, eval_interval=15,
                         learning_rate=2e-2))
    assert isinstance(result["model"], LSTMLM) and result["best"] < 4.0  # uniform: ln 86 = 4.45
    evaluate.main([f"--out_dir={out}", "--batch_size=64", "--device=cpu"])
    metrics = json.load(open(out / "eval.json"))[f"lm:{os.path.basename(char_data)}:test"]["metrics"]
    assert metrics["bits_per_char"] < 5 and metrics["perplexity"] > 1
    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1",
                                     "--max_new_tokens=20", "--temperature=0", "--start=ROMEO:"])
    sample.main()
    assert capsys.readouterr().out.startswith("ROMEO:")
    from finetune import finetune
    with pytest.raises(ConfigError, match="transformer blocks"):
        finetune(small(char_data, tmp_path / "cls", task="classify", init_from=str(out)))


def test_lstm_generation_with_its_state_equals_recomputing():
    """The state is the LSTM's KV cache: decoding with it gives the tokens that feeding the
    whole sequence each step gives, for prompts of different lengths in one batch."""
    from generate import generate
    model = tiny_model("lstm")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)  # a random model this size repeats one token; bigger weights vary
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    cached = generate(model, prompts, 12, temperature=0)
    assert cached == generate(model, prompts, 12, temperature=0, use_cache=False)
    assert cached[1] == generate(model, [prompts[1]], 12, temperature=0)[0]
    assert len(set(cached[0])) > 1


def test_lstm_resume_is_bit_exact(char_data, tmp_path, monkeypatch):
    from train import train
    straight = train(small(char_data, tmp_path / "a", arch="lstm", n_embd=48, dropout=0.1))["model"]
    with stop_after_steps(monkeypatch, 3):
        train(small(char_data, tmp_path / "b", arch="lstm", n_embd=48, dropout=0.1))
    resumed = train(small(char_data, tmp_path / "b", arch="lstm", n_embd=48, dropout=0.1, init_from="resume"))["model"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_lstm_refuses_transformer_keys(char_data, tmp_path):
    from train import train
    with pytest.raises(ConfigError, match="pos='rope' does not apply"):
        train(small(char_data, tmp_path / "x", arch="lstm", pos="rope"))
    with pytest.raises(ConfigError, match="n_kv_head=1 does not apply"):  # (compared with n_head, its default)
        train(small(char_data, tmp_path / "kv", arch="lstm", n_kv_head=1))
    with pytest.raises(ConfigError, match="parallel=ddp"):
        train(small(char_data, tmp_path / "y", arch="lstm", parallel="fsdp"))


def test_loss_falls_for_every_architecture_on_one_batch():
    """A sanity check of each training signal: 60 steps on one batch lower its loss a lot."""
    x = torch.randint(0, 49, (4, 32), generator=torch.Generator().manual_seed(9))
    for arch in ("gpt", "bert", "lstm", "cnn"):
        model = tiny_model(arch).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2 if arch == "lstm" else 1e-2)
        gen = torch.Generator().manual_seed(10)
        inputs, targets = (mask_tokens(x, 49, 50, 0, generator=gen) if arch == "bert"
                           else (x[:, :-1], x[:, 1:]))
        first = None
        for _ in range(60):
            loss = model(inputs, targets)[1]
            first = first or loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.5 * first, arch


# ----------------------------------------------------------------------------- the gated CNN


@pytest.mark.parametrize("kernel,growth,layers", [(4, 2, 2), (3, 2, 5), (2, 1, 3), (5, 3, 4)])
def test_cnn_receptive_field_equals_its_formula(kernel, growth, layers):
    """The last position's logits depend on exactly the last receptive_fields()[-1] tokens
    (measured with gradients through the embeddings), and the formula is 1 + (k-1) * the sum of
    the dilations, which grow until the field covers block_size and then restart at 1."""
    from cnn import dilations, receptive_fields
    torch.manual_seed(0)
    config = GPTConfig(arch="cnn", vocab_size=50, block_size=32, n_layer=layers, n_head=2, n_embd=16,
                       conv_kernel=kernel, conv_dilation=growth)
    model = build_model(config).double()
    T = config.block_size
    x = model.transformer.wte(torch.randint(0, 50, (1, T))).detach().requires_grad_()
    h = x
    for block in model.transformer.h:
        h = block(h, None)
    h[0, -1].sum().backward()
    reached = (x.grad[0].abs().sum(-1) > 0).nonzero().squeeze(1)  # positions the last one reads
    field = receptive_fields(config)[-1]
    assert field == 1 + (kernel - 1) * sum(dilations(config))
    assert reached.tolist() == list(range(max(0, T - field), T))
    d, covered = dilations(config), 1
    for i in range(1, layers):  # the schedule: grow by conv_dilation, or restart once the field covers block_size
        covered += (kernel - 1) * d[i - 1]
        assert d[i] == (1 if covered >= T else d[i - 1] * growth)


def test_cnn_generation_with_its_cache_equals_recomputing():
    """The cache holds each layer's last (k-1)d inputs: decoding with it gives the tokens that
    recomputing the window gives, for prompts of different lengths in one batch, also after the
    window slides."""
    from generate import generate
    model = tiny_model("cnn", conv_kernel=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # a random model this size repeats one token; bigger weights vary
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    cached = generate(model, prompts, 40, temperature=0)  # 45 tokens: past block_size=32
    assert cached == generate(model, prompts, 40, temperature=0, use_cache=False)
    assert cached[1] == generate(model, [prompts[1]], 40, temperature=0)[0]
    assert len(set(cached[0])) > 1


def test_cnn_resume_is_bit_exact(char_data, tmp_path, monkeypatch):
    from train import train
    kw = dict(arch="cnn", n_embd=48, dropout=0.1, conv_kernel=3)
    straight = train(small(char_data, tmp_path / "a", **kw))["model"]
    with stop_after_steps(monkeypatch, 3):
        train(small(char_data, tmp_path / "b", **kw))
    resumed = train(small(char_data, tmp_path / "b", init_from="resume", **kw))["model"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_cnn_trains_evaluates_samples_and_fine_tunes(char_data, tmp_path, capsys, monkeypatch):
    import evaluate
    import sample
    from cnn import GatedConvLM
    from finetune import finetune
    from hf import export_hf
    from train import train
    out = tmp_path / "cnn"
    result = train(small(char_data, out, arch="cnn", n_embd=64, max_iters=30, eval_interval=15,
                         learning_rate=1e-2))
    assert isinstance(result["model"], GatedConvLM) and result["best"] < 4.0  # uniform: ln 86 = 4.45
    evaluate.main([f"--out_dir={out}", "--batch_size=64", "--device=cpu"])
    metrics = json.load(open(out / "eval.json"))[f"lm:{os.path.basename(char_data)}:test"]["metrics"]
    assert metrics["bits_per_char"] < 5.5
    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1",
                                     "--max_new_tokens=20", "--temperature=0", "--start=ROMEO:"])
    sample.main()
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert "cannot load this model because it uses arch='cnn'" in export_hf(result["model"], str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="without lora_rank"):
        finetune(small(char_data, tmp_path / "lora", task="sft", lora_rank=4, init_from=str(out)))


def test_cnn_refuses_attention_keys_and_others_refuse_conv_keys(char_data, tmp_path):
    from train import train
    with pytest.raises(ConfigError, match="pos='rope' does not apply"):
        train(small(char_data, tmp_path / "x", arch="cnn", pos="rope"))
    with pytest.raises(ConfigError, match="conv_kernel and conv_dilation shape arch='cnn' only"):
        train(small(char_data, tmp_path / "y", conv_kernel=3))
    with pytest.raises(ConfigError, match="doc_mask needs attention"):
        train(small(char_data, tmp_path / "z", arch="cnn", doc_mask=True))
