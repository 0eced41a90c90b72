"""
The plumbing every script needs, kept here so that each script shows only its own job.

  1. compute        setup_compute(): device, dtype and autocast (TF32 on GPUs), one function
                    for every script; setup_processes(): one process or one of many under torchrun
  2. data           the built-in dataset prepared on demand; RandomBatches / TokenLoader, the
                    resumable batch stream that makes exact resume and DDP = accumulation hold
  3. models         load_model(): the one way a script gets a model from init_from
  4. checkpoints    atomic writes, weights-only reads, RNG states of every process
  5. logging        metrics.jsonl, loss.png, optional wandb, a progress bar
  6. stopping       SIGINT / SIGTERM finish the step, save and exit cleanly
"""

import contextlib
import ctypes
import inspect
import io
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as torch_dist

import exits
from adapters import GPTClassifier, add_lora, merge_lora
from config import ConfigError, save_json
from hf import GPT2_SIZES, from_hf, hf_tokenizer_meta
from model import GPT, Block, GPTConfig
from prepare.common import DataError, SplitTokens, load_meta
from rnn import LSTMLM
from tokenizer import from_meta, model_vocab_size

# torch.distributed.checkpoint warns whenever it reads or writes in one process, which is on
# purpose here; FSDP2 warns that the model returns a view (the logits, cut to the true
# vocabulary), which matters only to in-place edits of it, and nothing here makes one.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

# ----------------------------------------------------------------------------- 1. compute


@dataclass(frozen=True)
class Compute:
    device: torch.device
    dtype: torch.dtype
    autocast: object  # a context manager: mixed precision, or nothing in float32


def setup_compute(cfg, device=None):
    """Device (cfg.device unless given), dtype and autocast for cfg; TF32 matmuls on GPUs."""
    device = device or pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if device.type == "cuda":  # TF32 on Ampere+ float32 matmuls: ~free speed, tiny precision cost
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        keep_freed_memory()
    return Compute(device, dtype, autocast_context(device, dtype))


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


def keep_freed_memory():
    """Training on a CPU frees and re-allocates the same activation buffers every step. glibc
    returns blocks over 128 KiB to the OS as soon as they are freed (mmap/munmap), so every step
    would fault them in again page by page. Higher mmap and trim thresholds keep freed memory in
    the process for reuse (the measured effect is in docs/LOG.md)."""
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


@dataclass(frozen=True)
class Processes:
    """Where this process stands: its rank among `world` processes, and its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0


def setup_processes(cfg):
    """One process, or one of many under torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE)."""
    if "RANK" not in os.environ:
        return Processes(0, 1, pick_device(cfg.device))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world, device)


def wrap_ddp(model, device):
    """DistributedDataParallel over the torchrun processes, without its buffer sync: DDP would
    otherwise copy every buffer from rank 0 before each forward, and the model's only buffers
    are the RoPE tables, identical everywhere by construction. (torch 2.13 renamed the switch
    broadcast_buffers to forward_sync_buffers.)"""
    from torch.nn.parallel import DistributedDataParallel as DDP
    renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def shard_model(model, cfg, compute):
    """FSDP2 (fully_shard): every block is one unit, gathered just before it runs and freed after
    (fsdp_reshard_after_forward); the root unit holds the rest (embeddings, final norm, head).
    Each process keeps 1/world of every weight, gradient and optimizer state. On GPUs in bf16
    the gathered weights are bf16 and gradients are reduced in float32. With compile, each
    block is compiled in place before sharding (torchtitan's order). Returns the fraction of
    the parameters this process holds."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    precision = MixedPrecisionPolicy()
    if compute.dtype == torch.bfloat16:
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        if cfg.compile:
            block.compile()
        fully_shard(block, mp_policy=precision, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    fully_shard(model, mp_policy=precision)
    if isinstance(model, GPT):  # evaluation calls head_losses on the root: it must gather weights too
        register_fsdp_forward_method(model, "head_losses")
    local = sum(p.to_local().numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


def check_fsdp(cfg, dtype):
    """What parallel=fsdp cannot do yet, said before any work (also in one process, whose
    checkpoints are sharded all the same)."""
    if cfg.optimizer == "muon":
        raise SystemExit("error: optimizer=muon does not run under parallel=fsdp yet (it needs each matrix "
                         "whole); use optimizer=adamw, or parallel=ddp")
    if dtype == torch.float16:
        raise SystemExit("error: parallel=fsdp trains in bfloat16 or float32; set dtype=bfloat16 (or float32)")
    if cfg.arch == "lstm":
        raise SystemExit("error: parallel=fsdp shards transformer blocks; arch=lstm trains with parallel=ddp")


def gradient_sync(model, enabled):
    """A context for one micro-batch's forward and backward: reduce gradients across processes
    only when enabled (the last micro-batch of a step). DDP prepares the reduction during the
    forward, so its no_sync() must wrap both; FSDP is told with a flag."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "no_sync") and not enabled:     # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def micro_batches_per_process(cfg, world):
    """gradient_accumulation_steps counts the micro-batches of one optimizer step over all
    processes, so the global batch is the same on 1 GPU or 8; each process runs its share."""
    accum = cfg.gradient_accumulation_steps
    if accum % world:
        raise SystemExit(f"error: gradient_accumulation_steps={accum} is the global number of micro-batches per "
                         f"step and must divide by the {world} processes; use a multiple of {world}")
    return accum // world


# ----------------------------------------------------------------------------- 2. data

def ensure_data(cfg, master):
    """meta.json of cfg.data_dir, preparing the dataset first when the folder is empty."""
    if not os.path.isfile(os.path.join(cfg.data_dir, "meta.json")):
        if cfg.dataset != "shakespeare":
            raise SystemExit(f"error: {cfg.data_dir} is not prepared; run a prepare/ script for it first")
        if os.path.isdir(cfg.data_dir) and set(os.listdir(cfg.data_dir)) - {".prepare-partial"}:
            # never prepare into a folder that holds something: it may be the user's own data
            raise SystemExit(f"error: {cfg.data_dir} holds files but no meta.json, so it is not a prepared dataset "
                             f"(left as it is); prepare it again with its prepare script, or choose another data_dir")
        if master:
            print(f"{cfg.data_dir} is empty: preparing Shakespeare with the {cfg.tokenizer} tokenizer")
            from prepare.shakespeare import prepare
            try:
                prepare(cfg)
            except DataError as e:
                raise SystemExit(f"error: {e}") from None
        if torch_dist.is_initialized():
            torch_dist.barrier()
    meta = read_meta(cfg.data_dir)
    if meta["tokenizer"]["kind"] != cfg.tokenizer and master:
        warnings.warn(f"{cfg.data_dir} was prepared with the {meta['tokenizer']['kind']} tokenizer; "
                      f"tokenizer={cfg.tokenizer} is ignored (it only matters when preparing)")
    return meta


def read_meta(data_dir):
    try:
        return load_meta(data_dir)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


class RandomBatches:
    """Resumable random batches from a population of `size` items (windows, examples).

    Each optimizer step draws one global set of indices (accum x world x batch) from a generator
    seeded identically on every process; process r takes micro-batch k's slice r. So a step sees
    the same data whether it runs on 1 process with accumulation 2 or on 2 processes, and the
    position in the stream is just the generator state: resumable exactly. Subclasses turn a
    list of indices into tensors with make_batch() and count their tokens with count_tokens().
    `tokens` counts the tokens of every step drawn so far, over all processes.
    """

    def __init__(self, size, batch_size, accum, world, rank, seed, device):
        self.size, self.B, self.accum, self.world, self.rank = size, batch_size, accum, world, rank
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self.pos = accum  # micro-batches served from the current draw; accum = draw again
        self.draw_state = self.gen.get_state()
        self.tokens = self.draw_tokens = 0

    def _draw(self):
        self.draw_state = self.gen.get_state()
        self.picks = torch.randint(self.size, (self.accum, self.world, self.B), generator=self.gen)
        self.pos = 0
        self.draw_tokens = self.count_tokens(self.picks.flatten().tolist())
        self.tokens += self.draw_tokens

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
        """pos: micro-batches served from the draw that gen (its state before the draw) makes;
        0 at a step boundary, so the state means the same whatever accum the reader has (a
        resume may run on another number of processes)."""
        if self.pos == self.accum:
            return {"gen": self.gen.get_state(), "pos": 0, "tokens": self.tokens}
        return {"gen": self.draw_state, "pos": self.pos, "tokens": self.tokens - self.draw_tokens}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.tokens = state.get("tokens", 0)
        self.pos = self.accum
        if 0 < state["pos"] < self.accum:  # (checkpoints before this format said accum at a boundary)
            self._draw()
            self.pos = state["pos"]


class TokenLoader(RandomBatches):
    """Random windows of block_size + 1 tokens from a split's shards, memory-mapped and read as one
    sequence: the same batches whether the split is one file or many. With align_eot, windows
    start only where token align_eot (end-of-text, which opens every document) stands. check_ids:
    scan the split for ids outside the vocabulary first (once per run; see SplitTokens.check_ids)."""

    def __init__(self, data_dir, split, batch_size, block_size, accum, world, rank, seed, device, align_eot=None,
                 check_ids=False):
        try:
            self.data = SplitTokens(data_dir, split)
            if check_ids:
                self.data.check_ids()
        except DataError as e:
            raise SystemExit(f"error: {e}") from None
        if len(self.data) < block_size + 2:
            raise SystemExit(f"error: the {split} split of {data_dir} has {len(self.data)} tokens, fewer than "
                             f"block_size+2={block_size + 2}")
        self.T = block_size
        last = len(self.data) - block_size - 1  # windows start before this
        self.starts = None
        if align_eot is not None:
            self.starts = self.data.positions_of(align_eot)
            self.starts = self.starts[self.starts < last]
            if not len(self.starts):
                raise SystemExit(f"error: align_to_documents: no document of {data_dir}'s {split} split starts "
                                 f"a full window; set align_to_documents=False")
        super().__init__(last if self.starts is None else len(self.starts), batch_size, accum, world, rank, seed,
                         device)

    def make_batch(self, picks):
        """(x, y): inputs and next-token targets, each (B, T) int64 on the device."""
        starts = picks if self.starts is None else self.starts[picks].tolist()
        buf = torch.from_numpy(np.stack([self.data[s:s + self.T + 1] for s in starts]).astype(np.int64))
        buf, = self.to_device(buf)
        return buf[:, :-1], buf[:, 1:]

    def count_tokens(self, picks):
        return len(picks) * self.T


# ----------------------------------------------------------------------------- 3. models

@dataclass
class Loaded:
    model: torch.nn.Module   # on the CPU
    tokenizer: dict          # the tokenizer's meta (tokenizer.from_meta rebuilds it)
    checkpoint: dict = None  # the checkpoint it came from: resuming needs its optimizer state
    source: str = ""         # what was loaded: a checkpoint path, hf:PATH, a GPT-2 name, or scratch
    data_dir: str = None     # the data folder a checkpoint was trained on
    labels: list = None      # a fine-tuned classifier's label set


def load_model(cfg, init_from=None, meta=None, merge=True):
    """The one way every script gets a model. init_from (default cfg.init_from) is one of
        scratch      fresh weights shaped by cfg, for the vocabulary of data_dir (meta)
        resume       out_dir/ckpt_last.pt, LoRA adapters kept, with the state to continue
        hf:PATH      a Hugging Face GPT-2 or BERT folder; gpt2, gpt2-medium, ... download one
        a folder     a run folder: its ckpt_best.pt, else ckpt_last.pt; or a checkpoint file
    LoRA adapters are merged into the weights unless merge=False. A bad source ends the
    program with one line."""
    source = init_from or cfg.init_from
    if is_gpt2_source(source):
        try:
            model = from_hf(source.removeprefix("hf:"), dropout=cfg.dropout, attn_backend=cfg.attn_backend,
                            pad_vocab_to=cfg.pad_vocab_to)
            tok_meta = hf_tokenizer_meta(source.removeprefix("hf:"))
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: init_from={source}: {e}") from None
        return Loaded(model, tok_meta, source=source)
    if source == "scratch":
        meta = meta or ensure_data(cfg, master=True)
        try:
            model = build_model(GPTConfig.from_config(cfg, model_vocab_size(meta["tokenizer"], cfg.arch)))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        return Loaded(model, meta["tokenizer"], source="scratch", data_dir=cfg.data_dir)
    if source == "resume":
        path = checkpoint_path(cfg.out_dir, "last")
    elif os.path.isdir(source):
        path = checkpoint_path(source)
    elif os.path.isfile(source) or init_from:  # a file a script chose says itself that it is missing
        path = source
    else:
        raise SystemExit(f"error: init_from={source}: no such run folder or checkpoint file; give one, hf:PATH, "
                         f"a GPT-2 name, or scratch (fresh weights, the no-transfer baseline)")
    ckpt = load_checkpoint(path)
    try:  # checkpoints carry their tokenizer; older ones point at their data folder
        tok_meta = ckpt.get("tokenizer") or load_meta(ckpt["config"]["data_dir"])["tokenizer"]
    except DataError as e:
        raise SystemExit(f"error: the tokenizer of {path}: {e}") from None
    finetune = ckpt.get("finetune") or {}
    return Loaded(model_from_checkpoint(ckpt, merge=merge and source != "resume"), tok_meta, ckpt, path,
                  ckpt["config"]["data_dir"], finetune.get("labels"))


def continue_run(cfg, loaded):
    """Resume: cfg takes the run's saved settings, or stops naming those the command contradicts."""
    try:
        cfg.continue_run(loaded.checkpoint["config"], os.path.dirname(loaded.source) or loaded.source)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def checkpoint_path(source, which="best"):
    """A checkpoint itself, or a run folder's ckpt_{which} (ckpt_last when the run has none, e.g.
    no evaluation has improved yet). A checkpoint is a file ckpt_*.pt, or under FSDP a folder
    ckpt_*.dcp of shards (ckpt_*.dcp.old only exists when a crash hit the swap of two folders).
    When a folder holds both kinds (a run that moved between DDP and FSDP), the newer wins."""
    if is_checkpoint(source):
        return source
    for name in (which, "last"):
        found = [path for suffix in (".pt", ".dcp", ".dcp.old")
                 if is_checkpoint(path := os.path.join(source, f"ckpt_{name}{suffix}"))]
        if found:
            return max(found, key=lambda path: os.path.getmtime(checkpoint_file(path)))
    return os.path.join(source, f"ckpt_{which}.pt")  # missing: load_checkpoint says so


def checkpoint_file(path):
    """The file that makes path a checkpoint: itself, or a sharded folder's state.pt."""
    return path if os.path.isfile(path) else os.path.join(path, "state.pt")


def run_checkpoint(out_dir):
    """out_dir's ckpt_last (a file or a sharded folder), or None when out_dir holds no run."""
    path = checkpoint_path(out_dir, "last")
    return path if os.path.isdir(out_dir) and is_checkpoint(path) else None


def refuse_existing_run(out_dir, overwrite):
    """A run is the user's work: starting afresh in its folder stops unless asked to replace it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"error: out_dir={out_dir} is a file, not a folder; choose another out_dir")
    path = run_checkpoint(out_dir)
    if path and not overwrite:
        raise SystemExit(f"error: {out_dir} already holds a run ({os.path.basename(path)}); continue it with "
                         f"init_from=resume, choose another out_dir, or set overwrite=True to replace it")


def is_checkpoint(path):
    return os.path.isfile(checkpoint_file(path))


def load_for_inference(cfg, device):
    """(model in eval mode on device, tokenizer, Loaded) for evaluate.py and sample.py: GPT-2
    weights when init_from names them, else out_dir's ckpt_{checkpoint}.pt."""
    if is_gpt2_source(cfg.init_from):
        loaded = load_model(cfg)
    else:
        loaded = load_model(cfg, checkpoint_path(cfg.out_dir, cfg.checkpoint))
    try:
        tok = from_meta(loaded.tokenizer, cfg.gpt2_bpe_path, cfg.cache_dir)
    except (DataError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: cannot load the tokenizer: {e}") from None
    return loaded.model.to(device).eval(), tok, loaded


def is_gpt2_source(init_from):
    return init_from.startswith("hf:") or init_from in GPT2_SIZES


def build_model(config):
    """A fresh model of config's architecture: the transformer (decoder or encoder) or the LSTM."""
    return LSTMLM(config) if config.arch == "lstm" else GPT(config)


def model_from_checkpoint(ckpt, merge=True):
    """The checkpoint's model: a GPT, an LSTMLM, or a fine-tuned GPTClassifier; LoRA adapters
    are merged into the weights unless merge=False (resuming a LoRA run)."""
    config = GPTConfig(**ckpt["model_args"])
    finetune = ckpt.get("finetune") or {}
    if finetune.get("task") == "classify":
        model = GPTClassifier(config, len(finetune["labels"]), finetune["classify_pool"])
    else:
        model = build_model(config)
    if finetune.get("lora"):
        add_lora(model, **finetune["lora"])
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


# ----------------------------------------------------------------------------- 4. checkpoints

def record_config(cfg, model_config, master):
    """Make cfg tell the truth about the model (a loaded model's shape wins over cfg's defaults),
    then print it and save it as out_dir/config.json."""
    for f in fields(model_config):
        if f.name not in ("vocab_size", "block_size"):  # block_size: the training context may be shorter
            cfg.set(f.name, getattr(model_config, f.name))
    if master:
        print(f"config:\n{cfg}")
        os.makedirs(cfg.out_dir, exist_ok=True)
        save_json(cfg, os.path.join(cfg.out_dir, "config.json"))


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


def gather_rng_states(world):
    """Every process's RNG state, gathered as torch.save bytes (object collectives mishandle
    CPU tensors); one process: just its own."""
    states = [rng_state()]
    if world > 1:
        buf = io.BytesIO()
        torch.save(states[0], buf)
        blobs = [None] * world
        torch_dist.all_gather_object(blobs, buf.getvalue())
        states = [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]
    return states


def save_checkpoint(state, path):
    """Write atomically: a temporary file, fsync, then rename over the old one. A crash at any
    moment leaves either the old checkpoint or the new one, never half of one; a write that fails
    (a full disk) removes its partial file and stops with one line."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # (torch.save reports a failed write as a RuntimeError)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise SystemExit(write_error(path, e)) from None
    fsync_folder(os.path.dirname(os.path.abspath(path)))  # make the rename itself durable


def write_error(path, e):
    # (torch.save's own message for a short write is about zip offsets; say what it means)
    reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write stopped short (is the disk full?)"
    return (f"error: could not write {path}: {reason}; the previous checkpoint is kept. Free disk space or fix "
            f"the folder's permissions, then continue with init_from=resume")


def remove_interrupted_saves(out_dir):
    """A save cut short (a kill, a full disk) leaves ckpt_*.tmp, which nothing reads, and a crash in
    a sharded save's swap may leave ckpt_*.dcp.old beside the new folder: remove them."""
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.startswith("ckpt_") and (name.endswith(".tmp") or (name.endswith(".old") and is_checkpoint(path[:-4]))):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path):
    """A checkpoint as a dict; a sharded one with its weights gathered (see load_sharded_checkpoint)."""
    if not is_checkpoint(path):
        raise SystemExit(f"error: {path}: no checkpoint there (train first, or check out_dir)")
    try:
        if os.path.isdir(path):
            return load_sharded_checkpoint(path)
        return torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as e:
        # (torch's own message would suggest weights_only=False: running code from the file)
        raise SystemExit(f"error: {path}: not a checkpoint of this project, or a damaged one "
                         f"({type(e).__name__}); train again, or point at another checkpoint") from None


def save_sharded_checkpoint(ckpt, path, model, optimizer, master):
    """FSDP: every process writes its shard of the weights and optimizer state into the folder
    `path` with torch.distributed.checkpoint, and rank 0 the rest of ckpt as state.pt. The folder
    is written as path.tmp and swapped in whole (the old one renamed to path.old, then removed),
    so a crash leaves a complete checkpoint: the old one or the new one. Every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp, old = f"{path}.tmp", f"{path}.old"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
    barrier()
    weights, optimizer_state = get_state_dict(model, optimizer)  # this process's shards, by parameter name
    try:
        dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=tmp,
                 no_dist=not torch_dist.is_initialized())
    except Exception as e:  # every process gets the failure of any (a full disk)
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(write_error(path, e) if master else 1) from None
    if master:
        save_checkpoint(ckpt, os.path.join(tmp, "state.pt"))  # last: a folder without it is no checkpoint
        if os.path.isdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        fsync_folder(os.path.dirname(os.path.abspath(path)))
    barrier()


def load_sharded_checkpoint(path):
    """A sharded checkpoint folder as one dict: its state.pt, plus the model's full weights
    gathered from every process's shard (read here, in this process alone). The optimizer
    state stays on disk, in shards ("sharded": path); load_sharded_optimizer reads it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    ckpt = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    weights = {name.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
               for name, m in stored.items() if name.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load({"model": weights}, checkpoint_id=path, no_dist=True)
    return {**ckpt, "model": weights, "sharded": path}


def load_sharded_optimizer(path, model, optimizer):
    """Fill optimizer (of model, sharded over any number of processes, or not at all) from the
    sharded checkpoint at path: torch.distributed.checkpoint reshards by parameter name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer)  # the layout to fill: this process's shards
    dcp.load({"optimizer": state}, checkpoint_id=path, no_dist=not torch_dist.is_initialized())
    set_optimizer_state_dict(model, optimizer, state)


def export_checkpoint(source, path):
    """The checkpoint `source` (a sharded one gathered) written as one .pt file at `path`: the
    weights and what loading them needs, without the training state (for sharing, not resuming)."""
    if os.path.exists(path):
        raise SystemExit(f"error: export_ckpt={path} already exists; choose a new file name")
    ckpt = load_checkpoint(source)
    training_state = ("optimizer", "scaler", "rng", "loader", "sharded")
    save_checkpoint({k: v for k, v in ckpt.items() if k not in training_state}, path)
    return f"wrote {path}: the weights of {source} in one file"


def barrier():
    if torch_dist.is_initialized():
        torch_dist.barrier()


# ----------------------------------------------------------------------------- 5. logging

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
            self.evals = [(r["iter"], r["train_loss"], r["val_loss"]) for r in self.rows_until(start_iter)
                          if r["kind"] == "eval"]
        if cfg.wandb_log:
            self.wandb = start_wandb(cfg)

    def rows_until(self, start_iter):
        """Keep only the log's rows up to the checkpoint a resume starts from: a crashed run logged
        steps past its last save, which the resumed run logs again."""
        rows = read_metrics(self.path)
        kept = [r for r in rows if r["iter"] <= start_iter]
        with open(self.path) as f:
            torn = not f.read().endswith("\n")  # a crash during a write cut the last line short
        if len(kept) < len(rows) or torn:
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(self.path + ".tmp", self.path)
        return kept

    def _write(self, record):
        if not self.master:
            return
        record["elapsed_s"] = round(time.time() - self.t0, 2)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            numbers = {k: v for k, v in record.items() if k not in ("kind", "iter", "elapsed_s")}
            self.wandb.log(numbers, step=record["iter"])

    def train(self, it, loss, lr, grad_norm, tokens, tokens_per_s, mfu, extra=None):
        """tokens: every token trained on so far, over all processes (runs compare by it); extra:
        the task's own numbers (task=rl: the mean sampled reward)."""
        extra = extra or {}
        self._write({"kind": "train", "iter": it, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                     "tokens_per_s": tokens_per_s, "mfu": mfu, **extra})
        if self.master:
            mfu_text = f", mfu {mfu * 100:.1f}%" if mfu is not None else ""
            shown = "".join(f", {k} {v:.4f}" for k, v in extra.items())
            progress_write(f"iter {it}: loss {loss:.4f}{shown}, lr {lr:.2e}, grad norm {grad_norm:.2f}, "
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
    """metrics.jsonl's rows; a line cut short by a crash is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


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
    rewards = [(r["iter"], r["reward"]) for r in rows if r["kind"] == "train" and "reward" in r]
    if rewards:  # task=rl: the reward curve below the loss
        fig, (ax, ax_reward) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
        plot_rewards(ax_reward, rewards, [(r["iter"], r["val_reward"]) for r in rows if "val_reward" in r])
    else:
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
    ax.set_ylabel("policy loss; evals: minus the reward" if rewards else "cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


def plot_rewards(ax, sampled, greedy):
    """task=rl's panel of loss.png: the mean reward of the sampled completions at each log line,
    and of greedy completions of the val prompts at each evaluation."""
    ax.plot(*zip(*sampled), color="tab:green", alpha=0.5, lw=1, label="train (sampled completions)")
    if greedy:
        ax.plot(*zip(*greedy), "o-", color="tab:purple", label="val (greedy completions)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend()


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


# ----------------------------------------------------------------------------- 6. stopping

class GracefulStop:
    """SIGINT/SIGTERM ask the loop to finish its step, save, and exit 0 (preemptible clusters).
    A second Ctrl-C stops at once. Outside the loop, exits.py's handlers rule."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            exits.stop(signum, frame, "a second time, so at once, without saving the steps since the last checkpoint")
        self.requested = True

    def agreed(self, world, device, check_now):
        """Whether every process stops after this step. One process: whenever asked. Several:
        they must stop at the same step, so they agree with an all-reduce (one asking is
        enough); that reads a value back to the host, so it happens only where check_now (at
        log and evaluation steps), never every step."""
        if world == 1:
            return self.requested
        if not check_now:
            return False
        flag = torch.tensor([float(self.requested)], device=device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return bool(flag.item())
