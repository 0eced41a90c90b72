"""
A GPT written out by hand: exactly GPT-2 in its default setting, with the options current
practice uses (RoPE, RMSNorm, QK-norm, SwiGLU / ReLU², GQA, untied embeddings, logit softcap,
sliding-window and document-masked attention, multi-token heads) one config key away. With
arch='bert' the same blocks without the causal mask make an encoder, trained to fill in masked
tokens (BERT: post-norm, token-type embeddings and its output transform, one key each).

The transformer and nothing else (generation: generate.py; GPT-2 weights: hf.py; LoRA and the
classifier: adapters.py). Read it top to bottom:
  1. GPTConfig    the architecture, built from the shared config namespace
  2. attention    who may attend to whom (one rule; backends math = the readable reference, sdpa,
                  flex), rotary positions, the attention layer
  3. MLP, Block   the rest of a transformer block; MLMTransform, an encoder's output transform
  4. GPT          embeddings -> blocks -> final norm -> logits (a decoder, or with arch='bert' an
                  encoder); the loss; multi-token heads; which
                  parameters are hidden matrices; parameter and FLOP accounting
Shapes: B batch, T time, C = n_embd, nh / nkv query / key-value heads, hd = C // nh, V vocabulary.
"""

import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------- 1. config


@dataclass
class GPTConfig:
    arch: str = "gpt"            # gpt: causal decoder; bert: bidirectional encoder; lstm: rnn.LSTMLM
    vocab_size: int = 50257      # true vocabulary; embeddings are padded past it (pad_vocab_to)
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0           # 0 = n_head
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
    norm_position: str = "pre"   # pre: x + f(norm(x)) (GPT-2); post: norm(x + f(x)) (BERT)
    norm_eps: float = 1e-5
    type_vocab_size: int = 0     # token-type (segment) embeddings, BERT's; 0 = none
    pos: str = "learned"
    rope_theta: float = 10000.0
    mlp: str = "gelu"
    qk_norm: bool = False
    tie_embeddings: bool = True
    logit_softcap: float = 0.0
    zero_init_proj: bool = False
    mtp_heads: int = 1           # heads predicting tokens t+1 .. t+n (Gloeckle et al. 2024); 1 = plain GPT
    mtp_weights: str = ""        # comma-separated loss weight per head; empty = equal
    pad_vocab_to: int = 64
    attn_backend: str = "sdpa"
    attn_window: int = 0
    x0_mix: bool = False         # each block reads a learned blend of the residual stream and the embeddings

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_layer < 1:
            raise ValueError(f"n_layer={self.n_layer}: a GPT needs at least one block")
        if self.arch != "lstm" and (self.n_embd % self.n_head or self.n_head % self.n_kv_head):
            raise ValueError(f"n_embd={self.n_embd} must divide by n_head={self.n_head}, "
                             f"and n_head by n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos='rope' needs an even head size, got {self.n_embd // self.n_head}")
        if self.mtp_heads < 1 or self.mtp_heads > self.n_layer + 1:
            raise ValueError(f"mtp_heads={self.mtp_heads} must be between 1 and n_layer+1")
        if self.mtp_weights and len(self.mtp_weights.split(",")) != self.mtp_heads:
            raise ValueError(f"mtp_weights={self.mtp_weights!r} needs one weight per head ({self.mtp_heads})")
        if self.arch == "bert" and self.mtp_heads > 1:
            raise ValueError("arch='bert' predicts masked tokens in place: mtp_heads must be 1")
        check_flex_dropout(self.attn_backend, self.dropout)

    @property
    def causal(self):
        return self.arch != "bert"

    @property
    def padded_vocab(self):
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @classmethod
    def from_config(cls, cfg, vocab_size):
        """Pick this dataclass's keys out of the shared config namespace."""
        values = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name != "vocab_size"}
        return cls(vocab_size=vocab_size, **values)


def check_flex_dropout(backend, dropout):
    if backend == "flex" and dropout > 0:
        raise ValueError("attn_backend='flex' has no attention dropout: set dropout=0 or use 'sdpa'")


# ----------------------------------------------------------------------------- 2. attention

CAUSAL = "causal"  # sentinel: plain causal mask over a full sequence (lets sdpa use flash kernels)


def mask_rule(q_idx, kv_idx, doc_q=None, doc_k=None, window=0, valid_k=None, causal=True, q_pos=None, k_pos=None):
    """True where a query may attend to a key, elementwise on tensors of any broadcastable shape:
    the dense masks and FlexAttention's mask_mod share this one definition. A decoder's query
    sees keys up to itself (causal); an encoder's sees every key. doc_q, doc_k: document ids
    (packed sequences); window: sliding-window span (0 = off), measured in positions q_pos,
    k_pos (default: the slot indices; a cache with padding or holes counts only real tokens);
    valid_k: False for a padding key, attended to by itself only (so no row is empty)."""
    keep = q_idx >= kv_idx if causal else torch.ones_like(q_idx - kv_idx, dtype=torch.bool)
    if doc_q is not None:
        keep = keep & (doc_q == doc_k)
    if window > 0:
        distance = q_idx - kv_idx if q_pos is None else q_pos - k_pos
        keep = keep & (distance.abs() < window)
    if valid_k is not None:
        keep = keep & (valid_k | (q_idx == kv_idx))
    return keep


def document_ids(idx, eot_id):
    """(B, T) running count of end-of-text tokens: the document each position belongs to.
    An end-of-text token opens its document (it is written before each one, like a BOS)."""
    return (idx == eot_id).cumsum(dim=1)


def flex_block_mask(doc_ids, valid, window, B, T, device, causal=True):
    """FlexAttention's block mask for mask_rule. Data-dependent masks (documents, padding) are
    built per batch; the plain causal or sliding-window one depends only on T and is cached
    (inside torch.compile(model) it is built in the graph: the compiler ignores the cache)."""
    if doc_ids is None and valid is None and not torch.compiler.is_compiling():
        return plain_block_mask(T, window, str(device), causal)

    def mask_mod(b, h, q_idx, kv_idx):
        doc_q = doc_k = valid_k = None
        if doc_ids is not None:
            doc_q, doc_k = doc_ids[b, q_idx], doc_ids[b, kv_idx]
        if valid is not None:
            valid_k = valid[b, kv_idx]
        return mask_rule(q_idx, kv_idx, doc_q, doc_k, window, valid_k, causal)

    return create_block_mask(mask_mod, B, None, T, T, device=device)


@functools.lru_cache(maxsize=16)
def plain_block_mask(T, window, device, causal):
    return create_block_mask(lambda b, h, q, kv: mask_rule(q, kv, window=window, causal=causal), None, None, T, T,
                             device=device)


@functools.cache
def compiled_flex_attention(device_type):
    """FlexAttention compiled once per device type. GPUs: automatic dynamic shapes, so a second
    sequence length or batch size compiles one kernel for all later ones (dynamic=False compiles
    one per shape up to the recompile limit, then falls back to the slow unfused path). CPUs keep
    static shapes: inductor's CPU template fails to build dynamic ones (torch 2.13)."""
    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


def attend(q, k, v, mask, backend, dropout_p):
    """softmax(q kᵀ / √hd + mask) v. q (B, nh, Tq, hd); k, v (B, nkv, Tk, hd) -> (B, nh, Tq, hd).
    mask: CAUSAL, None (an encoder's: every key), a bool tensor (B|1, 1, Tq, Tk) with True =
    attend, or a flex BlockMask."""
    gqa = q.shape[1] != k.shape[1]
    if backend == "math":
        if gqa:  # each group of nh/nkv query heads shares one key/value head
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, Tq, Tk)
        if mask is CAUSAL:
            Tq, Tk = att.shape[-2:]
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), dropout_p)
        return att @ v
    if backend == "sdpa":
        causal = mask is CAUSAL
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                              dropout_p=dropout_p, enable_gqa=gqa)
    if backend == "flex":
        if torch.compiler.is_compiling():  # inside torch.compile(model), which fuses flex itself. q and k
            # are strided views of one (B, T, nh + nkv, hd) tensor; inside a compiled model the flex
            # kernel reads such views wrongly (0.17 off the math backend with RoPE, torch 2.13 CPU)
            return flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=mask, enable_gqa=gqa)
        return compiled_flex_attention(q.device.type)(q, k, v, block_mask=mask, enable_gqa=gqa)
    raise ValueError(f"unknown attn_backend {backend!r}")


def rope_tables(config):
    """cos, sin of shape (block_size, hd/2) for rotary position embeddings."""
    hd = config.n_embd // config.n_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + hd/2]) by position-dependent angles.
    x (B, T, heads, hd); cos, sin (B|1, T, 1, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.hd = config.n_embd // config.n_head
        # one fused projection for q, k, v: (nh + 2 nkv) heads of hd each
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.hd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual = True  # marks it for GPT-2's scaled init
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache):
        config, B, T = self.config, x.shape[0], x.shape[1]
        qk, v = self.c_attn(x).split([(config.n_head + config.n_kv_head) * self.hd, config.n_kv_head * self.hd], dim=-1)
        # q and k heads side by side (B, T, nh + nkv, hd): one norm and one rotation serve both
        qk = qk.view(B, T, config.n_head + config.n_kv_head, self.hd)
        if config.qk_norm:
            qk = F.rms_norm(qk, (self.hd,))
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.split([config.n_head, config.n_kv_head], dim=2)  # (B, T, nh, hd), (B, T, nkv, hd)
        v = v.view(B, T, config.n_kv_head, self.hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        backend = config.attn_backend
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, Tcache, hd)
            backend = "math" if backend == "math" else "sdpa"  # flex block masks are built for full sequences
        y = attend(q, k, v, mask, backend, config.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, config.n_embd)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


# ----------------------------------------------------------------------------- 3. MLP and block


def make_norm(config):
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
    return nn.RMSNorm(config.n_embd, eps=config.norm_eps)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        # SwiGLU has three matrices: a hidden width of 8C/3 (rounded down to a multiple of 16)
        # keeps the parameter count at most that of a 4C two-matrix MLP
        hidden = 4 * config.n_embd if config.mlp != "swiglu" else 8 * config.n_embd // 3 // 16 * 16
        self.c_fc = nn.Linear(config.n_embd, hidden * (2 if config.mlp == "swiglu" else 1), bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        elif self.kind == "gelu_exact":
            h = F.gelu(h)  # BERT's
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1, self.attn = make_norm(config), SelfAttention(config, layer_idx)
        self.ln_2, self.mlp = make_norm(config), MLP(config)
        # x0_mix: the block's input is a * x + b * x0, a blend of the residual stream and the token
        # embeddings, so every layer can reach the token's identity directly (modded-nanogpt).
        # a = 1, b = 0 at init: the plain residual stream.
        self.x0_weights = nn.Parameter(torch.tensor([1.0, 0.0])) if config.x0_mix else None
        self.post_norm = config.norm_position == "post"

    def forward(self, x, x0, rope=None, mask=CAUSAL, cache=None):
        """x: the residual stream (B, T, C); x0: the embedded tokens (B, T, C), read with x0_mix."""
        if self.x0_weights is not None:
            x = self.x0_weights[0] * x + self.x0_weights[1] * x0
        if self.post_norm:  # the original transformer's and BERT's order: normalise the sum
            x = self.ln_1(x + self.attn(x, rope, mask, cache))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        return x + self.mlp(self.ln_2(x))


class MLMTransform(nn.Module):
    """BERT's output transform before the unembedding: dense, GELU, norm. (B, T, C) -> (B, T, C)."""

    def __init__(self, config):
        super().__init__()
        self.dense, self.norm = nn.Linear(config.n_embd, config.n_embd, bias=config.bias), make_norm(config)

    def forward(self, h):
        return self.norm(F.gelu(self.dense(h)))


# ----------------------------------------------------------------------------- 4. the model


class GPT(nn.Module):
    """Token ids -> embeddings -> blocks -> final norm -> logits.

    arch='bert' makes it an encoder: every position attends to every other, and the logits at a
    position predict the token there, which the input hid behind the mask token (masked language
    modelling; train.py masks the batches). Its head is BERT's: a dense layer, GELU and a norm
    before the unembedding, which has a bias. norm_position='post' (BERT) normalises after each
    residual sum and the embeddings once (ln_e) instead of before each branch and at the end.

    Multi-token prediction (Gloeckle et al. 2024): with mtp_heads = n, the blocks but the last
    are a shared trunk; head 1 is the last block, heads 2..n one extra block each (self.mtp),
    all on the trunk's output and all sharing the final norm and the unembedding. Head i at
    position t predicts token t+i. With n = 1 this is exactly the plain GPT."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None,
            wtt=nn.Embedding(config.type_vocab_size, config.n_embd) if config.type_vocab_size else None,
            ln_e=make_norm(config) if config.norm_position == "post" else None,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=make_norm(config) if config.norm_position == "pre" else nn.Identity(),
        ))
        self.mtp = nn.ModuleList(Block(config, config.n_layer + i) for i in range(config.mtp_heads - 1))
        self.mlm_transform = MLMTransform(config) if config.arch == "bert" else None
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab, bias=config.arch == "bert")
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if config.pos == "rope":
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        self.checkpoint_blocks = False  # activation checkpointing, a training setting (fit() sets it)

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) everywhere; projections into the residual stream scaled by
        # 1/sqrt(2 n_layer) so the stream's variance does not grow with depth
        if isinstance(module, nn.Linear):
            residual = getattr(module, "residual", False)
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
            if residual and self.config.zero_init_proj:  # every block starts as the identity
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def head_blocks(self):
        """The block of each head: the last block (head 1), then the extra heads'."""
        return [self.transformer.h[-1], *self.mtp]

    # -- the forward pass, in three steps: inputs (embeddings, positions, mask), the blocks, head

    def inputs(self, idx, doc_ids=None, cache=None, valid=None):
        """What every block needs: embedded tokens x0 (B, T, C), RoPE tables, the attention mask.
        doc_ids (B, T): keep attention inside documents. cache: a generate.KVCache to read and
        extend. valid (B, Tcache + T) bool: False marks padding (prompts of unequal length)."""
        config = self.config
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={config.block_size}")
        if valid is None:
            pos = torch.arange(start, start + T, device=idx.device).unsqueeze(0)  # (1, T)
        else:  # positions count only real tokens, so a padded prompt sees the positions an unpadded one would
            pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)[:, start:start + T]  # (B, T)
        x = self.transformer.wte(idx)  # (B, T, C)
        if config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        if config.type_vocab_size:  # every token is segment A: no task here pairs two texts
            x = x + self.transformer.wtt.weight[0]
        if self.transformer.ln_e is not None:
            x = self.transformer.ln_e(x)
        rope = None
        if config.pos == "rope":
            rope = (self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2))  # (B|1, T, 1, hd/2)
        mask = self.attention_mask(B, T, start, doc_ids, valid, cache is not None, idx.device)
        return self.transformer.drop(x), rope, mask

    def attention_mask(self, B, T, start, doc_ids, valid, cached, device):
        config = self.config
        if config.attn_backend == "flex" and not cached:
            return flex_block_mask(doc_ids, valid, config.attn_window, B, T, device, config.causal)
        if start == 0 and doc_ids is None and config.attn_window == 0 and valid is None:
            return CAUSAL if config.causal else None
        q_idx = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
        kv_idx = torch.arange(start + T, device=device)[None, :]       # (1, Tk)
        doc_q = doc_k = valid_k = q_pos = k_pos = None
        if doc_ids is not None:
            doc_q, doc_k = doc_ids[:, :, None], doc_ids[:, None, :]       # (B, T, 1), (B, 1, T)
        if valid is not None:
            valid_k = valid[:, None, :]                                   # (B, 1, Tk)
            k_pos = valid.long().cumsum(dim=1)[:, None, :]                # (B, 1, Tk): real tokens so far
            q_pos = k_pos[:, 0, start:, None]                             # (B, T, 1)
        keep = mask_rule(q_idx, kv_idx, doc_q, doc_k, config.attn_window, valid_k, config.causal, q_pos, k_pos)
        return keep.reshape(-1, 1, T, start + T)  # (B|1, 1, Tq, Tk)

    def trunk(self, idx, doc_ids=None, cache=None, valid=None):
        """Token ids (B, T) -> (z, context): z (B, T, C) the output of every block but the last,
        the trunk all heads share; context = (x0, rope, mask), what each head block also reads.
        The one loop over the blocks; arguments as in inputs()."""
        x0, rope, mask = self.inputs(idx, doc_ids, cache, valid)
        z = x0
        for block in self.transformer.h[:-1]:
            z = self.run_block(block, z, (x0, rope, mask), cache)
        return z, (x0, rope, mask)

    def run_block(self, block, z, context, cache=None):
        """block(z, *context). With checkpoint_blocks, training keeps only the block's input z and
        backward runs the block again: activation memory of one block instead of all of them."""
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return checkpoint(block, z, *context, cache, use_reentrant=False)
        return block(z, *context, cache)

    def hidden(self, idx, heads=1, doc_ids=None, cache=None, valid=None):
        """The output of the first `heads` head blocks, before the final norm: a list of (B, T, C)."""
        z, context = self.trunk(idx, doc_ids, cache, valid)
        out = []
        for block in self.head_blocks()[:heads]:
            out.append(self.run_block(block, z, context, cache))
        if cache is not None:
            cache.length += idx.shape[1]
        return out

    def head(self, h):
        """(B, T, C) -> logits (B, T, V) over the true vocabulary (padding columns cut off)."""
        h = self.transformer.ln_f(h)
        if self.mlm_transform is not None:
            h = self.mlm_transform(h)
        logits = self.lm_head(h)
        if self.config.logit_softcap > 0:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits[..., : self.config.vocab_size]

    def forward(self, idx, targets=None, doc_ids=None):
        """idx (B, T) -> (next-token logits (B, T, V), loss or None). Targets of -1 are ignored.
        (An encoder's logits at t are for the token at t, and its targets are the masked tokens.)
        With mtp_heads > 1 and targets, the loss is the weighted mean of every head's
        cross-entropy and no logits are returned (each head's are freed as soon as scored)."""
        if self.config.mtp_heads == 1 or targets is None:
            logits = self.head(self.hidden(idx, doc_ids=doc_ids)[0])
            return logits, None if targets is None else cross_entropy(logits, targets)
        losses = self.head_losses(idx, targets, doc_ids)
        weights = self.mtp_weights()
        return None, sum(w * loss for w, loss in zip(weights, losses)) / sum(weights)

    def multi_head_logits(self, idx, cache=None, doc_ids=None, valid=None):
        """Every head's logits (a list of n tensors (B, T, V)); head i's row t predicts token t+i."""
        return [self.head(h) for h in self.hidden(idx, self.config.mtp_heads, doc_ids, cache, valid)]

    # -- multi-token prediction

    def drop_mtp_heads(self):
        """Keep head 1 only: the plain next-token model (same outputs, no extra blocks)."""
        self.mtp = nn.ModuleList()
        self.config.mtp_heads, self.config.mtp_weights = 1, ""

    def mtp_weights(self):
        w = self.config.mtp_weights
        return [float(x) for x in w.split(",")] if w else [1.0] * self.config.mtp_heads

    def head_losses(self, idx, targets, doc_ids=None, memory_efficient=True):
        """Cross-entropy of each head (a list of n scalars). targets (B, T) are the next tokens;
        head i's targets are the same stream shifted by i-1 (the last i-1 positions have none).

        memory_efficient: each head runs under activation checkpointing, so its (B, T, V) logits
        are never kept; backward recomputes and back-propagates one head at a time, the heads'
        gradients add up at the trunk output, and the trunk is back-propagated once. Peak logit
        memory is one head's instead of n heads' (the paper's memory-efficient schedule)."""
        z, context = self.trunk(idx, doc_ids)
        losses = []
        for i, block in enumerate(self.head_blocks()):
            shifted = torch.full_like(targets, -1)
            shifted[:, :targets.shape[1] - i] = targets[:, i:]
            args = (z, context, block, shifted)
            if memory_efficient and torch.is_grad_enabled():
                losses.append(checkpoint(self._head_loss, *args, use_reentrant=False))
            else:
                losses.append(self._head_loss(*args))
        return losses

    def _head_loss(self, z, context, block, targets):
        return cross_entropy(self.head(block(z, *context)), targets)

    # -- what the parameters are: asked of the modules, never guessed from names

    def hidden_matrices(self):
        """The 2-D weights inside the blocks (every head's included, LoRA adapters too): what
        Muon trains and what the FLOP count counts as matmuls. Embeddings, the output head,
        norms, biases and scalars are not."""
        return [p for block in [*self.transformer.h, *self.mtp] for p in block.parameters() if p.dim() == 2]

    def parameter_depths(self):
        """{parameter name: depth}: block i -> i; the embeddings -> -1 (lowest); the final norm,
        the output head and the extra heads' blocks -> n_layer (top). A tied output head is the
        embedding table, so it counts as an embedding. For layer-wise learning rates."""
        top = self.config.n_layer
        depth = {id(p): top for p in self.parameters()}
        for i, block in enumerate(self.transformer.h):
            depth.update({id(p): i for p in block.parameters()})
        for emb in (self.transformer.wte, self.transformer.wpe, self.transformer.wtt, self.transformer.ln_e):
            depth.update({id(p): -1 for p in (emb.parameters() if emb is not None else ())})
        return {name: depth[id(p)] for name, p in self.named_parameters()}

    def num_params(self, embeddings=True):
        """Parameter count (tied weights once). Without embeddings: minus the token and
        position tables, but an untied output head still counts (it is a matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            for emb in (self.transformer.wte, self.transformer.wpe, self.transformer.wtt):
                n -= emb.weight.numel() if emb is not None else 0
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM paper's
        appendix: 6 per weight of every matmul (the output head included, tied or not),
        plus 12 * layers * C * T for the attention scores and weighted sum at length T."""
        config = self.config
        T = seq_len or config.block_size
        matmul = sum(p.numel() for p in self.hidden_matrices())
        matmul += config.padded_vocab * config.n_embd * config.mtp_heads  # every head runs the unembedding
        if self.mlm_transform is not None:
            matmul += self.mlm_transform.dense.weight.numel()
        return 6 * matmul + 12 * (config.n_layer + config.mtp_heads - 1) * config.n_embd * T


# Rows of logits upcast to float32 at once when the loss is computed in eager mode from
# low-precision logits: 2^24 elements = 64 MiB of float32.
CE_CHUNK_ELEMENTS = 1 << 24


def cross_entropy(logits, targets):
    """Mean next-token loss in float32 over (B, T, V) logits; targets of -1 are ignored.
    Low-precision logits (autocast) upcast all at once would leave a float32 copy of the whole
    tensor and its log-softmax for backward. In eager mode rows are upcast a chunk at a time under
    checkpointing instead; torch.compile fuses the upcast into the loss kernel by itself."""
    logits, targets = logits.flatten(0, 1), targets.flatten()
    if logits.dtype == torch.float32 or torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), targets, ignore_index=-1)
    rows = max(1, CE_CHUNK_ELEMENTS // logits.shape[-1])
    total = logits.new_zeros((), dtype=torch.float32)
    for i in range(0, len(targets), rows):
        args = (logits[i:i + rows], targets[i:i + rows])
        total = total + (checkpoint(_summed_ce, *args, use_reentrant=False) if torch.is_grad_enabled()
                         else _summed_ce(*args))
    return total / (targets != -1).sum()


def _summed_ce(logits, targets):
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="sum")
