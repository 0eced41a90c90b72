"""
Many processes as one: torchrun's processes (setup_processes), DDP or FSDP2 around the model,
gradients reduced only at the last micro-batch, and the RNG states every checkpoint gathers.
One process is the case with world = 1: every function here works without torchrun.
"""

import contextlib
import inspect
import io
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

from compute import pick_device
from errors import ConfigError
from model import Block
from multitoken import MultiTokenGPT


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
    are the RoPE tables, identical everywhere by construction. (The switch has two names, by
    torch version: docs/LOG.md.)"""
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
    if isinstance(model, MultiTokenGPT):  # evaluation calls head_losses on the root: it must gather weights too
        register_fsdp_forward_method(model, "head_losses")
    local = sum(p.to_local().numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


def check_fsdp(cfg, dtype, arch):
    """What parallel=fsdp cannot do yet, said before any work (also in one process, whose
    checkpoints are sharded all the same)."""
    if cfg.optimizer == "muon":
        raise ConfigError("optimizer=muon does not run under parallel=fsdp yet (it needs each matrix "
                         "whole); use optimizer=adamw, or parallel=ddp")
    if dtype == torch.float16:
        raise ConfigError("parallel=fsdp trains in bfloat16 or float32; set dtype=bfloat16 (or float32)")
    if arch == "lstm":
        raise ConfigError("parallel=fsdp shards transformer blocks; arch=lstm trains with parallel=ddp")


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
        raise ConfigError(f"gradient_accumulation_steps={accum} is the global number of micro-batches per "
                         f"step and must divide by the {world} processes; use a multiple of {world}")
    return accum // world


def barrier():
    if torch_dist.is_initialized():
        torch_dist.barrier()


# ----------------------------------------------------------------------------- RNG states of every process

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
