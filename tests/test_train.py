import os
import platform
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint, strip_wrapper_prefixes
from compute import keep_freed_memory
from conftest import CACHE, ROOT, make_cfg, stop_after_steps
from data import SplitTokens, TokenLoader, load_meta
from distributed import Processes, micro_batches_per_process, wrap_ddp
from errors import ConfigError, UserError
from exits import GracefulStop
from metrics import MetricsLogger, read_metrics
from model import GPT, GPTConfig
import tasks as TK
import train as T

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, log_interval=1,
            warmup_iters=2, learning_rate=3e-3, min_lr=3e-4, device="cpu", dtype="float32", plot=False)


def run_cfg(data, out, **kw):
    return make_cfg(**{**TINY, "data_dir": str(data), "out_dir": str(out), **kw})


def params_of(path):
    return load_checkpoint(str(path))["model"]


def test_loss_falls_on_real_data(char_data, tmp_path):
    summary = T.train(run_cfg(char_data, tmp_path, max_iters=60, eval_interval=30, batch_size=8))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train_losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert all(r["tokens"] == r["iter"] * 8 * 32 for r in rows if r["kind"] == "train")  # tokens seen so far
    assert train_losses[0] > 4.0 and summary["best"] < 3.35  # uniform over 86 chars: 4.45
    assert (tmp_path / "ckpt_last.pt").exists() and (tmp_path / "ckpt_best.pt").exists()
    assert (tmp_path / "config.json").exists()


def test_resume_is_bit_exact(char_data, tmp_path, monkeypatch):
    """2N steps straight == N steps, stop, init_from=resume, N more: every weight bit for bit."""
    kw = dict(max_iters=8, eval_interval=3, dropout=0.1)
    T.train(run_cfg(char_data, tmp_path / "straight", **kw))
    with stop_after_steps(monkeypatch, 4):
        first = T.train(run_cfg(char_data, tmp_path / "split", **kw))
    assert first["iter_num"] == 4
    T.train(run_cfg(char_data, tmp_path / "split", init_from="resume", **kw))
    a, b = params_of(tmp_path / "straight" / "ckpt_last.pt"), params_of(tmp_path / "split" / "ckpt_last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    evals = [r["iter"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == [3, 6, 8]


def test_epochs_set_max_iters(char_data, tmp_path):
    summary = T.train(run_cfg(char_data, tmp_path, epochs=0.0003, eval_interval=1000))
    n_train = len(SplitTokens(char_data, "train"))
    assert summary["iter_num"] == -(-int(0.0003 * n_train) // (4 * 32))


def test_lr_schedules():
    cfg = make_cfg(learning_rate=1.0, min_lr=0.1, warmup_iters=10)
    lrs = [T.lr_at(i, cfg, 100) for i in range(100)]
    assert lrs[0] < lrs[9] < 1.0 and abs(lrs[10] - 1.0) < 1e-9 and abs(T.lr_at(100, cfg, 100) - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    wsd = make_cfg(learning_rate=1.0, min_lr=0.0, warmup_iters=0, lr_schedule="wsd", decay_frac=0.2)
    assert T.lr_at(79, wsd, 100) == 1.0 and T.lr_at(90, wsd, 100) == pytest.approx(0.5)


def test_optimizer_groups_cover_every_parameter_once():
    m = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False))
    opt = T.configure_optimizer(m, make_cfg(weight_decay=0.1), torch.device("cpu"))
    assert len(opt.param_groups) == 2
    for group in opt.param_groups:
        assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for p in group["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def test_checkpoints_carry_no_wrapper_prefixes():
    m = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    wrapped = {f"module._orig_mod.{k}": v for k, v in m.state_dict().items()}
    assert strip_wrapper_prefixes(wrapped).keys() == m.state_dict().keys()
    compiled = torch.compile(m)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())


def test_loader_splits_one_global_batch_across_processes(char_data):
    single = TokenLoader(char_data, "val", 3, 16, accum=2, world=1, rank=0, seed=5, device=torch.device("cpu"))
    ranks = [TokenLoader(char_data, "val", 3, 16, accum=1, world=2, rank=r, seed=5, device=torch.device("cpu"))
             for r in (0, 1)]
    for _ in range(3):
        a0, a1 = single.next()[0], single.next()[0]
        assert torch.equal(a0, ranks[0].next()[0]) and torch.equal(a1, ranks[1].next()[0])


def test_loader_state_round_trip(char_data):
    make = lambda: TokenLoader(char_data, "val", 2, 8, 3, 1, 0, 7, torch.device("cpu"))  # noqa: E731
    a = make()
    a.next()
    state = a.state_dict()
    rest = [a.next()[0] for _ in range(5)]
    b = make()
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next()[0]) for x in rest)


def test_overfitting_warning(tmp_path, capsys):
    log = MetricsLogger(make_cfg(out_dir=str(tmp_path), overfit_patience=2, plot=True), True, 0)
    for it, (tr, va) in enumerate([(2.0, 1.9), (1.8, 1.8), (1.6, 1.85), (1.4, 1.95)]):
        log.eval(it, {"train": tr, "val": va}, False)
    out = capsys.readouterr().out
    assert out.count("overfitting") == 1 and (tmp_path / "loss.png").stat().st_size > 1000


def test_killed_during_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt_last.pt"
    save_checkpoint({"iter_num": 1, "w": torch.ones(3)}, str(path))
    child = f"""
import os, sys, torch
sys.path.insert(0, {str(ROOT)!r})
import checkpoint
real_save = torch.save
def dying_save(obj, f):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), 9)
torch.save = dying_save
checkpoint.save_checkpoint({{"iter_num": 2, "w": torch.zeros(3)}}, {str(path)!r})
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True)
    assert done.returncode == -9
    state = load_checkpoint(str(path))
    assert state["iter_num"] == 1 and torch.equal(state["w"], torch.ones(3))


def train_cmd(data, out, *extra):
    args = [f"--{k}={v}" for k, v in {**TINY, "data_dir": data, "out_dir": out}.items()]
    return [sys.executable, "train.py", *args, *extra]


def test_sigterm_saves_and_exits_zero(char_data, tmp_path):
    proc = subprocess.Popen(train_cmd(char_data, tmp_path, "--max_iters=100000", "--eval_interval=100000"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("iter 3:"):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    it = load_checkpoint(str(tmp_path / "ckpt_last.pt"))["iter_num"]
    assert 3 <= it < 100000


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--mtp_heads=2", "--optimizer=muon"], ["--arch=lstm", "--n_embd=48"],
                                   ["--arch=cnn", "--n_embd=48", "--conv_kernel=3"]],
                         ids=["adamw", "mtp+muon", "lstm", "cnn"])
def test_ddp_matches_gradient_accumulation(char_data, tmp_path, extra):
    """torchrun with 2 gloo processes == 1 process with accumulation 2 (same data, same steps),
    also with multi-token heads (checkpointed backward) and Muon, and for the LSTM and the CNN."""
    common = ["--max_iters=4", "--eval_interval=4", "--dropout=0.0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same matmul reduction order in every process
    single = subprocess.run(train_cmd(char_data, tmp_path / "one", "--gradient_accumulation_steps=2", *common),
                            cwd=ROOT, capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    # the same global batch: gradient_accumulation_steps counts micro-batches over all processes
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *train_cmd(char_data, tmp_path / "two", "--gradient_accumulation_steps=2", *common)[1:]],
                         cwd=ROOT, capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = params_of(tmp_path / "one" / "ckpt_last.pt"), params_of(tmp_path / "two" / "ckpt_last.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert len(load_checkpoint(str(tmp_path / "two" / "ckpt_last.pt"))["rng"]) == 2


@pytest.mark.slow
def test_quick_start_end_to_end(tmp_path):
    """prepare (automatic) -> train a few iterations of the CPU config -> sample, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out, data = tmp_path / "out", tmp_path / "data"
    t0 = time.time()
    done = subprocess.run([sys.executable, "train.py", "configs/shakespeare_char_cpu.py", f"--out_dir={out}",
                           f"--data_dir={data}", f"--cache_dir={CACHE}", "--max_iters=20", "--eval_interval=10",
                           "--eval_iters=2"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "preparing Shakespeare" in done.stdout and (data / "meta.json").exists()
    assert (out / "loss.png").exists() and (out / "metrics.jsonl").exists()
    sample = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=2",
                             "--max_new_tokens=30"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.count("ROMEO:") == 2 and "tokens/s" in sample.stderr
    assert time.time() - t0 < 120


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_stops_refaulting_freed_buffers():
    """Without it glibc gives 40 MiB of freed tensors back to the OS and the next step faults all
    of it in again (5 rounds x 10 x 1024 pages = 51,200 faults); with it the memory is reused."""
    keep_freed_memory()

    def step():
        buffers = [torch.ones(1 << 20) for _ in range(10)]  # 10 x 4 MiB, every page written
        del buffers
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 10_000


def test_global_batch_does_not_grow_with_processes(char_data, tmp_path):
    """gradient_accumulation_steps is the global micro-batch count: each of W processes runs
    accum / W of them, and a count that does not divide is a one-line error."""
    cfg = run_cfg(char_data, tmp_path, gradient_accumulation_steps=8)
    assert micro_batches_per_process(cfg, 1) == 8 and micro_batches_per_process(cfg, 8) == 1
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=8 .* must divide by the 3 processes"):
        micro_batches_per_process(cfg, 3)
    task = TK.LMTask(cfg, Processes(1, 4, torch.device("cpu")), load_meta(str(char_data)))
    assert task.loader.accum == 2 and task.items_per_iter == 4 * 32 * 8


def test_tokens_survive_resume(char_data, tmp_path, monkeypatch):
    kw = {"max_iters": 6, "eval_interval": 3, "gradient_accumulation_steps": 2}
    with stop_after_steps(monkeypatch, 2):
        T.train(run_cfg(char_data, tmp_path, **kw))
    T.train(run_cfg(char_data, tmp_path, init_from="resume", **kw))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["tokens"] for r in rows][-1] == 6 * 4 * 32 * 2


def test_resuming_with_another_optimizer_is_a_clear_error(char_data, tmp_path, monkeypatch):
    with stop_after_steps(monkeypatch, 2):
        T.train(run_cfg(char_data, tmp_path, max_iters=4, eval_interval=4))
    with pytest.raises(UserError, match="trained with optimizer='adamw' \\(not 'muon'\\)"):
        T.train(run_cfg(char_data, tmp_path, max_iters=4, eval_interval=4, init_from="resume", optimizer="muon"))


def test_resume_keeps_the_run_settings_and_names_every_contradiction(char_data, sp_data, tmp_path, monkeypatch):
    """A resume takes every setting the command leaves unset from the checkpoint (so a bare
    `--init_from=resume` continues the same run); settings it contradicts stop it with one line
    naming each; the keys that may change (max_iters, eval_interval, ...) change."""
    from config import load_config
    with stop_after_steps(monkeypatch, 2):
        T.train(run_cfg(char_data, tmp_path, max_iters=6, eval_interval=3, batch_size=3))
    bare = load_config([f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=4", "--eval_interval=2",
                        "--plot=False"])
    summary = T.train(bare)
    assert summary["iter_num"] == 4 and bare.batch_size == 3
    assert summary["model"].config.n_layer == TINY["n_layer"]  # the shape is the model's own (model_args)
    assert bare.data_dir == str(char_data) and bare.eval_interval == 2
    with pytest.raises(UserError) as stop:
        T.train(run_cfg(char_data, tmp_path, max_iters=6, eval_interval=3, batch_size=5, n_layer=3,
                        init_from="resume"))
    message = str(stop.value)
    assert "batch_size=3 (not 5)" in message and "n_layer=2 (not 3)" in message and "\n" not in message
    with pytest.raises(UserError, match="data_dir="):
        T.train(run_cfg(sp_data, tmp_path, max_iters=6, eval_interval=3, batch_size=3, init_from="resume"))
    assert load_checkpoint(str(tmp_path / "ckpt_last.pt"))["iter_num"] == 4  # nothing was written


def test_stop_signal_costs_no_host_sync_between_log_steps(monkeypatch):
    """Under torchrun the processes agree on stopping with an all-reduce and a read-back; that
    must happen only at log and evaluation steps."""
    def forbidden(*args, **kwargs):
        raise AssertionError("all_reduce on a step that is not a log step")
    monkeypatch.setattr(torch.distributed, "all_reduce", forbidden)
    stop = GracefulStop()
    try:
        stop.requested = True
        assert stop.agreed(2, torch.device("cpu"), check_now=False) is False
        assert stop.agreed(1, torch.device("cpu"), check_now=False) is True  # one process: free to ask
        with pytest.raises(AssertionError, match="not a log step"):
            stop.agreed(2, torch.device("cpu"), check_now=True)
    finally:
        stop.close()


def test_ddp_does_not_broadcast_buffers(tmp_path):
    """The RoPE tables are buffers; DDP's default would copy them from rank 0 before every forward."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = wrap_ddp(GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, pos="rope")),
                         torch.device("cpu"))
        assert getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers) is False
    finally:
        dist.destroy_process_group()


def test_a_restored_checkpoint_is_not_kept_in_memory(char_data, tmp_path, monkeypatch):
    """Resuming, fit restores the model and optimizer from the checkpoint dict, then empties it:
    the caller's reference (train's Loaded) would otherwise hold a second copy of the weights and
    the optimizer state for the whole run."""
    from checkpoint import continue_run, load_model
    from distributed import setup_processes
    from tasks import LMTask
    with stop_after_steps(monkeypatch, 2):
        T.train(run_cfg(char_data, tmp_path, max_iters=4, eval_interval=4))
    cfg = run_cfg(char_data, tmp_path, max_iters=4, eval_interval=4, init_from="resume")
    loaded = load_model(cfg)
    continue_run(cfg, loaded)
    procs = setup_processes(cfg)
    ckpt = loaded.checkpoint
    assert "optimizer" in ckpt
    summary = T.fit(cfg, procs, loaded.model, LMTask(cfg, procs, load_meta(str(char_data))), ckpt)
    assert summary["iter_num"] == 4 and ckpt == {}
