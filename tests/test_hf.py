"""GPT-2 import and export against Hugging Face transformers, the independent reference."""

import os

import pytest
import torch

from generate import generate
from hf import export_hf, from_hf, gpt2_config
from model import GPT
from test_model import seeded_model, tiny


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(path)
    return hf, path


def test_import_matches_transformers_logits(hf_gpt2):
    hf, path = hf_gpt2
    ours = from_hf(str(path)).eval()
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf(idx).logits, atol=1e-4, rtol=0)


def test_export_reloads_in_transformers(hf_gpt2, tmp_path):
    import transformers
    hf, path = hf_gpt2
    ours = from_hf(str(path)).eval()
    message = export_hf(ours, str(tmp_path / "out"), {"kind": "gpt2", "eot_id": 50256})
    assert "GPT2LMHeadModel" in message
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 50257, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(back(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)
    tok = transformers.GPT2Tokenizer.from_pretrained(tmp_path / "out")
    assert tok.encode("Hello world") == [15496, 995]


def test_greedy_generation_matches_transformers(hf_gpt2):
    hf, path = hf_gpt2
    ours = from_hf(str(path)).eval()
    prompt = [464, 2068, 7586, 21831]
    mine = generate(ours, [prompt], 30, temperature=0)[0]
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                      max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=50256)[0, 4:]
    assert mine == ref.tolist()


def test_non_gpt2_export_says_so(tmp_path):
    msg = export_hf(seeded_model(tiny(pos="rope", norm="rmsnorm")), str(tmp_path))
    assert "cannot load" in msg and "pos='rope'" in msg and (tmp_path / "gpt_config.json").exists()


def test_gpt2_124m_parameter_count():
    c = gpt2_config("gpt2")
    c.pad_vocab_to = 1
    c.__post_init__()
    assert GPT(c).num_params() == 124_439_808




def test_an_interrupted_export_leaves_no_folder_that_looks_finished(tmp_path, monkeypatch):
    import hf
    model, out = seeded_model(tiny()), tmp_path / "export"
    real = hf.write_hf_folder

    def dies_half_way(model, folder, tokenizer_meta, chat_template=None):
        real(model, folder, tokenizer_meta, chat_template)
        os.remove(os.path.join(folder, "config.json"))  # as if killed before its last file
        raise KeyboardInterrupt

    monkeypatch.setattr(hf, "write_hf_folder", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        export_hf(model, str(out))
    assert not out.exists()
    monkeypatch.setattr(hf, "write_hf_folder", real)
    export_hf(model, str(out))  # the next export clears the leftovers and publishes whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
