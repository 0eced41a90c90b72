"""
Text generation from a GPT: a KV cache, sampling, and self-speculative decoding.

Read in order:
  1. KVCache                 keys and values of every layer for the tokens seen so far
                             (RecurrentCache: an LSTM's state, all it needs to go on;
                             cnn.ConvCache: each conv layer's last inputs)
  2. generate()              prefill the prompts once, then one token per step; the slow
                             reference (use_cache=False) recomputes the window and gives the same tokens
  3. sample_next()           temperature, top-k, top-p
  4. speculative_generate()  greedy decoding where the multi-token heads draft and head 1 verifies

Prompts of different lengths share a batch by left padding: `valid` (B, L) marks real tokens,
padding is never attended to, and positions count real tokens only, so a padded prompt gets
exactly the tokens it would get alone (tested).
"""

import warnings

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for the tokens seen so far: (layers, B, nkv, max_len, hd),
    the extra multi-token heads' blocks included. `length` is how many positions are filled.
    The buffers are made at the first update, in the dtype the keys arrive in: bf16 under bf16
    autocast, so the cache takes half the memory of float32 weights' dtype."""

    def __init__(self, model, batch_size, max_len):
        config = model.config
        layers = config.n_layer + config.mtp_heads - 1  # the extra heads' blocks cache too
        self.shape = (layers, batch_size, config.n_kv_head, max_len, config.n_embd // config.n_head)
        self.k = self.v = None
        self.start = self.length = 0  # where the current forward's tokens start; how many are filled

    def update(self, layer, k, v):
        """Store k, v (B, nkv, T, hd) after the filled part; return everything filled so far.
        Layer 0 writes first in every forward, so its update moves the cache on by T tokens."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        if layer == 0:
            self.start, self.length = self.length, self.length + k.shape[2]
        self.k[layer, :, :, self.start:self.length] = k
        self.v[layer, :, :, self.start:self.length] = v
        return self.k[layer, :, :, :self.length], self.v[layer, :, :, :self.length]

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


class RecurrentCache:
    """An LSTM's cache: its state (h, c) after the tokens seen so far (rnn.LSTMLM.forward)."""

    def __init__(self):
        self.state, self.length = None, 0

    def update(self, state, n_tokens):
        self.state, self.length = state, self.length + n_tokens


# The context window, in two rules: a prompt is cut to what a prediction may read, and a row whose
# window is full continues from its newer half, prefilled again (positions restart at 0, as if
# that text were the prompt).

def fit_context(ids, block_size):
    """The last block_size - 1 tokens of ids: what a prediction may read (room for one more)."""
    return ids[-(block_size - 1):]


def slide(ids, block_size):
    """The context decoding goes on from after ids: all of them while they fit (fewer than
    block_size), else their newer half."""
    return ids[-(block_size // 2):] if len(ids) >= block_size else ids


def left_pad(prompts, device):
    """Token lists of any lengths -> (tokens (B, L) left-padded with 0, valid (B, L) bool)."""
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        tokens[b, L - len(p):] = torch.tensor(p, device=device)
        valid[b, L - len(p):] = True
    return tokens, valid


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
             stop_ids=(), should_stop=None, use_cache=True, generator=None):
    """Sample continuations of a batch of prompts (lists of ids, any lengths).

    Returns one list of new ids per prompt, each ending at its first stop id (included) or
    when should_stop(new_ids) says so. temperature=0 is greedy. With use_cache, the prompt
    is prefilled once and each step feeds one token through the KV cache; without, the whole
    window is recomputed every step (the slow reference, same tokens).

    The context is at most block_size tokens. A longer prompt is cropped to its last tokens
    with a warning; when a row's window is full, its older half is dropped and the rest
    re-prefilled (slide). Rows slide at their own length, so each row of a batch gets the
    tokens it would get alone.
    """
    limit = model.config.block_size
    device = next(model.parameters()).device
    if any(len(p) > limit - 1 for p in prompts):
        warnings.warn(f"prompt longer than block_size-1={limit - 1} tokens: keeping its last {limit - 1}")
        prompts = [fit_context(p, limit) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: give at least one token (e.g. the end-of-text id)")
    B = len(prompts)
    tokens, valid = left_pad(prompts, device)  # (B, L) window
    padding = None if all(len(p) == tokens.shape[1] for p in prompts) else valid  # None: nothing to mask
    out = [[] for _ in range(B)]
    done = [False] * B
    cache = None
    for _ in range(max_new_tokens):
        if tokens.shape[1] >= limit:  # the longest row's window is full: every full row slides
            tokens, valid = left_pad([slide(t[v].tolist(), limit) for t, v in zip(tokens, valid)], device)
            cache = None
            padding = None if bool(valid.all()) else valid
        if not use_cache:
            logits = model(tokens, valid=padding)[0]
        elif cache is None:  # prefill
            new_cache = getattr(model, "new_cache", None)  # a model with its own kind of cache (rnn.py, cnn.py)
            cache = new_cache(B, limit) if new_cache else KVCache(model, B, limit)
            logits = model(tokens, cache=cache, valid=padding)[0]
        else:
            logits = model(tokens[:, -1:], cache=cache, valid=padding)[0]
        logits = logits[:, -1, :].float()  # (B, V)
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        padding = None if padding is None else valid
        for b, t in enumerate(next_ids.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop_ids or (should_stop is not None and should_stop(out[b]))
        if all(done):
            break
    return out


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
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token is already enough
        drop[:, 0] = False  # the likeliest token always stays (a top_p below float32's range would drop all)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def speculative_generate(model, prompts, max_new_tokens, stop_ids=(), should_stop=None):
    """Greedy self-speculative decoding with the multi-token heads (Stern et al. 2018's blockwise
    parallel decoding, as in Gloeckle et al. 2024). Returns (one list of new ids per prompt,
    accepted drafts, proposed drafts); the ids equal generate(..., temperature=0).

    Each round feeds every row's [token head 1 chose, drafts of heads 2..n] through the model in
    one batched, cached forward. Head 1's prediction after each fed token verifies the next
    draft; each row keeps its longest agreeing prefix plus head 1's own next token.

    Rows accept different numbers of drafts, so the cache is never cut back: a rejected draft's
    slot stays in the cache as a hole, marked invalid like left padding. It is never attended
    to, and positions skip it. A worked example with 3 heads, one row, the cache holding
    positions 0..9 (the prompt and earlier tokens):

        round feeds    [a, d1, d2]          a = head 1's token, d1, d2 = drafts of heads 2, 3
        cache slots     10  11  12          all three are written by the forward
        head 1 says    d1 ok, d2 wrong (it predicts e after d1)
        kept tokens     a, d1, e            e is head 1's own token after d1
        valid          slots 10, 11 valid; slot 12 (d2) becomes a hole: valid[b, 12] = False
        next round     feeds [e, d1', d2'] into slots 13..15; e's position is 12, not 13

    When holes would push the cache past block_size it is compacted: valid entries gathered to
    the right end (KVCache.compact). A row whose context would reach block_size finishes alone
    with plain generate()."""
    config, n = model.config, model.config.mtp_heads
    device = model.transformer.wte.weight.device
    prompts = [fit_context(p, config.block_size) for p in prompts]
    B = len(prompts)
    out, done = [[] for _ in prompts], [False] * B
    accepted = proposed = 0

    def keep(b, t):  # append a token to row b's output; True when the row is finished
        out[b].append(t)
        done[b] = t in stop_ids or (should_stop is not None and should_stop(out[b])) or len(out[b]) >= max_new_tokens
        return done[b]

    tokens, valid = left_pad(prompts, device)
    cache = KVCache(model, B, config.block_size)
    heads = model.multi_head_logits(tokens, cache, valid=valid)
    last = [h[:, -1].argmax(dim=-1).tolist() for h in heads]  # n lists of B ids: one host sync per head
    to_feed = [[ids[b] for ids in last] for b in range(B)]  # per row: head 1's token, then the drafts
    while True:
        for b in range(B):  # the verified token of each round is always kept
            if not done[b]:
                keep(b, to_feed[b][0])
        if all(done):
            break
        # plain decoding never predicts from a full window (it slides first), so a round may
        # only verify from contexts of at most block_size - 1 tokens: a row that would goes plain
        context_lengths = valid.sum(dim=1).tolist()
        for b in range(B):
            if not done[b] and context_lengths[b] + n >= config.block_size:
                finish_plainly(model, b, prompts[b], out, max_new_tokens, stop_ids, should_stop)
                done[b] = True
        running = [b for b in range(B) if not done[b]]
        if not running:
            break
        valid[[b for b in range(B) if done[b]]] = False  # finished rows take no room when compacting
        if cache.length + n > config.block_size:
            valid = cache.compact(valid)
        start = cache.length
        fed = torch.tensor(to_feed, device=device)  # (B, n)
        unfinished = torch.tensor([not d for d in done], device=device)[:, None].expand(B, n)
        valid = torch.cat([valid, unfinished], dim=1)  # finished rows' new slots are ignored
        heads = model.multi_head_logits(fed, cache, valid=valid)
        verified, *drafts = [h.argmax(dim=-1).tolist() for h in heads]  # each (B, n); verified: head 1
        for b in running:
            k = 0  # drafts that agree with head 1
            while k < n - 1 and to_feed[b][k + 1] == verified[b][k]:
                k += 1
            proposed += n - 1
            accepted += k
            if any(keep(b, t) for t in to_feed[b][1:k + 1]):
                continue
            valid[b, start + k + 1:] = False  # rejected drafts become holes
            to_feed[b] = [verified[b][k]] + [d[b][k] for d in drafts]
    return out, accepted, proposed


def finish_plainly(model, b, prompt, out, max_new_tokens, stop_ids, should_stop):
    """Row b's remaining tokens by plain greedy decoding, from the context plain decoding would
    hold now (a full window keeps its newer half)."""
    context = slide(prompt + out[b], model.config.block_size)
    stop_rest = None if should_stop is None else (lambda ids: should_stop(out[b] + ids))
    out[b] += generate(model, [context], max_new_tokens - len(out[b]), temperature=0, stop_ids=stop_ids,
                       should_stop=stop_rest)[0]
