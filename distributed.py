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
    Each process keeps 1/world of every weight, gradient and optimizer state. In bf16 the
    blocks' gathered weights are bf16 and gradients are reduced in float32. With compile, each
    block is compiled in place before sharding (torchtitan's order). Returns the fraction of
    the parameters this process holds.

    The model never exists whole on a GPU: it is sharded on the meta device (no memory), then
    each process allocates its shards on its device. Rank 0's weights (when it has them: a
    fresh run; a resume reads its shards from the checkpoint instead) are sent out tensor by
    tensor, each process keeping its shard. Only rank 0 ever built the model in host memory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    has_weights = not any(p.is_meta for p in model.parameters())
    weights = model.state_dict() if has_weights and torch_dist.get_rank() == 0 else {}
    with same_parameters():
        model.to("meta")
    # In bf16 the blocks' weights are gathered in bf16; the root unit's (embeddings, final norm,
    # head) stay float32 and autocast runs its matmuls in bf16, and no unit casts its inputs:
    # so the residual stream, x0 and the RoPE tables stay float32 between blocks, as under DDP
    # with autocast (one float32 gather of the embeddings per step is the price).
    precision = root_precision = MixedPrecisionPolicy(cast_forward_inputs=False)
    if compute.dtype == torch.bfloat16:
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                         cast_forward_inputs=False)
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        if cfg.compile:
            block.compile()
        fully_shard(block, mp_policy=precision, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    fully_shard(model, mp_policy=root_precision)
    if isinstance(model, MultiTokenGPT):  # evaluation calls head_losses on the root: it must gather weights too
        register_fsdp_forward_method(model, "head_losses")
    with same_parameters():
        model.to_empty(device=compute.device)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers(compute.device)
    if from_master(has_weights):
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    held = sum(p.to_local().numel() for p in model.parameters()) / sum(p.numel() for p in model.parameters())
    if torch_dist.get_rank() == 0:
        print(f"FSDP: each of the {torch_dist.get_world_size()} processes holds {held:.1%} of the weights and "
              f"their optimizer state")
    return held


@contextlib.contextmanager
def same_parameters():
    """Moving a module between devices (to meta, or to_empty) makes new Parameter objects, which
    would untie weights that two modules share (a tied LM head and embedding); swapping the new
    tensors into the same objects keeps them shared."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


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
    """A context for one micro-batch's forward and backward: under DDP, reduce gradients across
    processes only when enabled (the last micro-batch of a step); DDP prepares the reduction
    during the forward, so its no_sync() must wrap both. FSDP reduce-scatters after every
    micro-batch (as torchtitan does): holding the sync back would keep every block's unsharded
    gradient until the last micro-batch, the memory FSDP exists to save."""
    if hasattr(model, "no_sync") and not enabled:  # DDP (an FSDP2 module has no no_sync)
        return model.no_sync()
    return contextlib.nullcontext()


def micro_batches_per_process(cfg, world):
    """gradient_accumulation_steps counts the micro-batches of one optimizer step over all
    processes, so the global batch is the same on 1 GPU or 8; each process runs its share."""
    accum = cfg.gradient_accumulation_steps
    if accum % world:
        raise ConfigError(f"gradient_accumulation_steps={accum} is the global number of micro-batches per "
                         f"step and must divide by the {world} processes; use a multiple of {world} (a resumed "
                         f"run keeps its own: run it on a number of processes that divides {accum})")
    return accum // world


def barrier():
    if torch_dist.is_initialized():
        torch_dist.barrier()


def from_master(value):
    """Rank 0's value, on every process. A decision that drives collectives (resume or start
    afresh, prepare the data or not, did the metric improve, did the save work) must be taken
    once: processes that look for themselves (node-local disks, a stale NFS cache, a float that
    rounds differently) would run different collectives and hang, or silently diverge."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- RNG states of every process

def rng_state():
    """This process's RNG states. On a GPU only its own device's: a resume on fewer GPUs (another
    world size) could not restore the states of devices it no longer sees."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: setup_processes set it
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # checkpoints from before: every visible device's state
        cuda = cuda[0] if cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


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
