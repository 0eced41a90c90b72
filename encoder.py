"""
BERT's extras on model.GPT, one config key each: post-norm blocks (norm_position='post'),
token-type embeddings (type_vocab_size), and with arch='bert' the encoder itself (Devlin et al.
2019): every position attends to every other, and the logits at a position predict the token
there, which the input hid behind the mask token (masked language modelling; scoring.mask_tokens
masks the batches). Its head is BERT's: a dense layer, GELU and a norm before the unembedding,
which has a bias. hf.py reads and writes BertForMaskedLM folders of it.
"""

import torch.nn as nn
import torch.nn.functional as F

from model import GPT, Block, make_norm


def uses_bert_extras(config):
    """Whether config asks for any of this file's extras (else model.GPT is the whole model)."""
    return config.arch == "bert" or config.norm_position == "post" or config.type_vocab_size > 0


class PostNormBlock(Block):
    """The original transformer's and BERT's order: normalise the residual sum, not the branch input."""

    def forward(self, x, x0, rope=None, mask=None, cache=None):
        if self.x0_weights is not None:
            x = self.x0_weights[0] * x + self.x0_weights[1] * x0
        x = self.ln_1(x + self.attn(x, rope, mask, cache))
        return self.ln_2(x + self.mlp(x))


class MLMTransform(nn.Module):
    """BERT's output transform before the unembedding: dense, GELU, norm. (B, T, C) -> (B, T, C)."""

    def __init__(self, config):
        super().__init__()
        self.dense, self.norm = nn.Linear(config.n_embd, config.n_embd, bias=config.bias), make_norm(config)

    def forward(self, h):
        return self.norm(F.gelu(self.dense(h)))


class BertGPT(GPT):
    """model.GPT with BERT's extras, as its config asks. Post-norm normalises after each residual
    sum and the embeddings once (ln_e), so there is no final norm (ln_f is the identity)."""

    def __init__(self, config):
        super().__init__(config)
        self.causal = config.arch != "bert"
        if config.norm_position == "post":
            self.transformer.ln_e, self.transformer.ln_f = make_norm(config), nn.Identity()
        if config.type_vocab_size:
            self.transformer.wtt = nn.Embedding(config.type_vocab_size, config.n_embd)
            nn.init.normal_(self.transformer.wtt.weight, std=0.02)
        self.mlm_transform = None
        if config.arch == "bert":
            self.mlm_transform = MLMTransform(config)
            self.mlm_transform.apply(self._init_weights)
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab, bias=True)
            nn.init.zeros_(self.lm_head.bias)
            if config.tie_embeddings:
                self.lm_head.weight = self.transformer.wte.weight
            else:
                self._init_weights(self.lm_head)
            # GPT.forward runs lm_head(ln_f(x)); BERT's transform goes in between
            self.lm_head.register_forward_pre_hook(self._transform_before_unembedding)

    def _transform_before_unembedding(self, lm_head, args):
        return (self.mlm_transform(args[0]),)

    def make_block(self, config, layer_idx):
        return PostNormBlock(config, layer_idx) if config.norm_position == "post" else Block(config, layer_idx)

    def inputs(self, idx, doc_ids=None, cache=None, valid=None):
        x, rope, mask = super().inputs(idx, doc_ids, cache, valid)
        if "wtt" in self.transformer:  # every token is segment A: no task here pairs two texts
            x = x + self.transformer.wtt.weight[0]
        if "ln_e" in self.transformer:
            x = self.transformer.ln_e(x)
        return x, rope, mask

    def embeddings(self):
        return [*super().embeddings(), *(self.transformer[n] for n in ("wtt", "ln_e") if n in self.transformer)]

    def flops_per_token(self, seq_len=None):
        extra = self.mlm_transform.dense.weight.numel() if self.mlm_transform is not None else 0
        return super().flops_per_token(seq_len) + 6 * extra
