"""
What fine-tuning adds to a trained GPT: a classification head on its trunk, and LoRA adapters.

    classifier()        the same trunk, logits over labels instead of over the vocabulary
    LoRALinear          y = W x + (alpha / r) B A x with W frozen (Hu et al. 2021)
    add_lora, merge_lora  wrap the blocks' linear layers; fold trained adapters back into W
    lora_disabled       the base model back for a moment: a LoRA run's frozen reference (dpo, rl)
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnn import GatedConvLM
from encoder import BertGPT, uses_bert_extras
from model import GPT, Block


class Classifier:
    """The same trunk with a classification head: logits over labels from the last real token's
    hidden state (pool='last'), the mean over real tokens (pool='mean'), or BERT's pooler, a
    dense layer and tanh on the first token (pool='first': in an encoder it sees every token).
    The LM head is unused. An encoder's padding is masked out of attention. Mixed into the
    trunk's class: GPTClassifier, BertClassifier (classifier() picks)."""

    def __init__(self, config, n_labels, pool="last"):
        super().__init__(config)
        self.pool = pool
        self.pooler = nn.Linear(config.n_embd, config.n_embd) if pool == "first" else None
        self.cls_head = nn.Linear(config.n_embd, n_labels)
        for head in (self.cls_head, self.pooler):
            if head is not None:
                nn.init.normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)
        # no gradient ever reaches the LM head here (DDP would wait for one)
        transform = getattr(self, "mlm_transform", None)
        unused = [*(transform.parameters() if transform is not None else ()), self.lm_head.bias]
        if not config.tie_embeddings:
            unused.append(self.lm_head.weight)
        for p in unused:
            if p is not None:
                p.requires_grad_(False)

    def forward(self, idx, lengths, labels=None):
        """idx (B, T) right-padded, lengths (B,) -> (label logits (B, n_labels), loss or None)."""
        real = torch.arange(idx.shape[1], device=idx.device)[None] < lengths[:, None]  # (B, T)
        # a decoder's real tokens never see the right padding; an encoder's would, unless masked
        x, rope, mask = self.inputs(idx, valid=None if self.causal else real)
        x = x0 = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, x0, rope, mask, None)
        h = self.transformer.ln_f(x)  # (B, T, C)
        if self.pool == "last":
            pooled = h[torch.arange(len(idx), device=idx.device), lengths - 1]  # (B, C)
        elif self.pool == "first":
            pooled = torch.tanh(self.pooler(h[:, 0]))
        else:
            pooled = (h * real.unsqueeze(-1)).sum(1) / lengths[:, None]
        logits = self.cls_head(pooled).float()
        return logits, None if labels is None else F.cross_entropy(logits, labels)


class GPTClassifier(Classifier, GPT):
    pass


class BertClassifier(Classifier, BertGPT):
    pass


class CNNClassifier(Classifier, GatedConvLM):
    pass


def classifier(config, n_labels, pool="last"):
    """A classifier on the trunk config describes (see Classifier)."""
    if config.arch == "cnn":
        return CNNClassifier(config, n_labels, pool)
    return (BertClassifier if uses_bert_extras(config) else GPTClassifier)(config, n_labels, pool)


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))), with the base weight frozen. B starts at zero,
    so training starts exactly from the base model (Hu et al. 2021, LoRA)."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, device=w.device, dtype=w.dtype)
                                   / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(dropout)
        self.enabled = True
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        return self.base(x) + self.scale * (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t())

    def merged(self):
        """A plain nn.Linear computing the same function (dropout aside): W + scale * B A, on the
        base's device and in its dtype."""
        w = self.base.weight
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w + self.scale * self.lora_B @ self.lora_A)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        out.residual = getattr(self.base, "residual", False)
        return out


def add_lora(model, rank, alpha, dropout, targets):
    """Wrap every nn.Linear inside the blocks (the extra multi-token heads' too: their losses
    train with the rest) whose attribute name is in targets; returns the count."""
    n = 0
    for block in [m for m in model.modules() if isinstance(m, Block)]:
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


@contextlib.contextmanager
def lora_disabled(model):
    """Inside this block the model computes its frozen base weights' function: with LoRA the
    starting model is still there, so preference tuning and RL need no second copy as reference."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
