"""
A GPT written out by hand: exactly GPT-2 in its default setting, with the options current
practice uses (RoPE, RMSNorm, QK-norm, SwiGLU / ReLU², GQA, untied embeddings, logit softcap,
sliding-window and document-masked attention, x0 mixing) one config key away.

The transformer and nothing else. Read it top to bottom:
  1. GPTConfig    the architecture, built from the shared config namespace
  2. attention    who may attend to whom (mask_rule, one rule for every backend), rotary
                  positions, the attention layer (math: the readable reference; sdpa: fused)
  3. MLP, Block   the rest of a transformer block
  4. GPT          embeddings -> blocks -> final norm -> logits -> loss, on one screen; which
                  parameters are hidden matrices; parameter and FLOP accounting
What builds on it lives beside it: multitoken.py (extra heads predicting tokens further ahead),
encoder.py (arch='bert'), rnn.py (arch='lstm'), cnn.py (arch='cnn'), systems.py (FlexAttention, memory tricks),
generate.py (KV cache and sampling), adapters.py (LoRA, classifier), hf.py (GPT-2 weights).
Shapes: B batch, T time, C = n_embd, nh / nkv query / key-value heads, hd = C // nh, V vocabulary.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from systems import chunked_cross_entropy, flex_attend, flex_block_mask

# ----------------------------------------------------------------------------- 1. config


@dataclass
class GPTConfig:
    arch: str = "gpt"            # gpt: causal decoder; bert: encoder.Encoder; lstm: rnn.LSTMLM; cnn: cnn.GatedConvLM
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
    mtp_heads: int = 1           # heads predicting tokens t+1 .. t+n (multitoken.py); 1 = plain GPT
    mtp_weights: str = ""        # comma-separated loss weight per head; empty = equal
    pad_vocab_to: int = 64
    attn_backend: str = "sdpa"
    attn_window: int = 0
    x0_mix: bool = False         # each block reads a learned blend of the residual stream and the embeddings
    conv_kernel: int = 4         # arch=cnn: taps of each causal convolution
    conv_dilation: int = 2       # arch=cnn: how much each layer's dilation grows (cnn.dilations)

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_layer < 1:
            raise ValueError(f"n_layer={self.n_layer}: a GPT needs at least one block")
        if self.arch in ("gpt", "bert") and (self.n_embd % self.n_head or self.n_head % self.n_kv_head):
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
        if self.arch != "cnn" and (self.conv_kernel, self.conv_dilation) != (4, 2):
            raise ValueError(f"conv_kernel and conv_dilation shape arch='cnn' only (arch={self.arch!r})")
        check_flex_dropout(self.attn_backend, self.dropout)

    def changed(self, names):
        """'name=value' for each of names set away from its default (n_kv_head's is n_head): an
        architecture with no use for them (rnn.py, cnn.py) refuses them instead of ignoring them."""
        default = GPTConfig(arch=self.arch, n_head=self.n_head, n_embd=self.n_embd)
        return [f"{name}={getattr(self, name)!r}" for name in names if getattr(self, name) != getattr(default, name)]

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


def attend(q, k, v, mask, dropout_p):
    """The math reference: softmax(q kᵀ / √hd + mask) v, as the sdpa and flex kernels compute it.
    q (B, nh, Tq, hd); k, v (B, nkv, Tk, hd) -> (B, nh, Tq, hd). mask: CAUSAL, None (every key),
    or a bool tensor (B|1, 1, Tq, Tk) with True = attend."""
    if q.shape[1] != k.shape[1]:  # GQA: each group of nh/nkv query heads shares one value head
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return F.dropout(attention_weights(q, k, mask), dropout_p) @ v


def attention_weights(q, k, mask):
    """softmax(q kᵀ / √hd + mask) (B, nh, Tq, Tk): how much each query reads each key (explain.py
    draws them). Arguments as attend's."""
    if q.shape[1] != k.shape[1]:  # GQA: each group of nh/nkv query heads shares one key head
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, Tq, Tk)
    if mask is CAUSAL:
        mask = torch.ones(att.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return F.softmax(att, dim=-1)


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
        config, (B, T, C), nh, nkv, hd = self.config, x.shape, self.config.n_head, self.config.n_kv_head, self.hd
        q, k, v = self.c_attn(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd)   # (B, T, nh, hd)
        k = k.view(B, T, nkv, hd)  # (B, T, nkv, hd)
        v = v.view(B, T, nkv, hd)  # (B, T, nkv, hd)
        if config.qk_norm:
            # (rms_norm runs in float32 under autocast: back to v's dtype, or the KV cache would be float32)
            q, k = F.rms_norm(q, (hd,)).type_as(v), F.rms_norm(k, (hd,)).type_as(v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, Tcache, hd): every token so far
        dropout = config.dropout if self.training else 0.0
        if config.attn_backend == "math":
            y = attend(q, k, v, mask, dropout)
        elif config.attn_backend == "flex" and cache is None:  # (flex block masks are built for whole sequences)
            y = flex_attend(q, k, v, mask)
        else:
            if nh != nkv and mask is not CAUSAL:  # SDPA's fused kernels take GQA or a mask, not both (on CUDA
                # only the slow math kernel would): give every query head its own copy of k and v instead
                k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is CAUSAL else mask,
                                               is_causal=mask is CAUSAL, dropout_p=dropout,
                                               enable_gqa=k.shape[1] != nh)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): the heads side by side again
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
        h = self.c_fc(x)  # (B, T, hidden), SwiGLU: (B, T, 2 hidden)
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

    def forward(self, x, x0, rope=None, mask=CAUSAL, cache=None):
        """x: the residual stream (B, T, C); x0: the embedded tokens (B, T, C), read with x0_mix."""
        if self.x0_weights is not None:
            x = self.x0_weights[0] * x + self.x0_weights[1] * x0
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- 4. the model


class GPT(nn.Module):
    """Token ids -> embeddings -> blocks -> final norm -> logits (-> loss)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(self.make_block(config, i) for i in range(config.n_layer)),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.init_buffers()
        self.apply(self._init_weights)

    def init_buffers(self, device=None):
        """The RoPE tables: computed, never saved (so also made again when a model built on the
        meta device, without memory, gets its memory: FSDP's start, distributed.shard_model)."""
        if self.config.pos == "rope":
            cos, sin = rope_tables(self.config)
            self.register_buffer("rope_cos", cos.to(device), persistent=False)
            self.register_buffer("rope_sin", sin.to(device), persistent=False)

    causal = True  # each position sees only those before it (encoder.py: arch='bert' sees all)

    def make_block(self, config, layer_idx):
        return Block(config, layer_idx)  # (encoder.py's may be post-norm)

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

    def forward(self, idx, targets=None, doc_ids=None, cache=None, valid=None):
        """idx (B, T) -> (next-token logits (B, T, V), mean loss over targets != -1, or None).
        doc_ids (B, T): attend only within documents. cache: a generate.KVCache to read and
        extend; then only the last position's logits are computed (B, 1, V). valid (B,
        Tcache + T) bool: False marks padding (prompts of unequal length)."""
        x, rope, mask = self.inputs(idx, doc_ids, cache, valid)
        x = x0 = self.transformer.drop(x)  # (B, T, C): the embedded tokens
        for block in self.transformer.h:
            x = block(x, x0, rope, mask, cache)  # (B, T, C)
        if cache is not None:  # generating: the next token is predicted from the last position only
            x = x[:, -1:]
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V padded)
        if self.config.logit_softcap > 0:  # squash logits smoothly into (-cap, cap) (Gemma 2), in float32
            logits = self.config.logit_softcap * torch.tanh(logits.float() / self.config.logit_softcap)
        logits = logits[..., :self.config.vocab_size]  # (B, T, V): padding columns cut off
        if targets is None:
            return logits, None
        if logits.dtype != torch.float32:  # low precision (autocast): upcast a chunk at a time
            return logits, chunked_cross_entropy(logits, targets)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)

    def inputs(self, idx, doc_ids=None, cache=None, valid=None):
        """What every block reads: the embedded tokens (B, T, C) before dropout, the RoPE tables
        and the attention mask. Arguments as in forward()."""
        config, (B, T) = self.config, idx.shape
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
        rope = None
        if config.pos == "rope":
            rope = (self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2))  # (B|1, T, 1, hd/2)
        flex = config.attn_backend == "flex" and cache is None  # flex block masks are built for whole sequences
        if start == 0 and doc_ids is None and valid is None and config.attn_window == 0 and not flex:
            mask = CAUSAL if self.causal else None  # the common case: no mask tensor at all
        else:
            mask = self.attention_mask(B, T, start, doc_ids, valid, flex, idx.device)
        return x, rope, mask

    def attention_mask(self, B, T, start, doc_ids, valid, flex, device):
        """mask_rule as a bool tensor (B|1, 1, T, start + T), or as a FlexAttention block mask."""
        config = self.config
        if flex:
            return flex_block_mask(mask_rule, doc_ids, valid, config.attn_window, B, T, device, self.causal)
        q_idx = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
        kv_idx = torch.arange(start + T, device=device)[None, :]       # (1, Tk)
        doc_q = doc_k = valid_k = q_pos = k_pos = None
        if doc_ids is not None:
            doc_q, doc_k = doc_ids[:, :, None], doc_ids[:, None, :]       # (B, T, 1), (B, 1, T)
        if valid is not None:
            valid_k = valid[:, None, :]                                   # (B, 1, Tk)
            k_pos = valid.long().cumsum(dim=1)[:, None, :]                # (B, 1, Tk): real tokens so far
            q_pos = k_pos[:, 0, start:, None]                             # (B, T, 1)
        keep = mask_rule(q_idx, kv_idx, doc_q, doc_k, config.attn_window, valid_k, self.causal, q_pos, k_pos)
        return keep.reshape(-1, 1, T, start + T)  # (B|1, 1, Tq, Tk)

    # -- what the parameters are: asked of the modules, never guessed from names

    def blocks(self):
        """Every transformer block (multitoken.py adds its heads' blocks)."""
        return list(self.transformer.h)

    def hidden_matrices(self):
        """The 2-D weights inside the blocks (LoRA adapters too): what Muon trains and what the
        FLOP count counts as matmuls. Embeddings, the output head, norms, biases and scalars
        are not."""
        return [p for block in self.blocks() for p in block.parameters() if p.dim() == 2]

    def embeddings(self):
        """The modules below the first block (encoder.py adds token types and a norm)."""
        return [m for m in (self.transformer.wte, self.transformer.wpe) if m is not None]

    def parameter_depths(self):
        """{parameter name: depth}: block i -> i; the embeddings -> -1 (lowest); the final norm,
        the output head and any extra heads' blocks -> n_layer (top). A tied output head is the
        embedding table, so it counts as an embedding. For layer-wise learning rates."""
        depth = {id(p): self.config.n_layer for p in self.parameters()}
        for i, block in enumerate(self.transformer.h):
            depth.update({id(p): i for p in block.parameters()})
        depth.update({id(p): -1 for m in self.embeddings() for p in m.parameters()})
        return {name: depth[id(p)] for name, p in self.named_parameters()}

    def num_params(self, embeddings=True):
        """Parameter count (tied weights once). Without embeddings: minus the embedding tables,
        but an untied output head still counts (it is a matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= sum(m.weight.numel() for m in self.embeddings() if isinstance(m, nn.Embedding))
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM paper's
        appendix: 6 per weight of every matmul (the output head included, tied or not, once per
        head), plus 12 * blocks * C * T for the attention scores and weighted sum at length T."""
        config = self.config
        matmul = sum(p.numel() for p in self.hidden_matrices())
        matmul += config.padded_vocab * config.n_embd * config.mtp_heads  # every head runs the unembedding
        return 6 * matmul + 12 * len(self.blocks()) * config.n_embd * (seq_len or config.block_size)
