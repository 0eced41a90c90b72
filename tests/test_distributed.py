"""FSDP2 and sharded checkpoints on CPU: torchrun with 2 gloo processes against one process.

The references are independent of the code under test: one process with the same global batch
(gradient accumulation) for the maths, a straight run for resume, and each process's own count
of the parameter and optimizer-state elements it holds for the sharding."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import checkpoint_path, load_checkpoint, save_checkpoint, save_sharded_checkpoint
from conftest import ROOT, make_cfg
from data import RandomBatches
from errors import CheckpointError, UserError
from model import GPT, GPTConfig
from test_train import TINY, params_of, train_cmd
import train as T

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same matmul reduction order in every process
# a constant learning rate: a run of N steps then a resume to 2N follows the same schedule as 2N
STEADY = ["--dropout=0.0", "--gradient_accumulation_steps=2", "--warmup_iters=0", "--lr_schedule=constant"]


def torchrun(n, data, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           *train_cmd(data, out, *extra)[1:]]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def one_process(data, out, *extra):
    done = subprocess.run(train_cmd(data, out, *extra), cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def weights(out, which="last"):
    return params_of(checkpoint_path(str(out), which))


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--mtp_heads=2", "--activation_checkpointing=True",
                                         "--gradient_accumulation_steps=4"], ["--compile=True"]],
                         ids=["plain", "mtp+activation_checkpointing+accumulation", "compile"])
def test_fsdp_matches_one_process(char_data, tmp_path, extra):
    """2 FSDP processes == 1 process with the same global batch (accumulation 2, or 4: then each
    FSDP process accumulates 2 micro-batches before reducing), also with multi-token heads and
    activation checkpointing, and compiled (each block before sharding,
    against the whole model compiled); gradient clipping acts on sharded gradients."""
    common = ["--max_iters=4", "--eval_interval=4", "--grad_clip=0.5", *STEADY, *extra]
    one_process(char_data, tmp_path / "one", *common)
    out = torchrun(2, char_data, tmp_path / "fsdp", "--parallel=fsdp", *common)
    assert "holds 50.0% of the weights" in out
    assert (tmp_path / "fsdp" / "ckpt_last.dcp").is_dir() and not (tmp_path / "fsdp" / "ckpt_last.pt").exists()
    # compiled kernels fuse differently in the two layouts, and FSDP reduce-scatters each
    # micro-batch's gradient (one process sums them first): float rounding, not a different step
    atol = 1e-5 if "--compile=True" in extra or "--gradient_accumulation_steps=4" in extra else 1e-6
    assert_close(weights(tmp_path / "one"), weights(tmp_path / "fsdp"), atol=atol)


@pytest.mark.slow
def test_fsdp_resume_is_exact_and_reshards(char_data, tmp_path):
    """2N steps straight == N + resume + N, bit for bit, with 2 processes; a resume on 1 process
    (resharded by torch.distributed.checkpoint) agrees within float tolerance. Then sample.py,
    evaluate.py and finetune.py read the FSDP run folder directly, and export_ckpt writes it as
    one file."""
    common = ["--parallel=fsdp", "--eval_interval=4", *STEADY]
    torchrun(2, char_data, tmp_path / "straight", "--max_iters=8", *common)
    torchrun(2, char_data, tmp_path / "resumed", "--max_iters=4", *common)
    torchrun(2, char_data, tmp_path / "resumed", "--max_iters=8", "--init_from=resume", *common)
    straight = weights(tmp_path / "straight")
    resumed = weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    torchrun(2, char_data, tmp_path / "fewer", "--max_iters=4", *common)
    one_process(char_data, tmp_path / "fewer", "--max_iters=8", "--init_from=resume", *common)
    assert_close(straight, weights(tmp_path / "fewer"), atol=1e-6)

    run = tmp_path / "straight"
    sample = subprocess.run([sys.executable, "sample.py", f"--out_dir={run}", "--start=ROMEO:", "--num_samples=1",
                             "--max_new_tokens=10", "--device=cpu"], cwd=ROOT, capture_output=True, text=True)
    assert sample.returncode == 0 and "ROMEO:" in sample.stdout, sample.stderr[-2000:]
    export = subprocess.run([sys.executable, "sample.py", f"--out_dir={run}", "--checkpoint=last",
                             f"--export_ckpt={tmp_path / 'one.pt'}"], cwd=ROOT, capture_output=True, text=True)
    assert export.returncode == 0, export.stderr[-2000:]
    single = load_checkpoint(str(tmp_path / "one.pt"))
    assert all(torch.equal(single["model"][k], straight[k]) for k in straight)
    assert "optimizer" not in single and single["model_args"]["n_layer"] == TINY["n_layer"]
    again = subprocess.run([sys.executable, "sample.py", f"--out_dir={run}", f"--export_ckpt={tmp_path / 'one.pt'}"],
                           cwd=ROOT, capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in again.stderr and "Traceback" not in again.stderr
    evaluated = subprocess.run([sys.executable, "evaluate.py", f"--out_dir={run}", "--device=cpu", "--eval_iters=2",
                                f"--data_dir={char_data}", "--block_size=32"], cwd=ROOT, capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads((run / "eval.json").read_text())
    tuned = subprocess.run([sys.executable, "finetune.py", f"--init_from={run}", f"--out_dir={tmp_path / 'ft'}",
                            f"--data_dir={char_data}", "--task=lm", "--max_iters=2", "--eval_interval=2",
                            "--eval_iters=1", "--batch_size=2", "--block_size=32", "--device=cpu", "--plot=False"],
                           cwd=ROOT, capture_output=True, text=True)
    assert tuned.returncode == 0, tuned.stderr[-2000:]


SHARES = """
import json, sys, torch
sys.path.insert(0, {root!r})
import torch.distributed as dist
from compute import setup_compute
from config import load_config
from distributed import shard_model
from model import GPT, GPTConfig
import train as T
dist.init_process_group("gloo")
torch.manual_seed(0)
cfg = load_config([], dict(parallel="fsdp", device="cpu", dtype="float32"))
model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=64))
full_params = sum(p.numel() for p in model.parameters())
shard_model(model, cfg, setup_compute(cfg))
optimizer = T.configure_optimizer(model, cfg, torch.device("cpu"))
x = torch.randint(512, (2, 64))
model(x, x)[1].backward()
optimizer.step()
local = lambda t: t.to_local() if hasattr(t, "to_local") else t
held_params = sum(local(p).numel() for p in model.parameters())
held_state = sum(local(v).numel() for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
print(json.dumps(dict(rank=dist.get_rank(), params=held_params / full_params, state=held_state / (2 * full_params))))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_each_process_holds_half(tmp_path):
    """Each of 2 processes holds about half of the weights and of AdamW's two moments (measured
    by each process on its own tensors, not by the code under test)."""
    script = tmp_path / "shares.py"
    script.write_text(SHARES.format(root=str(ROOT)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    # the two processes share one stdout, so their lines may run together: take each {...}
    shares = [json.loads(text) for text in re.findall(r"\{[^{}]*\}", done.stdout)]
    assert sorted(s["rank"] for s in shares) == [0, 1]
    for s in shares:
        assert 0.45 < s["params"] < 0.55 and 0.45 < s["state"] < 0.55, s


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
def test_fsdp_killed_run_continues_with_init_from_auto(char_data, tmp_path):
    """SIGKILL an FSDP run after its first checkpoint; init_from=auto then resumes it (and starts
    the reference run from scratch), ending with the weights of a run never interrupted."""
    common = ["--parallel=fsdp", "--eval_interval=4", "--max_iters=40", "--init_from=auto", *STEADY]
    torchrun(2, char_data, tmp_path / "straight", *common)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *train_cmd(char_data, killed, *common)[1:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while not (killed / "ckpt_last.dcp" / "state.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    for pid in [*descendants(proc.pid), proc.pid]:  # both workers and torchrun, mid-run
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    stopped_at = load_checkpoint(checkpoint_path(str(killed), "last"))["iter_num"]
    assert 4 <= stopped_at < 40
    out = torchrun(2, char_data, killed, *common)
    assert f"iter {stopped_at + 1}:" in out and "iter 1:" not in out
    straight, resumed = weights(tmp_path / "straight"), weights(killed)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not any(p.name.endswith((".tmp", ".old")) for p in killed.iterdir())


def descendants(pid):
    """Every process below pid (torchrun starts its workers in sessions of their own)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    return [d for c in children for d in (c, *descendants(c))]


def test_sharded_checkpoint_survives_a_crash_between_renames(tmp_path):
    """A crash after the old folder was renamed away and before the new one took its place
    leaves ckpt_last.dcp.old, which readers use; the next save puts things right."""
    cfg = make_cfg(**TINY, parallel="fsdp")
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = T.configure_optimizer(model, cfg, torch.device("cpu"))
    path = str(tmp_path / "ckpt_last.dcp")
    extra = {"model_args": vars(model.config).copy(), "config": cfg.to_dict(), "iter_num": 7}
    save_sharded_checkpoint(extra, path, model, optimizer, master=True)
    os.replace(path, path + ".old")  # the moment between the two renames
    os.makedirs(path + ".tmp")       # and a half-written new folder
    found = checkpoint_path(str(tmp_path), "last")
    assert found == path + ".old"
    ckpt = load_checkpoint(found)
    assert ckpt["iter_num"] == 7 and torch.equal(ckpt["model"]["transformer.wte.weight"], model.transformer.wte.weight)
    save_sharded_checkpoint({**extra, "iter_num": 8}, path, model, optimizer, master=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_last.dcp"]
    assert load_checkpoint(checkpoint_path(str(tmp_path), "last"))["iter_num"] == 8


def test_loader_position_means_the_same_on_any_number_of_processes():
    """A loader state saved by one of 2 processes (accumulation 1 each) and read by 1 process
    (accumulation 2) continues with the same global batches."""
    def batches(loaders, steps):
        out = []
        for _ in range(steps):
            for micro in range(loaders[0].accum):
                out.extend(loader.next() for loader in loaders)
        return [tuple(b) for b in out]

    two = [RandomBatches(1000, 3, 1, 2, r, 5, torch.device("cpu")) for r in range(2)]
    for loader in two:
        loader.make_batch, loader.count_tokens = list, len
    batches(two, 3)
    saved = two[0].state_dict()
    reference = batches(two, 2)  # (rank 0, rank 1) of each step
    one = RandomBatches(1000, 3, 2, 1, 0, 5, torch.device("cpu"))
    one.make_batch, one.count_tokens = list, len
    one.load_state_dict(saved)
    assert batches([one], 2) == reference


def test_fsdp_refusals_are_one_line_before_any_work(char_data, tmp_path):
    """What FSDP cannot do stops at once with one line, also in one process; a .pt run cannot be
    resumed under FSDP, and says how to proceed."""
    from test_train import run_cfg
    for settings, message in ((dict(optimizer="muon"), "optimizer=muon does not run under parallel=fsdp"),
                              (dict(dtype="float16"), "set dtype=bfloat16")):
        with pytest.raises(UserError, match=message):
            T.train(run_cfg(char_data, tmp_path / "refused", parallel="fsdp", max_iters=2, **settings))
        assert not (tmp_path / "refused" / "ckpt_last.dcp").exists()
    T.train(run_cfg(char_data, tmp_path / "ddp", max_iters=2, eval_interval=2))
    with pytest.raises(CheckpointError, match="saved without FSDP; resume it with parallel=ddp"):
        T.train(run_cfg(char_data, tmp_path / "ddp", max_iters=4, eval_interval=2, init_from="resume",
                        parallel="fsdp"))


def test_one_process_fsdp_run_writes_shards_and_auto_resumes_exactly(char_data, tmp_path, monkeypatch):
    """parallel=fsdp without torchrun trains one unsharded process but keeps the FSDP checkpoint
    format, so the same run folder moves between torchrun and a single process; init_from=auto
    starts it, and after a stop at step 3 of 6 resumes it, bit for bit."""
    from conftest import stop_after_steps
    from test_train import run_cfg
    cfg = dict(parallel="fsdp", max_iters=6, eval_interval=3, init_from="auto", dropout=0.0)
    straight = T.train(run_cfg(char_data, tmp_path / "straight", **cfg))["model"].state_dict()
    with stop_after_steps(monkeypatch, 2):
        assert T.train(run_cfg(char_data, tmp_path / "stopped", **cfg))["iter_num"] == 2
    assert (tmp_path / "stopped" / "ckpt_last.dcp" / "state.pt").exists()
    resumed = T.train(run_cfg(char_data, tmp_path / "stopped", **cfg))
    assert resumed["iter_num"] == 6
    assert all(torch.equal(straight[k], v) for k, v in resumed["model"].state_dict().items())


def test_the_newer_checkpoint_wins_when_a_run_changed_parallel_mode(tmp_path):
    """A run folder that holds ckpt_last.pt (DDP) and ckpt_last.dcp (FSDP) resumes from the newer."""
    cfg = make_cfg(**TINY)
    model = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16))
    optimizer = T.configure_optimizer(model, cfg, torch.device("cpu"))
    save_checkpoint({"iter_num": 1}, str(tmp_path / "ckpt_last.pt"))
    time.sleep(0.01)
    save_sharded_checkpoint({"iter_num": 2}, str(tmp_path / "ckpt_last.dcp"), model, optimizer, master=True)
    assert checkpoint_path(str(tmp_path), "last").endswith("ckpt_last.dcp")
    time.sleep(0.01)
    save_checkpoint({"iter_num": 3}, str(tmp_path / "ckpt_last.pt"))
    assert checkpoint_path(str(tmp_path), "last").endswith("ckpt_last.pt")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("target", ["workers", "torchrun"])
def test_sigterm_under_torchrun_saves(char_data, tmp_path, target):
    """SIGTERM to the workers (what a scheduler's signal to the job reaches): they agree on a
    step, save and exit 0, and so does torchrun. SIGTERM to torchrun itself: it forwards the
    signal and the workers save just the same, but torchrun reports its own signal as a failure
    (exit code 1 and its SignalException): torchrun's behaviour, which README's Safety says."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *train_cmd(char_data, tmp_path, "--max_iters=100000", "--eval_interval=100000", *STEADY)[1:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stdout:
        if line.startswith("iter 3:"):
            break
    for pid in descendants(proc.pid) if target == "workers" else [proc.pid]:
        os.kill(pid, signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=120)
    finally:  # a hang must not leave processes behind
        if proc.poll() is None:
            for pid in [*descendants(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
    assert "stopped by signal at iteration" in out, err[-3000:]
    assert load_checkpoint(str(tmp_path / "ckpt_last.pt"))["iter_num"] >= 3
    assert proc.returncode == (0 if target == "workers" else 1), err[-3000:]
