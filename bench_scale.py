"""
The costs at scale that a CPU can measure (issue 33), each before and after its fix:

    python bench_scale.py loss          # the chunked loss's backward, 1k to 8k rows of a 50,304 vocabulary
    python bench_scale.py checkpoint    # one evaluation's checkpoint writes, GPT-2 124M + AdamW state
    python bench_scale.py fsdp          # host memory per process when FSDP builds GPT-2 124M and 350M

Each measurement runs in a fresh process and reports its time and its peak resident memory
(VmHWM) above what the process held before it began. Record the figures in
docs/benchmarks.md with the date, machine, torch version and the exact command.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 50304


def peak_rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def current_rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def in_fresh_process(*args):
    """Run this file's `one` mode in a new process (peak memory is per process) and print its line."""
    done = subprocess.run([sys.executable, __file__, "one", *args], cwd=HERE, capture_output=True, text=True)
    print(done.stdout.strip() or done.stderr.strip().splitlines()[-1], flush=True)


# ----------------------------------------------------------------------------- the chunked loss

def summed_ce(logits, targets):
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def sliced_loss(logits, targets, rows):
    """The loss as it was before: chunks sliced out of the logits."""
    total = logits.new_zeros((), dtype=torch.float32)
    for i in range(0, len(targets), rows):
        total = total + checkpoint(summed_ce, logits[i:i + rows], targets[i:i + rows], use_reentrant=False)
    return total / len(targets)


def loss_once(method, n_rows):
    from systems import CE_CHUNK_ELEMENTS, chunked_cross_entropy
    torch.manual_seed(0)
    logits = torch.randn(n_rows, VOCAB, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(VOCAB, (n_rows,))
    losses = {"sliced (before)": lambda: sliced_loss(logits, targets, CE_CHUNK_ELEMENTS // VOCAB),
              "split (now)": lambda: chunked_cross_entropy(logits[None], targets[None]),
              "one float32 call": lambda: F.cross_entropy(logits.float(), targets)}
    base = current_rss_mib()
    t0 = time.perf_counter()
    loss = losses[method]()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    print(f"{n_rows:5d} rows  {method:17s} forward {t1 - t0:6.2f} s  backward {t2 - t1:6.2f} s  "
          f"peak +{peak_rss_mib() - base:6.0f} MiB   (logits {logits.numel() * 2 / 2**20:.0f} MiB bf16)")


# ----------------------------------------------------------------------------- checkpoints

def gpt2_124m_state():
    """GPT-2 124M's weights and an AdamW state of the same shapes, as a checkpoint holds them."""
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=50257, pad_vocab_to=64))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": 1}


def checkpoint_once(method):
    from checkpoint import copy_checkpoint, save_checkpoint
    from files import atomic_write
    state = gpt2_124m_state()
    with tempfile.TemporaryDirectory() as folder:
        best, last = os.path.join(folder, "ckpt_best.pt"), os.path.join(folder, "ckpt_last.pt")
        t0 = time.perf_counter()
        save_checkpoint(state, best)
        t1 = time.perf_counter()
        if method == "serialise twice (before)":
            save_checkpoint(state, last)
        elif method == "save + link (now)":
            copy_checkpoint(best, last)
        else:
            with open(best, "rb") as f, atomic_write(last, "wb") as out:
                shutil.copyfileobj(f, out, 16 << 20)
        t2 = time.perf_counter()
        size = os.path.getsize(best) / 2**20
    print(f"an improving evaluation, {method:24s} ckpt_best {t1 - t0:5.2f} s + ckpt_last {t2 - t1:5.2f} s = "
          f"{t2 - t0:5.2f} s  ({size:.0f} MiB each)")


# ----------------------------------------------------------------------------- FSDP's build

FSDP_CHILD = """
import os, sys, resource
sys.path.insert(0, {here!r})
import torch, torch.distributed as dist
from types import SimpleNamespace
dist.init_process_group("gloo")
import distributed as D
from model import GPT, GPTConfig
rank = dist.get_rank()
config = GPTConfig(n_layer={n_layer}, n_head={n_head}, n_embd={n_embd}, vocab_size=50257, pad_vocab_to=64)
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
base = rss()
every_rank_builds = {every!r}
torch.manual_seed(0)
if every_rank_builds or rank == 0:
    model = GPT(config)
else:
    with torch.device("meta"):
        model = GPT(config)
D.shard_model(model, SimpleNamespace(compile=False, fsdp_reshard_after_forward=True),
              SimpleNamespace(dtype=torch.float32, device=torch.device("cpu")))
dist.barrier()
print(f"rank {{rank}}: peak +{{rss() - base:.0f}} MiB", flush=True)
dist.destroy_process_group()
"""


def fsdp_build(shape, every_rank_builds):
    """Two gloo processes shard a GPT-2 model; each reports its peak host memory."""
    n_layer, n_head, n_embd = {"124M": (12, 12, 768), "350M": (24, 16, 1024)}[shape]
    code = FSDP_CHILD.format(here=HERE, n_layer=n_layer, n_head=n_head, n_embd=n_embd, every=every_rank_builds)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               f.name], cwd=HERE, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.remove(f.name)
    lines = sorted(re.findall(r"rank \d: peak \+\d+ MiB", done.stdout))  # (the two processes' lines may interleave)
    how = "every rank builds it (before)" if every_rank_builds else "rank 0 builds, others on meta (now)"
    print(f"GPT-2 {shape}, 2 processes, {how:36s} " + "; ".join(lines) if lines else done.stderr[-1500:], flush=True)


if __name__ == "__main__":
    what = sys.argv[1:] or ["loss", "checkpoint", "fsdp"]
    if what[0] == "one":
        kind, *rest = what[1:]
        if kind == "loss":
            loss_once(rest[0], int(rest[1]))
        else:
            checkpoint_once(rest[0])
        sys.exit()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores", flush=True)
    if "loss" in what:
        for n_rows in (1024, 2048, 4096, 8192):
            for method in ("sliced (before)", "split (now)", "one float32 call"):
                in_fresh_process("loss", method, str(n_rows))
    if "checkpoint" in what:
        for method in ("serialise twice (before)", "save + link (now)", "save + copy (no links)"):
            in_fresh_process("checkpoint", method)
    if "fsdp" in what:
        for shape in ("124M", "350M"):
            for every in (True, False):
                fsdp_build(shape, every)
