"""
Multi-token prediction (Gloeckle et al. 2024): a GPT with n heads, head i predicting the token
i places ahead (mtp_heads=n). The blocks but the last are a shared trunk; head 1 is the last
block, heads 2..n one extra block each (self.mtp), all on the trunk's output and all sharing
the final norm and the unembedding. With n = 1 this is exactly model.GPT.

The extra heads train the trunk to plan further ahead, and at inference they draft tokens
that head 1 verifies (generate.speculative_generate). val_loss is always head 1's.
"""

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from model import GPT, Block
from systems import cross_entropy


class MultiTokenGPT(GPT):
    def __init__(self, config):
        super().__init__(config)
        self.mtp = nn.ModuleList(Block(config, config.n_layer + i) for i in range(config.mtp_heads - 1))
        self.mtp.apply(self._init_weights)

    def blocks(self):
        return [*self.transformer.h, *self.mtp]

    def head_blocks(self):
        """The block of each head: the last block (head 1), then the extra heads'."""
        return [self.transformer.h[-1], *self.mtp]

    def forward(self, idx, targets=None, doc_ids=None, cache=None, valid=None):
        """Without targets: head 1's logits, as GPT.forward gives them (arguments as there). With
        targets: (None, the weighted mean of every head's loss); no logits are kept (each head's
        are freed as soon as they are scored)."""
        if targets is None:  # head 1 alone, the next-token model
            z, (x0, rope, mask) = self.trunk(idx, doc_ids, cache, valid)
            h = self.transformer.h[-1](z, x0, rope, mask, cache)  # (B, T, C)
            return self.head(h if cache is None else h[:, -1:]), None
        weights = self.mtp_weights()
        losses = self.head_losses(idx, targets, doc_ids)
        return None, sum(w * loss for w, loss in zip(weights, losses)) / sum(weights)

    def trunk(self, idx, doc_ids=None, cache=None, valid=None):
        """(z, context): z (B, T, C) the output of every block but the last, which all heads
        read; context = (x0, rope, mask), what each head block reads besides."""
        x, rope, mask = self.inputs(idx, doc_ids, cache, valid)
        z = x0 = self.transformer.drop(x)
        for block in self.transformer.h[:-1]:
            z = block(z, x0, rope, mask, cache)
        return z, (x0, rope, mask)

    def head(self, h):
        """A head block's output (B, T, C) -> logits (B, T, V), as at the end of GPT.forward."""
        logits = self.lm_head(self.transformer.ln_f(h))
        if self.config.logit_softcap > 0:
            logits = self.config.logit_softcap * torch.tanh(logits.float() / self.config.logit_softcap)
        return logits[..., :self.config.vocab_size]

    def multi_head_logits(self, idx, cache=None, doc_ids=None, valid=None):
        """Every head's logits (a list of n tensors (B, T, V)); head i's row t predicts token t+i.
        With a cache every fed position is scored (speculative decoding verifies them all)."""
        z, (x0, rope, mask) = self.trunk(idx, doc_ids, cache, valid)
        return [self.head(block(z, x0, rope, mask, cache)) for block in self.head_blocks()]

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

    def drop_mtp_heads(self):
        """Keep head 1 only: the plain next-token model (same outputs, no extra blocks), for the
        fine-tuning tasks that read head 1 alone. Saved, it loads back as a model.GPT."""
        self.mtp = nn.ModuleList()
        self.config.mtp_heads, self.config.mtp_weights = 1, ""
