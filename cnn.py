"""
The convolutional language model (arch='cnn'): a gated convolutional network (Dauphin et al.
2017, "Language Modeling with Gated Convolutional Networks"). It is the GPT of model.py with
each block's attention and MLP replaced by one causal convolution and a gated linear unit, so
it trains, evaluates, samples, checkpoints and shards (DDP, FSDP) through the same code.

One block, pre-norm like the GPT's:
    h = norm(x)                                    (B, T, C)
    a = causal_conv(h)                             (B, T, 2C): conv_kernel taps, dilated
    x = x + proj(a[..., :C] * sigmoid(a[..., C:]))  the GLU: half the channels gate the other half

Causal: position t reads h[t], h[t-d], ..., h[t-(k-1)d] (k = conv_kernel, d the layer's
dilation); the sequence is padded with zeros on the left only, so t never sees t+1. Dilations
grow by conv_dilation from layer to layer until the receptive field (how many tokens the last
position can read) covers block_size, then start again at 1 (WaveNet's repeated stacks):
    receptive field = 1 + (k - 1) * sum of the layers' dilations     (receptive_fields())
There are no position embeddings: a convolution knows relative order by construction.

Sampling keeps a cache (ConvCache): each layer's last (k-1)d conv inputs. A new token then
costs one step per layer, as with the KV cache, and the cache stays a fixed size whatever the
length; recomputing the window instead would cost the whole window per token. The two give
the same tokens (tested).

The conv's weights are stored as one (2C, k C) matrix, the k taps side by side: a causal
convolution is a linear map of the k past positions read together, so Muon and the FLOP count
see it as the matmul it is. Shapes: B batch, T time, C = n_embd, k = conv_kernel.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, make_norm

# what arch='cnn' has no use for: set to anything but its default, it is an error, not ignored
ATTENTION_ONLY = ("n_kv_head", "norm_position", "type_vocab_size", "pos", "mlp", "qk_norm", "mtp_heads",
                  "mtp_weights", "attn_window", "x0_mix")


def dilations(config):
    """Each layer's dilation (see the module's docstring)."""
    out, field, d = [], 1, 1
    for _ in range(config.n_layer):
        out.append(d)
        field += (config.conv_kernel - 1) * d
        d = 1 if field >= config.block_size else d * config.conv_dilation
    return out


def receptive_fields(config):
    """How many tokens (itself included) a position can read after each layer."""
    fields_, field = [], 1
    for d in dilations(config):
        field += (config.conv_kernel - 1) * d
        fields_.append(field)
    return fields_


class ConvCache:
    """arch='cnn''s cache for sampling: every layer's last (k-1)d conv inputs (B, span, C), zeros
    before the first token (what the training-time padding holds). `length`: tokens seen."""

    def __init__(self):
        self.past, self.length = {}, 0

    def update(self, layer, h, span):
        """h (B, T, C): the layer's new conv inputs -> (B, span + T, C), what its conv reads."""
        if layer == 0:
            self.length += h.shape[1]
        past = self.past.get(layer)
        if past is None:
            past = h.new_zeros(h.shape[0], span, h.shape[2])
        window = torch.cat([past, h], dim=1)
        self.past[layer] = window[:, -span:]
        return window


class ConvBlock(nn.Module):
    def __init__(self, config, layer_idx, dilation):
        super().__init__()
        C, k = config.n_embd, config.conv_kernel
        self.layer_idx, self.kernel, self.dilation = layer_idx, k, dilation
        self.ln = make_norm(config)
        self.conv = nn.Linear(k * C, 2 * C, bias=config.bias)  # tap j's (2C, C) matrix at columns j*C..(j+1)*C
        self.proj = nn.Linear(C, C, bias=config.bias)
        self.proj.residual = True  # (GPT._init_weights scales it down with depth)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, x0, rope=None, valid=None, cache=None):
        """x (B, T, C) -> (B, T, C). valid (B, T) bool or None: False marks left padding, whose
        conv inputs are zeroed so a padded row reads what the zero padding gives an unpadded one.
        (x0 and rope: the GPT block's arguments, unused here.)"""
        B, T, C = x.shape
        h = self.ln(x)
        if valid is not None:
            h = h * valid[..., None]
        span = (self.kernel - 1) * self.dilation
        if cache is None:
            h = F.pad(h, (0, 0, span, 0))  # (B, span + T, C): zeros on the left only
        else:
            h = cache.update(self.layer_idx, h, span)
        kernel = self.conv.weight.view(2 * C, self.kernel, C).transpose(1, 2)  # (2C, C, k) as conv1d wants it
        a = F.conv1d(h.transpose(1, 2), kernel, self.conv.bias, dilation=self.dilation)  # (B, 2C, T)
        gated = F.glu(a.transpose(1, 2), dim=-1)  # (B, T, C): a[..., :C] * sigmoid(a[..., C:])
        return x + self.dropout(self.proj(gated))


class GatedConvLM(GPT):
    """Token ids -> embeddings -> n_layer gated conv blocks -> final norm -> logits: GPT.forward."""

    def __init__(self, config):
        wrong = config.changed(ATTENTION_ONLY)
        if wrong:
            raise ValueError(f"arch='cnn' has no attention, MLP, positions or extra heads: {', '.join(wrong)} "
                             f"does not apply")
        self.dilations = dilations(config)
        super().__init__(config)
        self.transformer.wpe = None  # no positions: the convolutions see relative order

    def make_block(self, config, layer_idx):
        return ConvBlock(config, layer_idx, self.dilations[layer_idx])

    def inputs(self, idx, doc_ids=None, cache=None, valid=None):
        """What every block reads: the embedded tokens (B, T, C), no RoPE, and in the attention
        mask's place the padding of the new tokens (B, T) or None."""
        if doc_ids is not None:
            raise ValueError("doc_mask needs attention: arch='cnn' reads across documents")
        start = cache.length if cache is not None else 0
        if start + idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of {start + idx.shape[1]} tokens exceeds block_size={self.config.block_size}")
        return self.transformer.wte(idx), None, None if valid is None else valid[:, -idx.shape[1]:]

    def new_cache(self, batch_size, max_len):
        return ConvCache()

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6 per weight of every matmul (the taps of every conv, the
        projections, the unembedding); nothing grows with the context, unlike attention."""
        matmul = sum(p.numel() for p in self.hidden_matrices()) + self.config.padded_vocab * self.config.n_embd
        return 6 * matmul
