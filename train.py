"""
Pretrain a GPT on prepared token files, on a laptop CPU, one GPU, or many under torchrun.

    python train.py configs/shakespeare_char_cpu.py
    python train.py configs/shakespeare_char.py --batch_size=32 --compile=True
    torchrun --nproc_per_node=8 train.py configs/gpt2_124m.py

Read train() top to bottom: it is the whole job. The pieces it calls (device and dtype, the
token loader, model construction, optimizer groups, LR schedule, evaluation, checkpoints, the
metrics logger) are plain functions and classes below it; finetune.py imports them, so there is
one training loop in this codebase, not two.

Exactness contract (tested): on CPU in float32, training 2N steps straight gives bit-for-bit the
weights of N steps + init_from=resume + N steps. Everything that decides the next step lives in
the checkpoint: model, optimizer, scaler, iteration, RNG states, and the loader's position.
"""

import contextlib
import ctypes
import io
import json
import math
import os
import random
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from config import cli_config, save_json
from muon import CombinedOptimizer, Muon
from model import GPT, GPTClassifier, GPTConfig, add_lora, document_ids, from_hf, merge_lora
from prepare.common import DataError, load_meta, read_tokens


def train(cfg):
    """Pretrain as cfg says; returns a summary dict (iterations, best metric, the model)."""
    dist = setup(cfg)
    meta = ensure_data(cfg, dist["rank"] == 0)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt_last.pt")) if cfg.init_from == "resume" else None
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, meta, ckpt)
    task = LMTask(cfg, dist, meta)
    return fit(cfg, dist, model, task, ckpt, extra_state={"tokenizer": meta["tokenizer"]})


def setup(cfg):
    """Processes, TF32, the run folder and its config.json; returns the process info dict."""
    dist = setup_distributed(cfg)
    if dist["device"].type == "cpu":
        keep_freed_memory()
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ matmuls: ~free speed, tiny precision cost
    torch.backends.cudnn.allow_tf32 = True
    if dist["rank"] == 0:
        print(f"config:\n{cfg}")
        os.makedirs(cfg.out_dir, exist_ok=True)
        save_json(cfg, os.path.join(cfg.out_dir, "config.json"))
    return dist


def fit(cfg, dist, model, task, ckpt=None, lr_scale=None, grad_filter=None, extra_state=None):
    """The training loop, for any task: task.loader gives batches, task.loss(model, batch) the
    loss, task.evaluate(model, autocast) a dict with 'train' and 'val' losses and any task
    metrics. lr_scale(name) -> factor gives per-parameter learning rates; grad_filter(it, model)
    may drop gradients before each step (gradual unfreezing). extra_state goes into checkpoints.

    cfg.best_metric picks ckpt_best.pt ('val_loss': lower is better; any other metric the task
    reports: higher is better); cfg.patience > 0 stops early when it has not improved by
    min_delta for that many evaluations, and the best weights are loaded back into the model."""
    master = dist["rank"] == 0
    device, dtype = dist["device"], pick_dtype(cfg.dtype, dist["device"])
    model = model.to(device)
    optimizer = configure_optimizer(model, cfg, device, lr_scale)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loader = task.loader
    max_iters = cfg.max_iters
    if cfg.epochs > 0:
        max_iters = math.ceil(cfg.epochs * task.train_size / task.items_per_iter)
    start_iter, best, since_best = 0, None, 0
    torch.manual_seed(cfg.seed + dist["rank"])  # dropout masks differ between ranks
    if ckpt is not None and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])
        start_iter, best, since_best = ckpt["iter_num"], ckpt["best"], ckpt["since_best"]
        set_rng_state(ckpt["rng"][dist["rank"]] if dist["rank"] < len(ckpt["rng"]) else ckpt["rng"][0])
    del ckpt

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if dist["world"] > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = autocast_context(device, dtype)
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * dist["world"]
    flops_per_iter = raw_model.flops_per_token(cfg.block_size) * tokens_per_iter
    peak = peak_flops(device)
    if master:
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters "
              f"({raw_model.num_params(embeddings=False) / 1e6:.2f}M without embeddings)")
        print(f"global batch: {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation x {dist['world']} "
              f"processes = {tokens_per_iter:,} token slots of {cfg.block_size}; "
              f"max_iters {max_iters} = {max_iters * task.items_per_iter / task.train_size:.2f} epochs")
    def save(is_best):  # every process builds the state (it gathers RNG states); the master writes
        state = checkpoint_state(raw_model, optimizer, scaler, loader, it, best, since_best, cfg, dist,
                                 **(extra_state or {}))
        save_run(state, cfg.out_dir, is_best, master)

    log = MetricsLogger(cfg, master, start_iter)
    stop = GracefulStop()
    pbar = progress_bar(max_iters, start_iter, master)
    it, t0, train_loss, early = start_iter, time.time(), None, False
    while it < max_iters:
        lr = lr_at(it, cfg, max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        loss, grad_norm = train_step(model, optimizer, scaler, loader, cfg, autocast, task.loss,
                                     None if grad_filter is None else lambda: grad_filter(it, raw_model))
        it += 1
        pbar.update(1)
        if it % cfg.log_interval == 0 or it == max_iters:
            dt, t0 = time.time() - t0, time.time()
            steps = cfg.log_interval if it % cfg.log_interval == 0 else it % cfg.log_interval
            train_loss = loss.item()  # the only host sync, and only at log steps
            tps = steps * tokens_per_iter / dt
            mfu = flops_per_iter * steps / dt / (peak * dist["world"]) if peak else None
            log.train(it, train_loss, lr, grad_norm.item(), tps, mfu)
            pbar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        stop_now = stop.agreed(dist["world"], device)
        if it % cfg.eval_interval == 0 or it == max_iters:
            results = task.evaluate(model, autocast)
            value = results["val"] if cfg.best_metric == "val_loss" else results.get(cfg.best_metric)
            if value is None:
                raise SystemExit(f"error: best_metric={cfg.best_metric!r} is not reported by this task "
                                 f"(it reports val_loss, {', '.join(k for k in results if k not in ('train', 'val'))})")
            # how much better than the best so far (loss: lower is better; task metrics: higher)
            gain = math.inf if best is None else (best - value if cfg.best_metric == "val_loss" else value - best)
            since_best = 0 if gain > cfg.min_delta else since_best + 1
            best = value if gain > 0 else best
            log.eval(it, results, gain > 0)
            early = cfg.patience > 0 and since_best >= cfg.patience
            save(gain > 0)
            t0 = time.time()  # evaluation time is not training throughput
        elif stop_now:
            save(False)
        if stop_now:
            pbar.write(f"stopped by signal at iteration {it}; saved {cfg.out_dir}/ckpt_last.pt "
                       f"(continue with init_from=resume)")
            break
        if early:
            pbar.write(f"early stopping at iteration {it}: {cfg.best_metric} has not improved by more than "
                       f"{cfg.min_delta} for {cfg.patience} evaluations; best {best:.4f} restored from ckpt_best.pt")
            raw_model.load_state_dict(load_checkpoint(os.path.join(cfg.out_dir, "ckpt_best.pt"))["model"])
            break
    pbar.close()
    log.close()
    stop.close()
    if dist["world"] > 1:
        torch_dist.destroy_process_group()
    return {"iter_num": it, "best": best, "best_metric": cfg.best_metric, "train_loss": train_loss,
            "stopped_early": early, "model": raw_model}


class LMTask:
    """Next-token prediction over token files (pretraining, and finetune.py's task=lm)."""

    def __init__(self, cfg, dist, meta):
        self.cfg, self.dist = cfg, dist
        self.eot_id = meta["eot_id"] if cfg.doc_mask else None
        self.loader = TokenLoader(os.path.join(cfg.data_dir, "train.bin"), cfg.batch_size, cfg.block_size,
                                  cfg.gradient_accumulation_steps, dist["world"], dist["rank"], cfg.seed,
                                  dist["device"])
        self.train_size = len(self.loader.data)  # tokens
        self.items_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * dist["world"]

    def loss(self, model, batch):
        x, y = batch
        return model(x, y, doc_ids=document_ids(x, self.eot_id) if self.eot_id is not None else None)[1]

    def evaluate(self, model, autocast):
        return estimate_loss(model, self.cfg, self.dist, autocast, self.eot_id)


# ----------------------------------------------------------------------------- one optimizer step

def train_step(model, optimizer, scaler, loader, cfg, autocast, loss_fn, grad_filter=None):
    """Accumulate gradients over the micro-batches, clip, and step. Returns (loss, grad norm)
    as tensors (no host sync). loss_fn(model, batch) -> loss; grad_filter() may drop gradients."""
    accum = cfg.gradient_accumulation_steps
    for micro in range(accum):
        batch = loader.next()
        # DDP all-reduces gradients in backward; only the last micro-step should. no_sync() must
        # wrap the forward as well, since DDP prepares the reduction during the forward pass.
        last = micro == accum - 1
        sync = model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()
        with sync:
            with autocast:
                loss = loss_fn(model, batch)
            scaler.scale(loss / accum).backward()
    if grad_filter is not None:
        grad_filter()
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


@torch.no_grad()
def estimate_loss(model, cfg, dist, autocast, eot_id=None, splits=("train", "val")):
    """Mean loss over cfg.eval_iters batches per split. The batches are the same at every
    evaluation (a fixed seed), so curves compare like with like and training RNG is untouched."""
    model.eval()
    out = {}
    for split in splits:
        loader = TokenLoader(os.path.join(cfg.data_dir, f"{split}.bin"), cfg.batch_size, cfg.block_size,
                             cfg.eval_iters, dist["world"], dist["rank"], seed=cfg.seed + 1, device=dist["device"])
        raw = unwrap(model)
        # one head: the model's own forward, compiled when compile=True (DDP's wrapper skipped: its
        # forward prepares gradient reduction); several heads: head_losses, which runs uncompiled
        module = model.module if isinstance(model, DDP) else model
        total = torch.zeros(raw.config.mtp_heads, device=dist["device"])  # one loss per head
        for _ in range(cfg.eval_iters):
            x, y = loader.next()
            doc_ids = document_ids(x, eot_id) if eot_id is not None else None
            with autocast:
                if raw.config.mtp_heads == 1:
                    losses = [module(x, y, doc_ids=doc_ids)[1]]
                else:
                    losses = raw.head_losses(x, y, doc_ids)
            total += torch.stack(losses).float()
        if dist["world"] > 1:
            torch_dist.all_reduce(total)
        means = (total / (cfg.eval_iters * dist["world"])).tolist()
        out[split] = means[0]  # the next-token loss: comparable whatever mtp_heads is
        if split == "val" and len(means) > 1:
            out.update({f"val_head{i + 1}": m for i, m in enumerate(means)})
    model.train()
    return out


# ----------------------------------------------------------------------------- device, dtype, processes

def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: device={name} but no CUDA GPU is visible; use device=cpu or auto")
    return torch.device(name)


def pick_dtype(name, device):
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_context(device, dtype):
    """Mixed precision: matmuls in bf16/fp16, weights and optimizer state stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup_distributed(cfg):
    """One process, or one of many under torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE)."""
    if "RANK" not in os.environ:
        return {"rank": 0, "world": 1, "device": pick_device(cfg.device)}
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return {"rank": rank, "world": world, "device": device}


def keep_freed_memory():
    """Training on a CPU frees and re-allocates the same activation buffers every step. glibc
    returns blocks over 128 KiB to the OS as soon as they are freed (mmap/munmap), so every step
    faults them in again page by page: ~1,100 page faults per quick-start step, 5-10 % of its time
    (docs/LOG.md). Higher mmap and trim thresholds keep freed memory in the process for reuse."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into the process
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # only blocks over 32 MiB (rare at CPU sizes) still go straight to the OS
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def peak_flops(device):
    """Dense bf16 tensor-core peak of the GPU, for MFU; None where unknown (CPU, MPS)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 70e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
    return next((v for k, v in table.items() if k in name), None)


# ----------------------------------------------------------------------------- data

def ensure_data(cfg, master):
    """meta.json of cfg.data_dir, preparing the dataset first when the folder is empty."""
    if not os.path.isfile(os.path.join(cfg.data_dir, "meta.json")):
        if cfg.dataset != "shakespeare":
            raise SystemExit(f"error: {cfg.data_dir} is not prepared; run a prepare/ script for it first")
        if master:
            print(f"{cfg.data_dir} is empty: preparing Shakespeare with the {cfg.tokenizer} tokenizer")
            from prepare.shakespeare import prepare
            try:
                prepare(cfg)
            except DataError as e:
                raise SystemExit(f"error: {e}") from None
        if torch_dist.is_initialized():
            torch_dist.barrier()
    meta = load_meta(cfg.data_dir)
    if meta["tokenizer"]["kind"] != cfg.tokenizer and master:
        warnings.warn(f"{cfg.data_dir} was prepared with the {meta['tokenizer']['kind']} tokenizer; "
                      f"tokenizer={cfg.tokenizer} is ignored (it only matters when preparing)")
    return meta


class RandomBatches:
    """Resumable random batches from a population of `size` items (windows, examples).

    Each optimizer step draws one global set of indices (accum x world x batch) from a generator
    seeded identically on every process; process r takes micro-batch k's slice r. So a step sees
    the same data whether it runs on 1 process with accumulation 2 or on 2 processes, and the
    position in the stream is just the generator state: resumable exactly. Subclasses turn a
    list of indices into tensors with make_batch().
    """

    def __init__(self, size, batch_size, accum, world, rank, seed, device):
        self.size, self.B, self.accum, self.world, self.rank = size, batch_size, accum, world, rank
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self.pos = accum  # micro-batches served from the current draw; accum = draw again
        self.draw_state = self.gen.get_state()

    def _draw(self):
        self.draw_state = self.gen.get_state()
        self.picks = torch.randint(self.size, (self.accum, self.world, self.B), generator=self.gen)
        self.pos = 0

    def next(self):
        if self.pos == self.accum:
            self._draw()
        picks = self.picks[self.pos, self.rank].tolist()
        self.pos += 1
        return self.make_batch(picks)

    def to_device(self, *tensors):
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)
        return tuple(t.to(self.device) for t in tensors)

    def state_dict(self):
        if self.pos == self.accum:
            return {"gen": self.gen.get_state(), "pos": self.pos}
        return {"gen": self.draw_state, "pos": self.pos}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.pos = self.accum
        if state["pos"] < self.accum:
            self._draw()
            self.pos = state["pos"]


class TokenLoader(RandomBatches):
    """Random windows of block_size + 1 tokens from one memory-mapped token file."""

    def __init__(self, path, batch_size, block_size, accum, world, rank, seed, device):
        self.data = read_tokens(path)
        if len(self.data) < block_size + 2:
            raise SystemExit(f"error: {path} has {len(self.data)} tokens, fewer than block_size+2={block_size + 2}")
        self.T = block_size
        super().__init__(len(self.data) - block_size - 1, batch_size, accum, world, rank, seed, device)

    def make_batch(self, starts):
        """(x, y): inputs and next-token targets, each (B, T) int64 on the device."""
        buf = torch.from_numpy(np.stack([self.data[s:s + self.T + 1] for s in starts]).astype(np.int64))
        buf, = self.to_device(buf)
        return buf[:, :-1], buf[:, 1:]


# ----------------------------------------------------------------------------- model and optimizer

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def build_model(cfg, meta, ckpt=None):
    """A fresh GPT (init_from=scratch), the checkpoint's (resume), or GPT-2 weights (hf:PATH / a name)."""
    if ckpt is not None:
        model = model_from_checkpoint(ckpt)
    elif is_gpt2_source(cfg.init_from):
        model = gpt2_weights(cfg)
        if meta["vocab_size"] != model.config.vocab_size:
            raise SystemExit(f"error: init_from={cfg.init_from} has a {model.config.vocab_size}-token vocabulary "
                             f"but {cfg.data_dir} was prepared with {meta['vocab_size']}; "
                             f"prepare it with tokenizer=gpt2")
    elif cfg.init_from == "scratch":
        try:
            model = GPT(GPTConfig.from_config(cfg, meta["vocab_size"]))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    else:
        raise SystemExit(f"error: init_from={cfg.init_from!r}: use scratch, resume, hf:PATH or {', '.join(GPT2_NAMES)}")
    if cfg.block_size > model.config.block_size:
        raise SystemExit(f"error: block_size={cfg.block_size} exceeds the model's {model.config.block_size}")
    return model


def is_gpt2_source(init_from):
    return init_from.startswith("hf:") or init_from in GPT2_NAMES


def gpt2_weights(cfg):
    """The GPT-2 model named by init_from (hf:PATH or a GPT-2 name), with this run's dropout,
    attention backend and vocabulary padding; a bad source ends the program with one line."""
    try:
        return from_hf(cfg.init_from.removeprefix("hf:"), dropout=cfg.dropout, attn_backend=cfg.attn_backend,
                       pad_vocab_to=cfg.pad_vocab_to)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: init_from={cfg.init_from}: {e}") from None


def model_from_checkpoint(ckpt, merge=True):
    """The checkpoint's model: a GPT, or a fine-tuned GPTClassifier; LoRA adapters are merged
    into the weights unless merge=False (resuming a LoRA run)."""
    config = GPTConfig(**ckpt["model_args"])
    ft = ckpt.get("finetune", {})
    if ft.get("task") == "classify":
        model = GPTClassifier(config, len(ft["labels"]), ft["classify_pool"])
    else:
        model = GPT(config)
    if ft.get("lora"):
        add_lora(model, **ft["lora"])
    model.load_state_dict(strip_wrapper_prefixes(ckpt["model"]))
    return merge_lora(model) if merge else model


def unwrap(model):
    """The plain module inside DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def strip_wrapper_prefixes(state_dict):
    """Drop the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes from parameter names."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def configure_optimizer(model, cfg, device, lr_scale=None):
    """AdamW, or Muon for the blocks' 2-D weights plus AdamW for the rest (optimizer='muon').

    AdamW decays 2-D weights (matmuls, embeddings), not biases and norms. Frozen parameters
    (requires_grad False) are left out. lr_scale(name) -> factor groups parameters by learning-
    rate multiplier (layer-wise decay); Muon groups also carry muon_lr / learning_rate, so one
    schedule drives both: the loop sets every group's lr to lr_at(it) * group['lr_scale']."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = {}
    for name, p in params.items():
        muon = cfg.optimizer == "muon" and p.dim() == 2 and ".h." in f".{name}"
        decay = p.dim() >= 2
        scale = (lr_scale(name) if lr_scale else 1.0) * (cfg.muon_lr / cfg.learning_rate if muon else 1.0)
        group = groups.setdefault((muon, decay, scale), {"params": [], "lr_scale": scale,
                                                         "weight_decay": cfg.weight_decay if decay else 0.0})
        group["params"].append(p)
    adamw_groups = [g for (muon, *_), g in sorted(groups.items()) if not muon]
    muon_groups = [g for (muon, *_), g in sorted(groups.items()) if muon]
    in_groups = [id(p) for g in adamw_groups + muon_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(map(id, params.values())), "every parameter in exactly one group"
    adamw = torch.optim.AdamW(adamw_groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                              fused=device.type == "cuda")
    if not muon_groups:
        return adamw
    return CombinedOptimizer(adamw, Muon(muon_groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                                         ns_steps=cfg.ns_steps))


def lr_at(it, cfg, max_iters):
    """Learning rate for step `it`: linear warmup, then cosine or warmup-stable-decay to min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if cfg.lr_schedule == "wsd":
        decay_start = max_iters - int(cfg.decay_frac * max_iters)
        if it < decay_start:
            return cfg.learning_rate
        frac = (it - decay_start) / max(1, max_iters - decay_start)
        return cfg.learning_rate + frac * (cfg.min_lr - cfg.learning_rate)
    frac = min(1.0, (it - cfg.warmup_iters) / max(1, max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------- checkpoints

def rng_state():
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(raw_model, optimizer, scaler, loader, it, best, since_best, cfg, dist, **extra):
    """Everything needed to continue exactly. RNG states are gathered from every process."""
    rngs = [rng_state()]
    if dist["world"] > 1:  # gathered as torch.save bytes: object collectives mishandle CPU tensors
        buf = io.BytesIO()
        torch.save(rngs[0], buf)
        blobs = [None] * dist["world"]
        torch_dist.all_gather_object(blobs, buf.getvalue())
        rngs = [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]
    return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "iter_num": it, "best": best, "since_best": since_best, "config": cfg.to_dict(),
            "model_args": vars(raw_model.config).copy(), "rng": rngs, "loader": loader.state_dict(), **extra}


def save_run(state, out_dir, best, master):
    """ckpt_last.pt always, ckpt_best.pt too when val loss improved. Every process builds the
    state (it gathers their RNG states); only the master writes."""
    if master:
        save_checkpoint(state, os.path.join(out_dir, "ckpt_last.pt"))
        if best:
            save_checkpoint(state, os.path.join(out_dir, "ckpt_best.pt"))


def save_checkpoint(state, path):
    """Write atomically: a temporary file, fsync, then rename over the old one. A crash at any
    moment leaves either the old checkpoint or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no checkpoint there (train first, or check out_dir)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as e:
        raise SystemExit(f"error: {path}: unreadable checkpoint ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- logging

class MetricsLogger:
    """metrics.jsonl (one JSON object per log/eval), loss.png, optional wandb, overfit warning."""

    def __init__(self, cfg, master, start_iter):
        self.cfg, self.master = cfg, master
        self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.evals = []  # (iter, train_loss, val_loss) for the plot and the overfitting check
        self.wandb = None
        self.t0 = time.time()  # records carry elapsed_s: seconds since this process started training
        if not master:
            return
        if start_iter == 0 and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh log; a resumed one appends
        elif os.path.exists(self.path):
            self.evals = [(r["iter"], r["train_loss"], r["val_loss"]) for r in read_metrics(self.path)
                          if r["kind"] == "eval" and r["iter"] <= start_iter]
        if cfg.wandb_log:
            self.wandb = start_wandb(cfg)

    def _write(self, record):
        if not self.master:
            return
        record["elapsed_s"] = round(time.time() - self.t0, 2)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            numbers = {k: v for k, v in record.items() if k not in ("kind", "iter", "elapsed_s")}
            self.wandb.log(numbers, step=record["iter"])

    def train(self, it, loss, lr, grad_norm, tokens_per_s, mfu):
        self._write({"kind": "train", "iter": it, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tokens_per_s, "mfu": mfu})
        if self.master:
            mfu_text = f", mfu {mfu * 100:.1f}%" if mfu is not None else ""
            progress_write(f"iter {it}: loss {loss:.4f}, lr {lr:.2e}, grad norm {grad_norm:.2f}, "
                           f"{tokens_per_s:,.0f} tok/s{mfu_text}")

    def eval(self, it, results, best):
        """results: 'train' and 'val' losses plus any task metrics (val_accuracy, ...)."""
        extra = {k: v for k, v in results.items() if k not in ("train", "val")}
        self._write({"kind": "eval", "iter": it, "train_loss": results["train"], "val_loss": results["val"], **extra})
        if not self.master:
            return
        self.evals.append((it, results["train"], results["val"]))
        shown = "".join(f", {k} {v:.4f}" for k, v in extra.items())
        mark = " (best)" if best else ""
        progress_write(f"eval {it}: train {results['train']:.4f}, val {results['val']:.4f}{shown}{mark}")
        n = self.cfg.overfit_patience
        recent = self.evals[-(n + 1):]
        if n > 0 and len(recent) == n + 1 and all(b[2] > a[2] and b[1] < a[1] for a, b in zip(recent, recent[1:])):
            progress_write(f"warning: val loss rose {n} evaluations in a row while train loss fell: overfitting. "
                           f"ckpt_best.pt holds the best weights; consider more dropout or stopping.")
        if self.cfg.plot:
            plot_losses(self.path, os.path.join(self.cfg.out_dir, "loss.png"))

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(cfg):
    """wandb is optional: offline unless WANDB_MODE says otherwise; any failure only warns."""
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        import wandb
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=cfg.to_dict(), dir=cfg.out_dir)
    except Exception as e:
        warnings.warn(f"wandb disabled: {type(e).__name__}: {e}")
        return None


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path, png_path):
    """Train and val loss against iteration, written atomically to png_path. The best val loss
    (ckpt_best.pt) is marked; if val loss ended above its best, the stretch after the best
    evaluation is shaded as overfitting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    train = [(r["iter"], r["loss"]) for r in rows if r["kind"] == "train"]
    evals = [(r["iter"], r["train_loss"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), color="tab:blue", alpha=0.35, lw=1, label="train (batch)")
    if evals:
        its, tr, va = zip(*evals)
        ax.plot(its, tr, "o-", color="tab:blue", label="train (eval)")
        ax.plot(its, va, "o-", color="tab:orange", label="val")
        best = min(range(len(va)), key=va.__getitem__)
        ax.plot(its[best], va[best], "*", color="tab:red", ms=14, label=f"best val {va[best]:.4f} (ckpt_best.pt)")
        if best < len(va) - 1:
            ax.axvspan(its[best], its[-1], color="tab:red", alpha=0.08, label="val above its best: overfitting")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


_pbar = None


def progress_bar(total, initial, master):
    global _pbar
    from tqdm import tqdm
    _pbar = tqdm(total=total, initial=initial, disable=not master, unit="it", dynamic_ncols=True)
    return _pbar


def progress_write(text):
    """Print a line without breaking the progress bar."""
    if _pbar is not None and not _pbar.disable:
        _pbar.write(text)
    else:
        print(text)


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to finish its step, save, and exit 0 (preemptible clusters).
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self, world, device):
        """All processes stop at the same step: one asking is enough (costs a tiny all-reduce)."""
        if world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return bool(flag.item())


def threading_is_main():
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    summary = train(cli_config())
    sys.exit(0)
