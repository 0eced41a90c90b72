"""
The recurrent baseline (arch='lstm'): an LSTM language model (Hochreiter & Schmidhuber 1997;
the AWD-LSTM family of Merity et al. 2017, without its regularisers) that trains, evaluates and
samples through the same code as the transformer. It answers to what that code asks of a model:
forward(idx, targets, cache=, valid=), hidden_matrices(), parameter_depths(), num_params() and
flops_per_token().

Where a transformer attends over a window, the LSTM carries a state (h, c) from token to token.
Training windows start from a zero state, as a transformer's start with no context; sampling
keeps the state as its cache (generate.RecurrentCache), so each new token costs one step.
Shapes: B batch, T time, C = n_embd (the embedding and every layer's state), V vocabulary.
"""

import torch
import torch.nn as nn

from generate import RecurrentCache
from systems import cross_entropy

# what arch='lstm' has no use for: set to anything but its default, it is an error, not ignored
TRANSFORMER_ONLY = ("n_kv_head", "norm", "norm_position", "type_vocab_size", "pos", "mlp", "qk_norm", "logit_softcap",
                    "zero_init_proj", "mtp_heads", "mtp_weights", "attn_window", "x0_mix")


class LSTMLM(nn.Module):
    """Token ids -> embeddings -> n_layer LSTM layers of width C -> logits."""

    def __init__(self, config):
        super().__init__()
        wrong = config.changed(TRANSFORMER_ONLY)
        if wrong:
            raise ValueError(f"arch='lstm' has no attention, MLP or extra heads: {', '.join(wrong)} does not apply")
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.padded_vocab, C)
        self.drop = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(C, C, num_layers=config.n_layer, bias=config.bias, batch_first=True,
                            dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.lm_head = nn.Linear(C, config.padded_vocab, bias=False)
        if config.tie_embeddings:  # tying helps LSTM LMs too (Press & Wolf 2017)
            self.lm_head.weight = self.wte.weight
        nn.init.normal_(self.wte.weight, std=0.02)
        if not config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        # (nn.LSTM keeps its own init: uniform in +-1/sqrt(C))

    @property
    def device(self):
        return self.wte.weight.device

    def forward(self, idx, targets=None, doc_ids=None, cache=None, valid=None):
        """idx (B, T) -> (next-token logits (B, T, V), loss or None); targets of -1 are ignored.
        cache: a generate.RecurrentCache whose state (h, c), each (n_layer, B, C), is read and
        replaced. valid (B, cached + T) bool: False marks left padding, which must not reach the
        state, so rows with padding run one at a time from their first real token."""
        if doc_ids is not None:
            raise ValueError("doc_mask needs attention: arch='lstm' carries its state across documents")
        state = cache.state if cache is not None else None
        x = self.drop(self.wte(idx))  # (B, T, C)
        T = idx.shape[1]
        if valid is None or bool(valid[:, -T:].all()):
            out, state = self.lstm(x, state)
        else:
            out, states = torch.zeros_like(x), []
            for b in range(len(idx)):
                real = valid[b, -T:]
                row_state = None if state is None else tuple(s[:, b:b + 1].contiguous() for s in state)
                out[b:b + 1, real], row_state = self.lstm(x[b:b + 1, real], row_state)
                states.append(row_state)
            state = tuple(torch.cat([s[i] for s in states], dim=1) for i in range(2))
        if cache is not None:
            cache.update(state, T)
        logits = self.lm_head(self.drop(out))[..., : self.config.vocab_size]  # (B, T, V)
        return logits, None if targets is None else cross_entropy(logits, targets)

    def new_cache(self, batch_size, max_len):
        return RecurrentCache()

    def hidden_matrices(self):
        """The LSTM's input and recurrent weight matrices, what Muon may train."""
        return [p for name, p in self.lstm.named_parameters() if name.startswith("weight_")]

    def parameter_depths(self):
        """{name: depth}: layer k's weights -> k, the embedding -> -1, the output head -> n_layer."""
        depth = {}
        for name, _ in self.named_parameters():
            if name.startswith("lstm."):
                depth[name] = int(name.rsplit("_l", 1)[1])
            else:
                depth[name] = -1 if name.startswith("wte.") else self.config.n_layer
        return depth

    def num_params(self, embeddings=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if not embeddings else n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6 per weight of every matmul (the LSTM's gates and the
        unembedding); nothing grows with the context, unlike attention."""
        matmul = sum(p.numel() for p in self.hidden_matrices()) + self.config.padded_vocab * self.config.n_embd
        return 6 * matmul
