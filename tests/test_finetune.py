import json
import subprocess
import sys

import pytest
import torch

from adapters import LoRALinear, add_lora, merge_lora
from checkpoint import load_checkpoint, model_from_checkpoint
from compute import autocast_context
from conftest import ROOT, make_cfg, stop_after_steps
from conftest import TINY_BASE as BASE
from data import load_meta
from distributed import Processes, setup_processes
from errors import ConfigError
import examples as EX
import finetune as FT
from model import GPT, GPTConfig
import tasks as TK
import train as T


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def sft_dir(tmp_path):
    pairs = [("thou art", "you are"), ("haue", "have"), ("vs", "us"), ("loue", "love"), ("doe", "do")]
    for split in ("train", "val"):
        write_jsonl(tmp_path / "sft" / f"{split}.jsonl", [{"prompt": p, "completion": c} for p, c in pairs])
    return tmp_path / "sft"


@pytest.fixture
def genre_dir(tmp_path):
    rows = [{"text": "O happy day, sweet love!" * 2, "label": "comedy"}, {"text": "Death, blood and grief." * 2,
            "label": "tragedy"}] * 4
    for split in ("train", "val"):
        write_jsonl(tmp_path / "genre" / f"{split}.jsonl", rows)
    return tmp_path / "genre"


def ft_cfg(base_run, out, **kw):
    return make_cfg(**{**BASE, "init_from": str(base_run), "out_dir": str(out), "max_iters": 6,
                       "eval_interval": 3, "learning_rate": 1e-3, **kw})


def weights(path):
    return load_checkpoint(str(path))["model"]


def test_sft_loss_is_on_completion_tokens_only(base_run, sft_dir, tmp_path):
    cfg = ft_cfg(base_run, tmp_path, task="sft", task_dir=str(sft_dir), prompt_template="{prompt}\n")
    model, meta = FT.load_base(cfg)
    tok = FT.from_meta(meta)
    [(x, y)] = EX.sft_examples(str(sft_dir / "train.jsonl"), tok, make_cfg(**{**cfg.to_dict(), "max_examples": 1}))
    n_prompt = 1 + len(tok.encode("thou art\n"))
    assert y[:n_prompt - 1] == [-1] * (n_prompt - 1) and y[n_prompt - 1:] == tok.encode("you are") + [tok.eot_id]
    xt, yt = torch.tensor([x]), torch.tensor([y])
    _, loss = model.eval()(xt, yt)
    logits = model(xt)[0][0]
    manual = torch.nn.functional.cross_entropy(logits[n_prompt - 1:], yt[0, n_prompt - 1:])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    # the masking matters: scoring the prompt positions too (plain LM targets) gives another loss
    unmasked = torch.tensor([x[1:] + [y[-1]]])
    assert model(xt, unmasked)[1].item() != pytest.approx(loss.item())


def test_generation_reads_prompts_as_fine_tuning_did(base_run, sft_dir, tmp_path, monkeypatch):
    """evaluate.py must show a fine-tuned model the prompt exactly as training did (a missing
    leading end-of-text once cost the Folio demo most of its BLEU)."""
    import evaluate
    cfg = ft_cfg(base_run, tmp_path, task="sft", task_dir=str(sft_dir), prompt_template="{prompt}\n>\n")
    model, meta = FT.load_base(cfg)
    tok = FT.from_meta(meta)
    [(x, y)] = EX.sft_examples(str(sft_dir / "train.jsonl"), tok, make_cfg(**{**cfg.to_dict(), "max_examples": 1}))
    n_prompt = y.index(next(t for t in y if t != -1)) + 1
    seen = []
    monkeypatch.setattr(evaluate, "generate",
                        lambda model, prompts, *a, **k: seen.extend(prompts) or [[tok.eot_id]] * len(prompts))
    evaluate.generate_all(model, tok, cfg, ["thou art"], torch.device("cpu"))
    assert seen == [x[:n_prompt]]


def test_sft_runs_resumes_exactly_and_packs(base_run, sft_dir, tmp_path, monkeypatch):
    kw = dict(task="sft", task_dir=str(sft_dir), dropout=0.1)
    FT.finetune(ft_cfg(base_run, tmp_path / "straight", **kw))
    with stop_after_steps(monkeypatch, 2):
        FT.finetune(ft_cfg(base_run, tmp_path / "split", **kw))
    FT.finetune(ft_cfg(base_run, tmp_path / "split", **{**kw, "init_from": "resume"}))
    a, b = weights(tmp_path / "straight" / "ckpt_last.pt"), weights(tmp_path / "split" / "ckpt_last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    packed = EX.pack([([1] * 10, [2] * 10)] * 5, 25)
    assert [len(x) for x, _ in packed] == [20, 20, 10]
    FT.finetune(ft_cfg(base_run, tmp_path / "packed", **kw, sft_packing=True, doc_mask=True))


def test_multi_token_base_keeps_or_drops_its_extra_heads(char_data, sft_dir, genre_dir, tmp_path):
    base = tmp_path / "mtp_base"
    T.train(make_cfg(**BASE, data_dir=str(char_data), out_dir=str(base), max_iters=2, eval_interval=2,
                     mtp_heads=2))
    before = weights(base / "ckpt_last.pt")
    extra = [k for k in before if k.startswith("mtp.")]
    assert extra
    FT.finetune(ft_cfg(base, tmp_path / "keep", task="sft", task_dir=str(sft_dir)))
    kept = load_checkpoint(str(tmp_path / "keep" / "ckpt_last.pt"))
    assert kept["model_args"]["mtp_heads"] == 2
    assert any(not torch.equal(before[k], kept["model"][k]) for k in extra)  # the extra head trained too
    for name, kw in [("drop", dict(task="sft", task_dir=str(sft_dir), keep_mtp_heads=False)),
                     ("classify", dict(task="classify", task_dir=str(genre_dir)))]:
        FT.finetune(ft_cfg(base, tmp_path / name, **kw))
        ckpt = load_checkpoint(str(tmp_path / name / "ckpt_last.pt"))
        assert ckpt["model_args"]["mtp_heads"] == 1 and not any(k.startswith("mtp.") for k in ckpt["model"])


def test_classification_head_separates_a_tiny_set(base_run, genre_dir, tmp_path):
    cfg = ft_cfg(base_run, tmp_path, task="classify", task_dir=str(genre_dir), max_iters=40, eval_interval=40,
                 learning_rate=3e-3, best_metric="val_macro_f1")
    summary = FT.finetune(cfg)
    model = summary["model"]
    task = TK.ClassifyTask(cfg, Processes(0, 1, torch.device("cpu")),
                           FT.from_meta(FT.load_base(cfg)[1]), str(genre_dir))
    preds, _ = task.predict(model, task.splits["train"], autocast_context(torch.device("cpu"), torch.float32))
    assert preds == [label for _, label in task.splits["train"]]
    assert summary["best"] == 1.0 and weights(tmp_path / "ckpt_best.pt").keys() == model.state_dict().keys()
    done = subprocess.run([sys.executable, "evaluate.py", f"--out_dir={tmp_path}", "--eval_task=classify",
                           f"--task_dir={genre_dir}", "--eval_split=val"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["classify:genre:val"]["metrics"]["method"] == \
        "classification head"


class ScriptedTask(TK.LMTask):
    """The LM task with a scripted validation loss, to drive early stopping."""

    def __init__(self, cfg, dist, meta, vals):
        super().__init__(cfg, dist, meta)
        self.vals = iter(vals)

    def evaluate(self, model, autocast):
        return {"train": 1.0, "val": next(self.vals)}


def test_early_stopping_stops_and_restores_best(base_run, char_data, tmp_path):
    cfg = ft_cfg(base_run, tmp_path, task="lm", data_dir=str(char_data), max_iters=100, eval_interval=2,
                 patience=2, min_delta=0.01)
    dist = setup_processes(cfg)
    meta = load_meta(str(char_data))
    model, _ = FT.load_base(cfg)
    summary = T.fit(cfg, dist, model, ScriptedTask(cfg, dist, meta, [2.0, 1.5, 1.495, 1.6, 1.0]))
    assert summary["stopped_early"] and summary["iter_num"] == 8 and summary["best"] == 1.495
    best = weights(tmp_path / "ckpt_best.pt")
    assert load_checkpoint(str(tmp_path / "ckpt_best.pt"))["iter_num"] == 6
    assert all(torch.equal(v, best[k]) for k, v in summary["model"].state_dict().items())
    last = weights(tmp_path / "ckpt_last.pt")
    assert not all(torch.equal(last[k], best[k]) for k in best)


def test_gradual_unfreezing_stages():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=3, n_head=2, n_embd=16, tie_embeddings=False))
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    drop = FT.gradual_unfreezing(2, m)
    depth = m.parameter_depths()
    x = torch.randint(0, 20, (2, 8))
    seen = {}
    for it in range(10):
        m(x, x)[1].backward()
        drop(it)
        lowest = FT.unfrozen_depth(it, 2, 3)
        seen[lowest] = sorted({depth[n] for n, p in m.named_parameters() if p.grad is not None})
        for n, p in m.named_parameters():
            assert (p.grad is not None) == (depth[n] >= lowest), (it, n)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it == 1:  # stage 0 done: everything below the last block is untouched, weight decay included
            for n, p in m.named_parameters():
                assert torch.equal(p, start[n]) == (depth[n] < 2), n
    assert seen == {2: [2, 3], 1: [1, 2, 3], 0: [0, 1, 2, 3], -1: [-1, 0, 1, 2, 3]}


def test_layerwise_learning_rates(base_run, char_data, tmp_path):
    model, _ = FT.load_base(ft_cfg(base_run, tmp_path))
    opt = T.configure_optimizer(model, make_cfg(learning_rate=1.0), torch.device("cpu"), FT.layer_lr_scales(model, 0.5))
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["transformer.h.1.attn.c_attn.weight"])] == 0.5
    assert scale_of[id(named["transformer.h.0.mlp.c_fc.weight"])] == 0.25
    assert scale_of[id(named["transformer.wte.weight"])] == 0.125
    assert scale_of[id(named["transformer.ln_f.weight"])] == 1.0


def test_freezing_by_name_and_dropout(base_run, char_data, tmp_path):
    cfg = ft_cfg(base_run, tmp_path, task="lm", data_dir=str(char_data), freeze="wte,wpe", dropout=0.2)
    summary = FT.finetune(cfg)
    before, after = weights(base_run / "ckpt_best.pt"), summary["model"].state_dict()
    assert torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert torch.equal(before["transformer.wpe.weight"], after["transformer.wpe.weight"])
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])
    assert all(m.p == 0.2 for m in summary["model"].modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ConfigError, match="matches no parameter"):
        FT.freeze_by_pattern(summary["model"], "nothing_like_this")


def test_lora_merge_equals_adapters_and_trains_only_adapters(base_run, sft_dir, tmp_path):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    n = add_lora(m, rank=4, alpha=8.0, dropout=0.0, targets=["c_attn", "c_proj", "c_fc"])
    assert n == 8  # 2 blocks x (c_attn, attention c_proj, c_fc, MLP c_proj)
    for mod in m.modules():
        if isinstance(mod, LoRALinear):
            torch.nn.init.normal_(mod.lora_B, std=0.1)  # a trained adapter is not zero
    x = torch.randint(0, 30, (2, 16))
    with torch.no_grad():
        adapted = m(x)[0]
        merged = merge_lora(m)(x)[0]
    assert torch.allclose(adapted, merged, atol=1e-5)
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    cfg = ft_cfg(base_run, tmp_path / "lora", task="sft", task_dir=str(sft_dir), lora_rank=2)
    summary = FT.finetune(cfg)
    trained = {n for n, p in summary["model"].named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    base = weights(base_run / "ckpt_best.pt")
    tuned = summary["model"].state_dict()
    assert torch.equal(tuned["transformer.h.0.attn.c_attn.base.weight"], base["transformer.h.0.attn.c_attn.weight"])
    loaded = model_from_checkpoint(load_checkpoint(str(tmp_path / "lora" / "ckpt_last.pt")))
    assert not any(isinstance(mod, LoRALinear) for mod in loaded.modules())  # merged for inference and export
    done = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'lora'}", "--checkpoint=last",
                           "--max_new_tokens=5", "--num_samples=1"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def finetune_cli(*args):
    return subprocess.run([sys.executable, "finetune.py", *[f"--{k}={v}" for k, v in BASE.items()], *args],
                          cwd=ROOT, capture_output=True, text=True)


def one_line_error(done, *words):
    assert done.returncode == 1, done.stderr[-500:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), done.stderr[-500:]
    for w in words:
        assert w in last, last


def test_bad_inputs(base_run, sft_dir, genre_dir, gpt2_data, tmp_path):
    one_line_error(finetune_cli(f"--init_from={tmp_path}/nothing", f"--out_dir={tmp_path}/o"),
                   "no such run folder or checkpoint file")
    one_line_error(finetune_cli(f"--init_from={base_run}", f"--out_dir={tmp_path}/o", "--task=lm",
                                f"--data_dir={gpt2_data}"), "tokenized with gpt2", "not the base model's char")
    bad = tmp_path / "bad"
    (bad).mkdir()
    (bad / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    one_line_error(finetune_cli(f"--init_from={base_run}", f"--out_dir={tmp_path}/o", "--task=sft",
                                f"--task_dir={bad}"), "train.jsonl:2: missing field 'completion'")
    write_jsonl(bad / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "z"}])
    write_jsonl(bad / "val.jsonl", [{"text": "a", "label": "y"}])
    one_line_error(finetune_cli(f"--init_from={base_run}", f"--out_dir={tmp_path}/o", "--task=classify",
                                f"--task_dir={bad}"), "label sets differ between splits", "['y']")
    write_jsonl(bad / "train.jsonl", [{"prompt": "x" * 100, "completion": "b"}])
    one_line_error(finetune_cli(f"--init_from={base_run}", f"--out_dir={tmp_path}/o", "--task=sft",
                                f"--task_dir={bad}"), "record 1: the prompt is 116 tokens, longer than block_size=64")


def test_sft_val_loss_is_head_one_of_a_multi_token_model(char_data, sft_dir, tmp_path):
    """val_loss drives early stopping and ckpt_best.pt: it must be the next-token loss (head 1),
    as in pretraining, not the mean over the heads."""
    base = tmp_path / "mtp_base"
    T.train(make_cfg(**BASE, data_dir=str(char_data), out_dir=str(base), max_iters=2, eval_interval=2,
                     mtp_heads=3))
    cfg = ft_cfg(base, tmp_path / "ft", task="sft", task_dir=str(sft_dir))
    model, meta = FT.load_base(cfg)
    task = TK.SFTTask(cfg, Processes(0, 1, torch.device("cpu")), FT.from_meta(meta), str(sft_dir))
    result = task.evaluate(model, autocast_context(torch.device("cpu"), torch.float32))
    heads = [result[f"val_head{i}"] for i in (1, 2, 3)]
    assert result["val"] == heads[0] and result["val"] != pytest.approx(sum(heads) / 3)
    x, y = EX.pad_batch(task.splits["val"], task.tok.eot_id)
    with torch.no_grad():
        direct = torch.nn.functional.cross_entropy(model.eval()(x)[0].flatten(0, 1), y.flatten(), ignore_index=-1)
    assert result["val"] == pytest.approx(direct.item(), rel=1e-5)


def test_config_json_records_the_loaded_model(base_run, sft_dir, tmp_path):
    """The base run is 2 x 32 wide; the config's defaults (6 x 384) must not be what is recorded."""
    FT.finetune(ft_cfg(base_run, tmp_path, task="sft", task_dir=str(sft_dir), n_layer=6, n_embd=384, max_iters=1))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["n_layer"], saved["n_embd"]) == (2, 32)


def test_lora_with_muon_fine_tunes(base_run, sft_dir, tmp_path):
    summary = FT.finetune(ft_cfg(base_run, tmp_path, task="sft", task_dir=str(sft_dir), lora_rank=2,
                                 optimizer="muon", max_iters=2))
    assert summary["iter_num"] == 2


def test_with_dropout_keeps_the_flex_rule():
    m = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, attn_backend="flex"))
    with pytest.raises(ConfigError, match="flex"):
        FT.with_dropout(m, 0.1)
    assert FT.with_dropout(m, 0.0) is m


def test_merged_lora_keeps_the_base_dtype():
    base = torch.nn.Linear(8, 4).to(torch.bfloat16)
    lora = LoRALinear(base, rank=2, alpha=4.0, dropout=0.0)
    assert lora.lora_A.dtype == torch.bfloat16
    merged = lora.merged()
    assert merged.weight.dtype == torch.bfloat16 and merged.weight.device == base.weight.device


def test_classification_says_how_many_texts_were_cut(base_run, tmp_path, capsys):
    rows = [{"text": "short", "label": "a"}, {"text": "x" * 200, "label": "b"}, {"text": "y" * 300, "label": "a"}]
    for split in ("train", "val"):
        write_jsonl(tmp_path / "long" / f"{split}.jsonl", rows)
    cfg = ft_cfg(base_run, tmp_path / "o", task="classify", task_dir=str(tmp_path / "long"))
    task = TK.ClassifyTask(cfg, Processes(0, 1, torch.device("cpu")), FT.from_meta(FT.load_base(cfg)[1]),
                           str(tmp_path / "long"))
    assert task.truncated == {"train": 2, "val": 2}
    assert "2 of 3 texts are longer than block_size=64" in capsys.readouterr().out
