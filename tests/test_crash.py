"""A run interrupted any way (SIGKILL at any moment, during a save too; a full disk; a crash
between ckpt_best and ckpt_last) ends, once continued, exactly where a run never interrupted
ends: the same weights and optimizer state, the same checkpoints, no duplicated rows in
metrics.jsonl, no leftover temporary files."""

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import ROOT
from metrics import MetricsLogger, read_metrics
from test_train import train_cmd

# a model big enough that a checkpoint takes a while to write (about 5 MB with AdamW's moments)
RUN = ["--n_layer=4", "--n_embd=96", "--n_head=4", "--max_iters=120", "--eval_interval=6", "--log_interval=1",
       "--init_from=auto"]


def run(data, out, *extra, **popen):
    return subprocess.run(train_cmd(data, out, *RUN, *extra), cwd=ROOT, capture_output=True, text=True, **popen)


def final_state(out):
    """What must not depend on interruptions: both checkpoints' tensors and the logged losses."""
    state = {}
    for which in ("last", "best"):
        ckpt = load_checkpoint(str(out / f"ckpt_{which}.pt"))
        state[which] = (ckpt["iter_num"], ckpt["best"], ckpt["model"], ckpt["optimizer"]["state"])
    rows = [(r["kind"], r["iter"], r.get("loss"), r.get("val_loss")) for r in read_metrics(out / "metrics.jsonl")]
    return state, rows


def assert_same_state(a, b):
    (ckpts_a, rows_a), (ckpts_b, rows_b) = a, b
    assert rows_a == rows_b  # every step logged once, with the same losses
    for which in ("last", "best"):
        it_a, best_a, model_a, opt_a = ckpts_a[which]
        it_b, best_b, model_b, opt_b = ckpts_b[which]
        assert (it_a, best_a) == (it_b, best_b), which
        assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), which
        for i in opt_a:
            assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for k in ("exp_avg", "exp_avg_sq")), which


def leftovers(out):
    return [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old"))]


def killed_in_save(n):
    """Python for a child process: train.py that dies by SIGKILL halfway through writing its n-th
    checkpoint (part of the file written, the rest not): a kill in the middle of a save."""
    return f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, train
calls, real = 0, torch.save
def save(obj, f, *args, **kwargs):
    global calls
    calls += 1
    if calls == {n}:
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(obj, f, *args, **kwargs)
torch.save = save
train.train(train.cli_config(sys.argv[1:]))
"""


@pytest.mark.slow
def test_random_kills_during_training_and_saves_change_nothing(char_data, tmp_path):
    """SIGKILL a run four times, twice halfway through writing a checkpoint and twice after a
    random step (the kill lands in the step after it, or in a save); init_from=auto continues it
    each time. Every kill waits for an event (a save begun, a step logged), never for a clock, so
    the test means the same on a loaded machine."""
    straight = run(char_data, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    out, rng = tmp_path / "killed", random.Random(0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # log lines reach the pipe as they are printed
    for attempt in range(4):
        last = out / "ckpt_last.pt"
        saved_before = load_checkpoint(str(last))["iter_num"] if last.exists() else 0
        if attempt % 2 == 0:  # halfway through the first save this run makes
            done = subprocess.run([sys.executable, "-c", killed_in_save(1), *train_cmd(char_data, out, *RUN)[2:]],
                                  cwd=ROOT, capture_output=True)
            assert done.returncode == -signal.SIGKILL
            assert any(p.name.endswith(".tmp") for p in out.iterdir()), "the kill landed in a save"
        else:  # after a random logged step
            proc = subprocess.Popen(train_cmd(char_data, out, *RUN), cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, env=env)
            target = saved_before + rng.randint(1, 9)
            for line in proc.stdout:
                if line.startswith(f"iter {target}:"):
                    break
            proc.kill()
            proc.wait()
        now = load_checkpoint(str(last))["iter_num"] if last.exists() else 0
        assert now >= saved_before
    finished = run(char_data, out)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert_same_state(final_state(out), final_state(tmp_path / "straight"))
    assert leftovers(out) == []


def crash_at_save(n):
    """Python for a child process: train.py whose n-th checkpoint write (a save, or the copy of
    ckpt_best to ckpt_last) dies by SIGKILL."""
    return f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import train
calls = 0
def dying(real):
    def write(*args):
        global calls
        calls += 1
        if calls == {n}:
            os.kill(os.getpid(), signal.SIGKILL)
        real(*args)
    return write
train.save_checkpoint, train.copy_checkpoint = dying(train.save_checkpoint), dying(train.copy_checkpoint)
train.train(train.cli_config(sys.argv[1:]))
"""


def test_crash_between_best_and_last_leaves_them_consistent(char_data, tmp_path):
    """Each improving evaluation writes two checkpoints; a crash between them must not leave
    ckpt_best behind ckpt_last's record of the best (the run below improves at every evaluation,
    and the crash hits the second write of the last one)."""
    small = ["--max_iters=6", "--eval_interval=2"]
    straight = subprocess.run(train_cmd(char_data, tmp_path / "straight", *small), cwd=ROOT, capture_output=True)
    assert straight.returncode == 0
    assert load_checkpoint(str(tmp_path / "straight" / "ckpt_best.pt"))["iter_num"] == 6  # improved last
    out = tmp_path / "crashed"
    crashed = subprocess.run([sys.executable, "-c", crash_at_save(6), *train_cmd(char_data, out, *small)[2:]],
                             cwd=ROOT, capture_output=True)
    assert crashed.returncode == -signal.SIGKILL
    resumed = subprocess.run(train_cmd(char_data, out, *small, "--init_from=resume"), cwd=ROOT, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for which in ("best", "last"):
        a = load_checkpoint(str(out / f"ckpt_{which}.pt"))
        b = load_checkpoint(str(tmp_path / "straight" / f"ckpt_{which}.pt"))
        assert (a["iter_num"], a["best"]) == (b["iter_num"], b["best"]), which
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), which


def fill_disk_at(limit):
    """For subprocess preexec_fn: files may not grow past `limit` bytes (as if the disk filled up);
    a write past it fails with an error instead of a SIGXFSZ kill."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses RLIMIT_FSIZE")
def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(char_data, tmp_path):
    out = tmp_path / "run"
    first = run(char_data, out, "--max_iters=3")
    assert first.returncode == 0
    before = (out / "ckpt_last.pt").read_bytes()
    full = run(char_data, out, "--max_iters=6", preexec_fn=fill_disk_at(len(before) // 2))
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert len(errors) == 1 and "ckpt_" in errors[0] and "previous checkpoint is kept" in errors[0], errors
    assert (out / "ckpt_last.pt").read_bytes() == before
    assert leftovers(out) == []  # the partial file is gone: the disk is not left full
    # with space again, the run continues from its checkpoint and logs each step once
    done = run(char_data, out, "--max_iters=6")
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [r["iter"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 7))


def test_resume_drops_log_rows_past_the_checkpoint_and_a_torn_line(tmp_path):
    """A crash after logging steps 4-5 but before saving them (and mid-way through a line)."""
    cfg = type("Cfg", (), {"out_dir": str(tmp_path), "wandb_log": False})()
    rows = [{"kind": "train", "iter": i, "loss": 1.0} for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')
    log = MetricsLogger(cfg, master=True, start_iter=3)
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    log._write({"kind": "train", "iter": 4, "loss": 0.5})
    assert [r["iter"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def handles(pid, signum):
    """Whether process pid has installed a handler for signum (Linux: /proc/PID/status SigCgt)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False
    caught = int(status.split("SigCgt:")[1].split()[0], 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", ["imports", "start-up", "loop"])
def test_a_signal_at_any_moment_ends_with_one_line(char_data, tmp_path, signum, moment):
    """Before the loop (imports, data, model build): one line and exit code 128 + signal, nothing
    written. Once the loop runs: it saves and exits 0. Never a traceback or a silent death.
    Each moment is an event, not a delay: exits.py's handler is in place (torch still loading),
    the config is printed (data and model next), the first step is logged."""
    proc = subprocess.Popen(train_cmd(char_data, tmp_path, "--max_iters=100000", "--eval_interval=100000"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if moment == "imports":  # exits.py installs SIGINT's handler, then SIGTERM's (Python's own catches SIGINT)
        while not handles(proc.pid, signal.SIGTERM) and proc.poll() is None:
            time.sleep(0.01)  # (a poll for an event, not a guess at how long anything takes)
    else:
        wanted = "config (" if moment == "start-up" else "iter 1:"
        for line in proc.stdout:
            if line.startswith(wanted):
                break
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # say where it waits (py-spy, when installed), then fail
        where = subprocess.run(["py-spy", "dump", "--pid", str(proc.pid)], capture_output=True, text=True).stdout \
            if shutil.which("py-spy") else "(py-spy is not installed)"
        proc.kill()
        pytest.fail(f"train.py did not end within 300 s of the signal; it waited in:\n{where}")
    assert "Traceback" not in err, err[-2000:]
    if proc.returncode == 0:  # the loop had started
        assert moment != "imports"
        assert "stopped by signal at iteration" in out and (tmp_path / "ckpt_last.pt").exists()
    else:
        assert moment != "loop"
        assert proc.returncode == 128 + signum, (proc.returncode, err[-2000:])
        name = signal.Signals(signum).name
        assert [line for line in err.splitlines() if line.startswith("stopped by")] == [
            f"stopped by {name}: nothing was half-written; run the command again to do the work"]
        assert not (tmp_path / "ckpt_last.pt").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses RLIMIT_FSIZE")
def test_full_disk_in_preparation_and_export_is_one_line_and_leaves_nothing(char_data, tmp_path):
    """The writers besides the checkpoint: a prepared dataset's shards and --export_hf."""
    from conftest import CACHE
    data = tmp_path / "data"
    done = subprocess.run([sys.executable, "prepare/shakespeare.py", f"--data_dir={data}", f"--cache_dir={CACHE}",
                           "--tokenizer=char", "--shard_tokens=100000"], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=fill_disk_at(50_000))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-2000:]
    assert "nothing was published" in errors[0]
    assert not data.exists() or os.listdir(data) == []  # no work folder, no half a dataset
    out = tmp_path / "run"
    assert run(char_data, out, "--max_iters=2", "--eval_interval=2").returncode == 0
    done = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", f"--export_hf={tmp_path / 'hf'}"],
                          cwd=ROOT, capture_output=True, text=True, preexec_fn=fill_disk_at(20_000))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-2000:]
    assert "could not write the export" in errors[0]
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()
