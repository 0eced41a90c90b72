"""
Training speed of any config: ms/iter, tokens/s, MFU (GPUs) and peak memory, with torch.compile
off and on. Uses train.py's own step on real batches, so what it measures is what training runs.

    python bench.py configs/shakespeare_char_cpu.py
    python bench.py configs/gpt2_124m.py --batch_size=16      # on a GPU

Record results in docs/benchmarks.md with the date, machine, torch version and exact command.
"""

import exits  # noqa: F401  first: from here on a signal or a failed write ends the program with one line

import resource
import time

import torch

from checkpoint import load_model
from compute import peak_flops, setup_compute
from config import cli_config
from data import ensure_data
from distributed import Processes
from errors import ConfigError
from tasks import LMTask
from systems import checkpoint_blocks
from train import configure_optimizer, train_step

WARMUP, TIMED = 5, 20


def measure(cfg, compile_model):
    """One process: the model, optimizer and batches training would use, timed step by step."""
    compute = setup_compute(cfg)  # the same device, dtype, autocast and TF32 setting as training
    device, dtype, autocast = compute.device, compute.dtype, compute.autocast
    meta = ensure_data(cfg, master=True)
    torch.manual_seed(cfg.seed)
    raw = load_model(cfg, "scratch", meta).model.to(device)
    try:  # (a model without blocks, arch=lstm, refuses it)
        checkpoint_blocks(raw) if cfg.activation_checkpointing else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = torch.compile(raw) if compile_model else raw
    optimizer = configure_optimizer(raw, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    task = LMTask(cfg, Processes(0, 1, device), meta, raw.config.arch)
    loader = task.loader
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_compile = time.time()
    for _ in range(WARMUP):  # includes compilation when compile is on
        loss, _ = train_step(model, optimizer, scaler, loader, cfg, autocast, task.loss)
    loss.item()
    sync()
    t_compile = time.time() - t_compile
    t0 = time.time()
    for _ in range(TIMED):
        loss, _ = train_step(model, optimizer, scaler, loader, cfg, autocast, task.loss)
    loss.item()
    sync()
    ms = (time.time() - t0) / TIMED * 1000
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    peak = peak_flops(device)
    mfu = raw.flops_per_token(cfg.block_size) * tokens / (ms / 1000) / peak if peak else None
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # peak resident set of this process (Linux reports KiB)
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"compile": compile_model, "ms_per_iter": ms, "tokens_per_s": tokens / (ms / 1000), "mfu": mfu,
            "peak_mem_gib": memory, "warmup_s": t_compile, "device": str(device), "dtype": str(dtype).split(".")[1]}


def main():
    cfg = cli_config()
    print(f"torch {torch.__version__}, {cfg.n_layer}x{cfg.n_embd} ctx {cfg.block_size}, "
          f"batch {cfg.batch_size}x{cfg.gradient_accumulation_steps}, {WARMUP} warm-up + {TIMED} timed steps")
    rows = [measure(cfg, compile_model) for compile_model in (False, True)]
    print(f"{'compile':>8} {'ms/iter':>9} {'tokens/s':>10} {'MFU':>6} {'peak mem':>9} {'warm-up':>8}  device")
    for r in rows:
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{str(r['compile']):>8} {r['ms_per_iter']:9.1f} {r['tokens_per_s']:10,.0f} {mfu:>6} "
              f"{r['peak_mem_gib']:8.2f}G {r['warmup_s']:7.1f}s  {r['device']} {r['dtype']}")


if __name__ == "__main__":
    main()
