"""
A GPT written out by hand: exactly GPT-2 in its default setting, with the options current
practice uses (RoPE, RMSNorm, QK-norm, SwiGLU / ReLU², GQA, untied embeddings, logit softcap,
sliding-window and document-masked attention) one config key away.

Read in order:
  1. GPTConfig               the architecture, built from the shared config namespace
  2. attention               three backends (math = the readable reference, sdpa, flex) and masks
  3. Block, GPT              the trunk (embeddings + blocks), the head (norm + unembedding), the loss
  4. KVCache, generate()     prefill once, then one token per step
  5. GPT-2 weights           import a Hugging Face checkpoint, export one back
  6. fine-tuning structure   a classification head on the same trunk; LoRA adapters and merging

Shapes: B batch, T time, C = n_embd, nh / nkv query / key-value heads, hd = C // nh head size,
V vocabulary.
"""

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- 1. config


@dataclass
class GPTConfig:
    vocab_size: int = 50257      # true vocabulary; embeddings are padded past it (pad_vocab_to)
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0           # 0 = n_head
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
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
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_embd={self.n_embd} must divide by n_head={self.n_head}, "
                             f"and n_head by n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos='rope' needs an even head size, got {self.n_embd // self.n_head}")
        if self.mtp_heads < 1 or self.mtp_heads > self.n_layer + 1:
            raise ValueError(f"mtp_heads={self.mtp_heads} must be between 1 and n_layer+1")
        if self.mtp_weights and len(self.mtp_weights.split(",")) != self.mtp_heads:
            raise ValueError(f"mtp_weights={self.mtp_weights!r} needs one weight per head ({self.mtp_heads})")
        if self.attn_backend == "flex" and self.dropout > 0:
            raise ValueError("attn_backend='flex' has no attention dropout: set dropout=0 or use 'sdpa'")

    @property
    def padded_vocab(self):
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @classmethod
    def from_config(cls, cfg, vocab_size):
        """Pick this dataclass's keys out of the shared config namespace."""
        values = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name != "vocab_size"}
        return cls(vocab_size=vocab_size, **values)


def gpt2_config(name):
    """The four published GPT-2 sizes."""
    shapes = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
              "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
    n_layer, n_head, n_embd = shapes[name]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)


# ----------------------------------------------------------------------------- 2. attention

CAUSAL = "causal"  # sentinel: plain causal mask over a full sequence (lets sdpa use flash kernels)
_compiled_flex = None


def mask_rule(q_idx, kv_idx, doc_q, doc_k, window):
    """True where a query may attend to a key. Works elementwise on tensors of any broadcastable
    shape, so the dense masks and FlexAttention's mask_mod share this one definition."""
    keep = q_idx >= kv_idx
    if doc_q is not None:
        keep = keep & (doc_q == doc_k)
    if window > 0:
        keep = keep & (q_idx - kv_idx < window)
    return keep


def document_ids(idx, eot_id):
    """(B, T) running count of end-of-text tokens: the document each position belongs to.
    An end-of-text token opens its document (it is written before each one, like a BOS)."""
    return (idx == eot_id).cumsum(dim=1)


def flex_block_mask(doc_ids, window, B, T, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        doc_q = doc_k = None
        if doc_ids is not None:
            doc_q, doc_k = doc_ids[b, q_idx], doc_ids[b, kv_idx]
        return mask_rule(q_idx, kv_idx, doc_q, doc_k, window)

    return create_block_mask(mask_mod, B if doc_ids is not None else None, None, T, T, device=device)


def attend(q, k, v, mask, backend, dropout_p):
    """softmax(q kᵀ / √hd + mask) v. q (B, nh, Tq, hd); k, v (B, nkv, Tk, hd) -> (B, nh, Tq, hd).
    mask: CAUSAL, a bool tensor (B|1, 1, Tq, Tk) with True = attend, or a flex BlockMask."""
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
        global _compiled_flex
        if _compiled_flex is None:
            from torch.nn.attention.flex_attention import flex_attention
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    raise ValueError(f"unknown attn_backend {backend!r}")


def rope_tables(c, device=None):
    """cos, sin of shape (block_size, hd/2) for rotary position embeddings."""
    hd = c.n_embd // c.n_head
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    angles = torch.outer(torch.arange(c.block_size, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + hd/2]) by position-dependent angles.
    x (B, T, heads, hd); cos, sin (B|1, T, 1, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, c, layer_idx):
        super().__init__()
        self.c, self.layer_idx = c, layer_idx
        self.hd = c.n_embd // c.n_head
        # one fused projection for q, k, v: (nh + 2 nkv) heads of hd each
        self.c_attn = nn.Linear(c.n_embd, (c.n_head + 2 * c.n_kv_head) * self.hd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.c_proj.residual = True  # marks it for GPT-2's scaled init
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x, rope, mask, cache):
        c, B, T = self.c, x.shape[0], x.shape[1]
        qk, v = self.c_attn(x).split([(c.n_head + c.n_kv_head) * self.hd, c.n_kv_head * self.hd], dim=-1)
        # q and k heads side by side (B, T, nh + nkv, hd): one norm and one rotation serve both
        qk = qk.view(B, T, c.n_head + c.n_kv_head, self.hd)
        if c.qk_norm:
            qk = F.rms_norm(qk, (self.hd,))
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.split([c.n_head, c.n_kv_head], dim=2)  # (B, T, nh, hd), (B, T, nkv, hd)
        v = v.view(B, T, c.n_kv_head, self.hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        backend = c.attn_backend
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, Tcache, hd)
            backend = "math" if backend == "math" else "sdpa"  # flex block masks are built for full sequences
        y = attend(q, k, v, mask, backend, c.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, c.n_embd)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


# ----------------------------------------------------------------------------- 3. the model


def make_norm(c):
    if c.norm == "layernorm":
        return nn.LayerNorm(c.n_embd, eps=1e-5, bias=c.bias)
    return nn.RMSNorm(c.n_embd, eps=1e-5)


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.kind = c.mlp
        # SwiGLU has three matrices: a hidden width of 8C/3 (rounded down to a multiple of 16)
        # keeps the parameter count at most that of a 4C two-matrix MLP
        hidden = 4 * c.n_embd if c.mlp != "swiglu" else 8 * c.n_embd // 3 // 16 * 16
        self.c_fc = nn.Linear(c.n_embd, hidden * (2 if c.mlp == "swiglu" else 1), bias=c.bias)
        self.c_proj = nn.Linear(hidden, c.n_embd, bias=c.bias)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, c, layer_idx):
        super().__init__()
        self.ln_1, self.attn = make_norm(c), CausalSelfAttention(c, layer_idx)
        self.ln_2, self.mlp = make_norm(c), MLP(c)
        # x0_mix: the block's input is a * x + b * x0, a blend of the residual stream and the token
        # embeddings, so every layer can reach the token's identity directly (modded-nanogpt).
        # a = 1, b = 0 at init: the plain residual stream.
        self.x0_weights = nn.Parameter(torch.tensor([1.0, 0.0])) if c.x0_mix else None

    def forward(self, x, x0, rope=None, mask=CAUSAL, cache=None):
        """x: the residual stream (B, T, C); x0: the embedded tokens (B, T, C), read with x0_mix."""
        if self.x0_weights is not None:
            x = self.x0_weights[0] * x + self.x0_weights[1] * x0
        x = x + self.attn(self.ln_1(x), rope, mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.padded_vocab, c.n_embd),
            wpe=nn.Embedding(c.block_size, c.n_embd) if c.pos == "learned" else None,
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList(Block(c, i) for i in range(c.n_layer)),
            ln_f=make_norm(c),
        ))
        # multi-token prediction: heads 2..n, one block each, beside the last block (head 1)
        self.mtp = nn.ModuleList(Block(c, c.n_layer + i) for i in range(c.mtp_heads - 1))
        self.lm_head = nn.Linear(c.n_embd, c.padded_vocab, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if c.pos == "rope":
            cos, sin = rope_tables(c)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

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

    # -- the three separable parts: trunk (tokens -> hidden), head (hidden -> logits), loss

    def trunk(self, idx, doc_ids=None, cache=None, valid=None):
        """Token ids (B, T) -> last block's output (B, T, C), before the final norm.

        doc_ids (B, T): keep attention inside documents. cache: a KVCache to read and extend.
        valid (B, Tcache + T) bool: False marks left padding (batched prompts of unequal length).
        """
        x0, rope, mask = self.inputs(idx, doc_ids, cache, valid)
        x = x0
        for block in self.transformer.h:
            x = block(x, x0, rope, mask, cache)
        if cache is not None:
            cache.length += idx.shape[1]
        return x

    def inputs(self, idx, doc_ids=None, cache=None, valid=None):
        """What every block needs: embedded tokens (B, T, C), RoPE tables, the attention mask."""
        c = self.config
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > c.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={c.block_size}")
        if valid is None:
            pos = torch.arange(start, start + T, device=idx.device).unsqueeze(0)  # (1, T)
        else:  # positions count only real tokens, so a padded prompt sees the positions an unpadded one would
            pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)[:, start:start + T]  # (B, T)
        x = self.transformer.wte(idx)  # (B, T, C)
        if c.pos == "learned":
            x = x + self.transformer.wpe(pos)
        rope = None
        if c.pos == "rope":
            rope = (self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2))  # (B|1, T, 1, hd/2)
        mask = self._mask(B, T, start, doc_ids, valid, cache, idx.device)
        return self.transformer.drop(x), rope, mask

    def multi_head_logits(self, idx, cache=None, doc_ids=None, valid=None):
        """Every head's logits at every position: a list of n tensors (B, T, V); head i's row t
        predicts token t+i. With a cache, the extra heads' blocks read and extend it too; valid
        as in trunk()."""
        x0, rope, mask = self.inputs(idx, doc_ids, cache, valid)
        x = x0
        for block in self.transformer.h[:-1]:
            x = block(x, x0, rope, mask, cache)
        out = [self.head(block(x, x0, rope, mask, cache)) for block in [self.transformer.h[-1], *self.mtp]]
        if cache is not None:
            cache.length += idx.shape[1]
        return out

    def _mask(self, B, T, start, doc_ids, valid, cache, device):
        c = self.config
        if c.attn_backend == "flex" and cache is None:
            return flex_block_mask(doc_ids, c.attn_window, B, T, device)
        if start == 0 and doc_ids is None and c.attn_window == 0 and valid is None:
            return CAUSAL
        q_idx = torch.arange(start, start + T, device=device)[:, None]  # (T, 1)
        kv_idx = torch.arange(start + T, device=device)[None, :]       # (1, Tk)
        doc_q = doc_k = None
        if doc_ids is not None:
            doc_q, doc_k = doc_ids[:, :, None], doc_ids[:, None, :]       # (B, T, 1), (B, 1, T)
        keep = mask_rule(q_idx, kv_idx, doc_q, doc_k, c.attn_window)
        if valid is not None:  # never attend to padding; a padding query attends to itself (no empty rows)
            keep = keep & (valid[:, None, :] | (q_idx == kv_idx))
        return keep.reshape(-1, 1, T, start + T)  # (B|1, 1, Tq, Tk)

    def head(self, h):
        """(B, T, C) -> logits (B, T, V) over the true vocabulary (padding columns cut off)."""
        logits = self.lm_head(self.transformer.ln_f(h))
        if self.config.logit_softcap > 0:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits[..., : self.config.vocab_size]

    def forward(self, idx, targets=None, doc_ids=None):
        """idx (B, T) -> (next-token logits (B, T, V), loss or None). Targets of -1 are ignored.
        With mtp_heads > 1 the loss is the weighted mean of every head's cross-entropy."""
        if self.config.mtp_heads == 1 or targets is None:
            logits = self.head(self.trunk(idx, doc_ids=doc_ids))
            loss = None if targets is None else cross_entropy(logits, targets)
            return logits, loss
        losses = self.head_losses(idx, targets, doc_ids)
        weights = self.mtp_weights()
        return None, sum(w * loss for w, loss in zip(weights, losses)) / sum(weights)

    # -- multi-token prediction (Gloeckle et al. 2024, "Better & Faster Large Language Models via
    #    Multi-token Prediction"): a shared trunk (all blocks but the last), n head blocks on its
    #    output (head 1 is the last block, so one head is exactly the plain model), one shared
    #    final norm and unembedding. Head i at position t predicts token t+i.

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
        from torch.utils.checkpoint import checkpoint
        x0, rope, mask = self.inputs(idx, doc_ids)
        z = x0
        for block in self.transformer.h[:-1]:  # the shared trunk
            z = block(z, x0, rope, mask)
        blocks = [self.transformer.h[-1], *self.mtp]
        losses = []
        for i, block in enumerate(blocks):
            shifted = torch.full_like(targets, -1)
            shifted[:, :targets.shape[1] - i] = targets[:, i:]

            def head_loss(z, block=block, shifted=shifted):
                return cross_entropy(self.head(block(z, x0, rope, mask)), shifted)

            if memory_efficient and torch.is_grad_enabled():
                losses.append(checkpoint(head_loss, z, use_reentrant=False))
            else:
                losses.append(head_loss(z))
        return losses

    # -- accounting

    def num_params(self, embeddings=True):
        """Parameter count (tied weights once). Without embeddings: minus the token and
        position tables, but an untied output head still counts (it is a matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.transformer.wte.weight.numel()
            if self.transformer.wpe is not None:
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM paper's
        appendix: 6 per weight of every matmul (the output head included, tied or not),
        plus 12 * n_layer * C * T for the attention scores and weighted sum at length T."""
        c = self.config
        T = seq_len or c.block_size
        blocks = [n for n, p in self.named_parameters() if p.dim() == 2 and (".h." in f".{n}" or n.startswith("mtp."))]
        matmul = sum(self.get_parameter(n).numel() for n in blocks)
        matmul += c.padded_vocab * c.n_embd * c.mtp_heads  # every head runs the unembedding
        return 6 * matmul + 12 * (c.n_layer + c.mtp_heads - 1) * c.n_embd * T

    # -- 4. generation

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                 stop_ids=(), should_stop=None, use_cache=True, generator=None):
        """Sample continuations of a batch of prompts (lists of ids, any lengths).

        Returns one list of new ids per prompt, each ending at its first stop id (included) or
        when should_stop(new_ids) says so. temperature=0 is greedy. With use_cache, the prompt
        is prefilled once and each step feeds one token through the KV cache; without, the whole
        window is recomputed every step (the slow reference, same tokens).

        The context is at most block_size tokens. A longer prompt is cropped to its last tokens
        with a warning; when the window is full, its older half is dropped and the rest
        re-prefilled (positions restart at 0, as if that text were the prompt).
        """
        c = self.config
        device = self.transformer.wte.weight.device
        limit = c.block_size
        if any(len(p) > limit - 1 for p in prompts):
            warnings.warn(f"prompt longer than block_size-1={limit - 1} tokens: keeping its last {limit - 1}")
            prompts = [p[-(limit - 1):] for p in prompts]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: give at least one token (e.g. the end-of-text id)")
        B = len(prompts)
        tokens, valid = left_pad(prompts, device)  # (B, L) window
        padded = not bool(valid.all())
        out = [[] for _ in range(B)]
        done = [False] * B
        cache = None
        for _ in range(max_new_tokens):
            if tokens.shape[1] >= limit:  # window full: keep the newer half
                tokens, valid = tokens[:, -(limit // 2):], valid[:, -(limit // 2):]
                padded, cache = not bool(valid.all()), None
            if not use_cache:
                h = self.trunk(tokens, valid=valid if padded else None)
            elif cache is None:  # prefill
                cache = KVCache(self, B, limit)
                h = self.trunk(tokens, cache=cache, valid=valid if padded else None)
            else:
                h = self.trunk(tokens[:, -1:], cache=cache, valid=valid if padded else None)
            logits = self.head(h[:, -1, :]).float()  # (B, V)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(t)
                    done[b] = t in stop_ids or (should_stop is not None and should_stop(out[b]))
            if all(done):
                break
        return out


@torch.no_grad()
def speculative_generate(model, prompts, max_new_tokens, stop_ids=(), should_stop=None):
    """Greedy self-speculative decoding with the multi-token heads (Stern et al. 2018's blockwise
    parallel decoding, as in Gloeckle et al. 2024). Returns (one list of new ids per prompt,
    accepted drafts, proposed drafts); the ids equal model.generate(..., temperature=0).

    Each round feeds every row's [token head 1 chose, drafts of heads 2..n] through the model in
    one batched, cached forward. Head 1's prediction after each fed token verifies the next
    draft; each row keeps its longest agreeing prefix plus head 1's own next token. Rows accept
    different numbers of drafts, so rejected drafts are not cut from the cache but marked
    invalid, like left padding: they are never attended to and positions skip them. When holes
    fill the cache it is compacted (valid entries gathered to the right). A row whose context
    would reach block_size finishes alone with plain generate()."""
    c, n = model.config, model.config.mtp_heads
    device = model.transformer.wte.weight.device
    prompts = [p[-(c.block_size - 1):] for p in prompts]
    B = len(prompts)
    out, done = [[] for _ in prompts], [False] * B
    accepted = proposed = 0

    def keep(b, t):  # append a token to row b's output; True when the row is finished
        out[b].append(t)
        done[b] = t in stop_ids or (should_stop is not None and should_stop(out[b])) or len(out[b]) >= max_new_tokens
        return done[b]

    tokens, valid = left_pad(prompts, device)
    cache = KVCache(model, B, c.block_size)
    heads = model.multi_head_logits(tokens, cache, valid=valid)
    last = [h[:, -1].argmax(dim=-1).tolist() for h in heads]  # n lists of B ids: one host sync per head
    feed = [[ids[b] for ids in last] for b in range(B)]  # per row: head 1's token, then the drafts
    while True:
        for b in range(B):  # the verified token of each round is always kept
            if not done[b]:
                keep(b, feed[b][0])
        if all(done):
            break
        # plain decoding never predicts from a full window (it slides first), so a round may
        # only verify from contexts of at most block_size - 1 tokens: a row that would goes plain
        context_lengths = valid.sum(dim=1).tolist()
        for b in range(B):
            if not done[b] and context_lengths[b] + n >= c.block_size:
                context = prompts[b] + out[b]  # what plain decoding holds now; a full window keeps its newer half
                context = context[-(c.block_size // 2):] if len(context) >= c.block_size else context
                then = None if should_stop is None else lambda ids, b=b: should_stop(out[b] + ids)
                out[b] += model.generate([context], max_new_tokens - len(out[b]), temperature=0,
                                         stop_ids=stop_ids, should_stop=then)[0]
                done[b] = True
        running = [b for b in range(B) if not done[b]]
        if not running:
            break
        valid[[b for b in range(B) if done[b]]] = False  # finished rows take no room when compacting
        if cache.length + n > c.block_size:
            valid = cache.compact(valid)
        start = cache.length
        fed = torch.tensor(feed, device=device)  # (B, n)
        live = torch.tensor([not d for d in done], device=device)[:, None].expand(B, n)  # finished rows: ignored
        valid = torch.cat([valid, live], dim=1)
        heads = model.multi_head_logits(fed, cache, valid=valid)
        verified, *drafts = [h.argmax(dim=-1).tolist() for h in heads]  # each (B, n); verified: head 1
        for b in running:
            k = 0  # drafts that agree with head 1
            while k < n - 1 and feed[b][k + 1] == verified[b][k]:
                k += 1
            proposed += n - 1
            accepted += k
            if any(keep(b, t) for t in feed[b][1:k + 1]):
                continue
            valid[b, start + k + 1:] = False  # rejected drafts become holes
            feed[b] = [verified[b][k]] + [d[b][k] for d in drafts]
    return out, accepted, proposed


def left_pad(prompts, device):
    """Token lists of any lengths -> (tokens (B, L) left-padded with 0, valid (B, L) bool)."""
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens[b, L - len(p):] = torch.tensor(p, device=device)
        valid[b, L - len(p):] = True
    return tokens, valid


def cross_entropy(logits, targets):
    """Mean next-token loss in float32; targets of -1 are ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


def sample_next(logits, temperature, top_k, top_p, generator=None):
    """logits (B, V) -> next ids (B,). temperature 0 = argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class KVCache:
    """Keys and values of every layer for the tokens seen so far: (layers, B, nkv, max_len, hd),
    the extra multi-token heads' blocks included. `length` is how many positions are filled;
    setting it back rolls the cache back (speculative decoding drops rejected drafts so)."""

    def __init__(self, model, batch_size, max_len):
        c = model.config
        w = model.transformer.wte.weight
        shape = (c.n_layer + c.mtp_heads - 1, batch_size, c.n_kv_head, max_len, c.n_embd // c.n_head)
        self.k = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.length = 0

    def update(self, layer, k, v):
        """Store k, v (B, nkv, T, hd) after the filled part; return everything filled so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def compact(self, valid):
        """Gather each row's valid entries (valid: (B, length) bool) to the right end, dropping
        holes; returns the new valid mask. Keys are stored after RoPE and positions count valid
        entries only, so the model sees exactly the same context afterwards."""
        counts = valid.sum(dim=1)
        L = int(counts.max())
        new_valid = torch.arange(L, device=valid.device)[None, :] >= (L - counts)[:, None]  # (B, L)
        for b in range(valid.shape[0]):
            keep = valid[b].nonzero().squeeze(1)
            self.k[:, b, :, L - len(keep):L] = self.k[:, b, :, keep].clone()
            self.v[:, b, :, L - len(keep):L] = self.v[:, b, :, keep].clone()
        self.length = L
        return new_valid


# ----------------------------------------------------------------------------- 5. GPT-2 weights

# Hugging Face's GPT-2 stores these as Conv1D weights (in, out): transposed against nn.Linear
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_state_dict(path):
    """Read a Hugging Face checkpoint folder's weights without running code from it."""
    st, binf = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st)
    if os.path.isfile(binf):
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def from_hf(path, **overrides):
    """A GPT holding the weights of a Hugging Face GPT-2 folder (config.json + weights), or of a
    GPT-2 name (gpt2, gpt2-medium, ...) downloaded from the hub when it is reachable."""
    if not os.path.isdir(path):
        path = download_hf(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json; init_from=hf:PATH needs a Hugging Face GPT-2 folder")
    hf = json.load(open(cfg_path))
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{cfg_path}: model_type {hf.get('model_type')!r}; only GPT-2 checkpoints import")
    if hf.get("activation_function", "gelu_new") != "gelu_new" or hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise ValueError(f"{cfg_path}: activation/epsilon differ from GPT-2's; cannot import exactly")
    c = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                  n_head=hf["n_head"], n_embd=hf["n_embd"], **overrides)
    model = GPT(c)
    sd = {k.removeprefix("transformer."): v for k, v in load_hf_state_dict(path).items()}
    ours = model.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
                continue  # causal-mask buffers; the head is tied to wte
            target = ours[f"transformer.{k}"]
            if k.endswith(HF_TRANSPOSED):
                v = v.t()
            if k == "wte.weight":  # our table has padding rows past the true vocabulary
                target[: v.shape[0]].copy_(v)
                target[v.shape[0]:].zero_()
            else:
                target.copy_(v)
    return model


def download_hf(name):
    if name not in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        raise FileNotFoundError(f"{name}: not a folder, nor a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:
        raise FileNotFoundError(f"cannot download {name} from the Hugging Face hub ({type(e).__name__}); "
                                f"download it elsewhere and use init_from=hf:PATH") from None


def gpt2_incompatibilities(c):
    """What in config c a transformers GPT2LMHeadModel cannot represent (empty = exportable)."""
    gpt2 = GPTConfig(vocab_size=c.vocab_size, block_size=c.block_size, n_layer=c.n_layer, n_head=c.n_head,
                     n_embd=c.n_embd, dropout=c.dropout, attn_backend=c.attn_backend, pad_vocab_to=c.pad_vocab_to,
                     zero_init_proj=c.zero_init_proj)  # initialisation only: the trained model is plain GPT-2
    return [f"{f.name}={getattr(c, f.name)!r}" for f in fields(c) if getattr(c, f.name) != getattr(gpt2, f.name)]


def export_hf(model, out_dir, tokenizer_meta=None):
    """Write a GPT-2-compatible model as a transformers GPT2LMHeadModel folder (safetensors +
    config.json, and tokenizer files for GPT-2 BPE). Other models get safetensors + our config,
    with a message saying that transformers' GPT-2 class cannot load them."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    c = model.config
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    problems = gpt2_incompatibilities(c)
    if problems:
        save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight" or not c.tie_embeddings},
                  os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "gpt_config.json"), "w") as f:
            json.dump(asdict(c), f, indent=2)
        return (f"wrote {out_dir} in this project's format: transformers' GPT-2 class cannot load this "
                f"model because it uses {', '.join(problems)}")
    hf = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue  # tied: transformers re-ties it to wte on load
        name = k.removeprefix("transformer.")
        if name == "wte.weight":
            v = v[: c.vocab_size]
        if name.endswith(HF_TRANSPOSED):
            v = v.t()
        hf[f"transformer.{name}"] = v.contiguous()
    save_file(hf, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    eot = (tokenizer_meta or {}).get("eot_id", 50256)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
              "n_head": c.n_head, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
              "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
              "initializer_range": 0.02, "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": True}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer_meta and tokenizer_meta.get("kind") == "gpt2":
        write_gpt2_tokenizer_files(out_dir)
    return f"wrote {out_dir}: loads with transformers.GPT2LMHeadModel.from_pretrained"


def write_gpt2_tokenizer_files(out_dir):
    """vocab.json + merges.txt (transformers' GPT2Tokenizer format) from tiktoken's ranks."""
    from tokenizer import GPT2_EOT_ID, load_gpt2_encoding
    enc = load_gpt2_encoding()
    ranks = enc._mergeable_ranks  # bytes -> rank; tiktoken keeps the table here
    byte_char = gpt2_byte_to_unicode()
    as_text = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731
    vocab = {as_text(tok): rank for tok, rank in ranks.items()}
    vocab["<|endoftext|>"] = GPT2_EOT_ID
    merges = [" ".join(as_text(p) for p in split_by_ranks(tok, ranks))
              for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]) if len(tok) > 1]
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "model_max_length": 1024}, f)


def split_by_ranks(token, ranks):
    """The two pieces BPE merged last to make `token`: replay BPE on its bytes using only merges
    ranked below the token's own rank."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
        if ranks.get(parts[best] + parts[best + 1], math.inf) >= limit:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def gpt2_byte_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters:
    printable latin-1 bytes map to themselves, the rest to code points from 256 upward."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# ----------------------------------------------------------------------------- 6. fine-tuning structure

class GPTClassifier(GPT):
    """The same trunk with a classification head: logits over labels from the last real token's
    hidden state (pool='last') or the mean over real tokens (pool='mean'). The LM head is unused."""

    def __init__(self, config, n_labels, pool="last"):
        super().__init__(config)
        self.pool = pool
        self.cls_head = nn.Linear(config.n_embd, n_labels)
        nn.init.normal_(self.cls_head.weight, std=0.02)
        nn.init.zeros_(self.cls_head.bias)
        if not config.tie_embeddings:
            self.lm_head.weight.requires_grad_(False)  # no gradient ever reaches it here

    def forward(self, idx, lengths, labels=None):
        """idx (B, T) right-padded, lengths (B,) -> (label logits (B, n_labels), loss or None)."""
        h = self.transformer.ln_f(self.trunk(idx))  # (B, T, C)
        if self.pool == "last":
            pooled = h[torch.arange(len(idx), device=idx.device), lengths - 1]  # (B, C)
        else:
            real = (torch.arange(idx.shape[1], device=idx.device)[None] < lengths[:, None]).unsqueeze(-1)
            pooled = (h * real).sum(1) / lengths[:, None]
        logits = self.cls_head(pooled).float()
        return logits, None if labels is None else F.cross_entropy(logits, labels)


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))), with the base weight frozen. B starts at zero,
    so training starts exactly from the base model (Hu et al. 2021, LoRA)."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.dropout = nn.Dropout(dropout)
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + self.scale * (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t())

    def merged(self):
        """A plain nn.Linear computing the same function (dropout aside): W + scale * B A."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.lora_B @ self.lora_A)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        out.residual = getattr(self.base, "residual", False)
        return out


def add_lora(model, rank, alpha, dropout, targets):
    """Wrap every nn.Linear inside the blocks whose attribute name is in targets; returns the count."""
    n = 0
    for block in model.transformer.h:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                    n += 1
    return n


def merge_lora(model):
    """Replace every LoRALinear by its merged nn.Linear, in place; returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model
