import json
import subprocess
import sys

import pytest

from config import ConfigError, KEYS, load_config
from conftest import ROOT


def test_defaults_and_types():
    cfg = load_config([])
    for k in KEYS:
        assert type(getattr(cfg, k.name)) is k.type or k.name == "data_dir"
    assert cfg.data_dir == "data/shakespeare_char"  # derived from dataset and tokenizer


def test_files_and_overrides_apply_in_order(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("learning_rate = 1e-2\nbatch_size = 4\nimport math\n_private = 3\n")
    b.write_text("learning_rate = 3e-3\n")
    cfg = load_config([str(a), "--learning_rate=5e-4", "--batch_size=8"])
    assert (cfg.learning_rate, cfg.batch_size) == (5e-4, 8)
    cfg = load_config([str(a), "--learning_rate=5e-4", str(b)])
    assert cfg.learning_rate == 3e-3 and cfg.batch_size == 4


def test_parsing_of_values():
    cfg = load_config(["--compile=True", "--dropout=0", "--start=ROMEO:", "--out_dir=x y", "--wandb_log=false"])
    assert cfg.compile is True and cfg.dropout == 0.0 and type(cfg.dropout) is float
    assert cfg.start == "ROMEO:" and cfg.out_dir == "x y" and cfg.wandb_log is False


@pytest.mark.parametrize("argv, words", [
    (["--learning_rat=1e-3"], ["unknown config key 'learning_rat'", "did you mean 'learning_rate'"]),
    (["--batch_size=1.5"], ["'batch_size' expects int", "1.5"]),
    (["--compile=maybe"], ["'compile' expects bool"]),
    (["--norm=batchnorm"], ["'norm' must be one of", "batchnorm"]),
    (["--batch_size"], ["--key=value"]),
])
def test_bad_overrides_name_the_key(argv, words):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    for w in words:
        assert w in str(e.value)


def test_bad_config_file(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("n_layr = 4\n")
    with pytest.raises(ConfigError, match=r"c.py: unknown config key 'n_layr'; did you mean 'n_layer'"):
        load_config([str(f)])
    f.write_text("n_layer = '4'\n")
    with pytest.raises(ConfigError, match=r"'n_layer' expects int, got str '4'"):
        load_config([str(f)])
    with pytest.raises(ConfigError, match="cannot read"):
        load_config([str(tmp_path / "missing.py")])


@pytest.mark.parametrize("script", ["train.py", "sample.py", "prepare/text.py"])
def test_help_lists_the_keys_the_script_reads_first(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    name = "prepare" if script.startswith("prepare/") else script.removesuffix(".py")
    mine, rest = out.stdout.split("other scripts' keys")
    for k in KEYS:
        assert (f"--{k.name}=" in mine) == (name in k.scripts), k.name
        assert (name in k.scripts) or f" {k.name}," in rest or rest.rstrip().endswith(f" {k.name}"), k.name
    assert "--temperature=" in mine if name == "sample" else "--temperature=" not in mine


def test_every_key_is_read_by_the_code():
    """A key nothing reads is a defect: each is read as cfg.<key>, or is a model field
    (GPTConfig.from_config picks those by name), or is the preset bundle itself."""
    from dataclasses import fields

    from model import GPTConfig
    source = "".join(p.read_text() for p in [*ROOT.glob("*.py"), *ROOT.glob("prepare/*.py")])
    model_fields = {f.name for f in fields(GPTConfig)}
    for k in KEYS:
        assert f"cfg.{k.name}" in source or k.name in model_fields or k.name == "preset", k.name


def test_cli_one_line_errors():
    bad = subprocess.run([sys.executable, "train.py", "--n_layr=2"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: --n_layr: unknown config key 'n_layr'; did you mean 'n_layer'?"


def test_every_config_file_loads():
    for path in sorted((ROOT / "configs").glob("*.py")):
        load_config([str(path)])


def test_config_json_shows_the_model_and_cfg_keeps_no_copy_of_its_shape(tmp_path):
    """config.json records the run with the model's own shape; cfg itself is not rewritten (the
    model's config owns its shape), and a checkpoint's settings leave the shape out."""
    from checkpoint import MODEL_KEYS, record_config, run_settings
    from model import GPTConfig
    cfg = load_config([f"--out_dir={tmp_path}", "--n_layer=3", "--batch_size=5"])
    record_config(cfg, GPTConfig(n_layer=2, n_head=2, n_embd=32), master=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["n_layer"], saved["n_embd"], saved["batch_size"]) == (2, 32, 5) and cfg.n_layer == 3
    assert "batch_size" in run_settings(cfg) and not set(MODEL_KEYS) & run_settings(cfg).keys()


def test_presets_apply_where_they_appear(tmp_path):
    from config import PRESETS
    cfg = load_config(["--preset=modern"])
    assert all(getattr(cfg, k) == v for k, v in PRESETS["modern"].items())
    cfg = load_config(["--preset=modern", "--mlp=swiglu"])
    assert cfg.mlp == "swiglu" and cfg.pos == "rope"   # a later key overrides the preset
    cfg = load_config(["--mlp=swiglu", "--preset=modern"])
    assert cfg.mlp == "relu2"                          # the preset overrides what came before
    assert all(getattr(load_config(["--preset=gpt2"]), k) == getattr(load_config([]), k) for k in PRESETS["gpt2"])


# the run's own value for each key that may change on resume (none of them a default)
RUN_VALUES = {"max_iters": 2000, "epochs": 1.5, "min_lr": 1e-5, "eval_interval": 100, "eval_iters": 7,
              "log_interval": 5, "patience": 4, "min_delta": 0.01, "overfit_patience": 0, "plot": False,
              "wandb_log": True, "wandb_project": "mine", "wandb_run_name": "r1", "device": "cpu",
              "dtype": "float32", "compile": True, "parallel": "fsdp", "fsdp_reshard_after_forward": False,
              "activation_checkpointing": True, "cache_dir": "elsewhere", "gpt2_bpe_path": "bpe.tiktoken"}


def test_a_resume_takes_every_key_it_does_not_name_from_the_run():
    """Key by key: `--init_from=resume` alone continues the run as it was set up, also for the
    keys a command may change (they fell back to their defaults before)."""
    from config import MAY_CHANGE_ON_RESUME, RESUME_SAYS
    assert set(RUN_VALUES) == set(MAY_CHANGE_ON_RESUME) - set(RESUME_SAYS)
    saved = {**load_config([], {"learning_rate": 1e-3, "batch_size": 7}).to_dict(), **RUN_VALUES,
             "out_dir": "old_place", "init_from": "scratch"}
    for name, value in RUN_VALUES.items():
        assert KEYS[[k.name for k in KEYS].index(name)].default != value, name
    cfg = load_config(["--init_from=resume", "--out_dir=run"])
    cfg.continue_run(saved, "run")
    for name, value in RUN_VALUES.items():
        assert getattr(cfg, name) == value, name
    assert (cfg.learning_rate, cfg.batch_size, cfg.init_from, cfg.out_dir) == (1e-3, 7, "resume", "run")


@pytest.mark.parametrize("name", sorted(RUN_VALUES))
def test_a_resume_changes_only_what_the_command_names(name):
    from config import KEY_BY_NAME
    saved = {**load_config([]).to_dict(), **RUN_VALUES}
    named = KEY_BY_NAME[name].default  # the command names the key, with its default value
    cfg = load_config(["--init_from=resume", f"--{name}={named}"])
    cfg.continue_run(saved, "run")
    assert getattr(cfg, name) == named
    assert all(getattr(cfg, other) == value for other, value in RUN_VALUES.items() if other != name)
