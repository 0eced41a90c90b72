"""
What makes the GPT fast and small on a GPU without changing what it computes: FlexAttention
(attn_backend='flex'), a loss that never holds the logits in float32 all at once, and
activation checkpointing. model.py is readable without this file; each piece here is switched
on by a config key or by the precision the run trains in.

  1. FlexAttention        the one mask rule (model.mask_rule) compiled into a block-sparse
                          kernel: documents, windows and padding cost only the blocks they keep
  2. the loss             cross-entropy over low-precision logits, upcast a chunk at a time
  3. checkpointing        keep only each block's input in forward, recompute it in backward
"""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------- 1. FlexAttention


def flex_block_mask(rule, doc_ids, valid, window, B, T, device, causal=True):
    """FlexAttention's block mask for rule (model.mask_rule). Data-dependent masks (documents,
    padding) are built per batch; the plain causal or sliding-window one depends only on T and
    is cached (inside torch.compile(model) it is built in the graph: the compiler ignores the
    cache)."""
    if doc_ids is None and valid is None and not torch.compiler.is_compiling():
        return plain_block_mask(rule, T, window, str(device), causal)

    def mask_mod(b, h, q_idx, kv_idx):
        doc_q = doc_k = valid_k = None
        if doc_ids is not None:
            doc_q, doc_k = doc_ids[b, q_idx], doc_ids[b, kv_idx]
        if valid is not None:
            valid_k = valid[b, kv_idx]
        return rule(q_idx, kv_idx, doc_q, doc_k, window, valid_k, causal)

    return create_block_mask(mask_mod, B, None, T, T, device=device)


@functools.lru_cache(maxsize=16)
def plain_block_mask(rule, T, window, device, causal):
    return create_block_mask(lambda b, h, q, kv: rule(q, kv, window=window, causal=causal), None, None, T, T,
                             device=device)


@functools.cache
def compiled_flex_attention(device_type):
    """FlexAttention compiled once per device type. GPUs: automatic dynamic shapes, so a second
    sequence length or batch size compiles one kernel for all later ones (dynamic=False compiles
    one per shape up to the recompile limit, then falls back to the slow unfused path). CPUs keep
    static shapes: inductor's CPU template does not build dynamic ones (docs/LOG.md)."""
    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


def flex_attend(q, k, v, block_mask):
    """softmax(q kᵀ / √hd + mask) v with FlexAttention. q (B, nh, T, hd); k, v (B, nkv, T, hd)."""
    gqa = q.shape[1] != k.shape[1]
    if torch.compiler.is_compiling():  # inside torch.compile(model), which fuses flex itself; strided
        # views of the fused q, k, v projection are made contiguous first (docs/LOG.md: a wrong read)
        return flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=block_mask, enable_gqa=gqa)
    return compiled_flex_attention(q.device.type)(q, k, v, block_mask=block_mask, enable_gqa=gqa)


# ----------------------------------------------------------------------------- 2. the loss

# Rows of logits upcast to float32 at once when the loss is computed in eager mode from
# low-precision logits: 2^24 elements = 64 MiB of float32.
CE_CHUNK_ELEMENTS = 1 << 24


def cross_entropy(logits, targets):
    """Mean next-token loss in float32 over (B, T, V) logits; targets of -1 are ignored."""
    if logits.dtype == torch.float32:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    return chunked_cross_entropy(logits, targets)


def chunked_cross_entropy(logits, targets):
    """cross_entropy of low-precision logits (autocast). Upcast all at once, they would leave a
    float32 copy of the whole tensor and its log-softmax for backward; in eager mode rows are
    upcast a chunk at a time under checkpointing instead. The chunks are split(), not sliced: a
    slice's backward allocates a zero gradient the size of all the logits, so n slices cost n
    full-size tensors (quadratic; split's backward concatenates once, docs/benchmarks.md).
    torch.compile fuses the upcast into the loss kernel by itself."""
    logits, targets = logits.flatten(0, 1), targets.flatten()
    if torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), targets, ignore_index=-1)
    rows = max(1, CE_CHUNK_ELEMENTS // logits.shape[-1])
    total = logits.new_zeros((), dtype=torch.float32)
    for args in zip(logits.split(rows), targets.split(rows)):
        total = total + (checkpoint(_summed_ce, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else _summed_ce(*args))
    return total / (targets != -1).sum()


def _summed_ce(logits, targets):
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="sum")


# ----------------------------------------------------------------------------- 3. checkpointing

def checkpoint_blocks(model):
    """Activation checkpointing (activation_checkpointing=True): wrap each of the model's
    transformer blocks so that training keeps only the block's input and backward runs the
    block again: activation memory of one block instead of all of them. Parameter names gain
    `_checkpoint_wrapped_module.`; state dicts do not (the wrapper strips it). A model without
    blocks (arch='lstm') raises ValueError rather than training silently without."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)
    blocks = {id(b) for b in model.blocks()} if hasattr(model, "blocks") else set()
    if not blocks:
        raise ValueError("activation_checkpointing recomputes transformer blocks and this model (arch="
                         f"{model.config.arch!r}) has none; set activation_checkpointing=False")
    wrap = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: id(m) in blocks)
    return model


def plain_name(name):
    """A parameter's name as the unwrapped model spells it (see checkpoint_blocks)."""
    return name.replace("._checkpoint_wrapped_module", "")
