"""
What did a model memorise? Canaries and their exposure (Carlini et al. 2019, "The Secret Sharer").

    python prepare/shakespeare.py --tokenizer=char --data_dir=data/canaries --canaries=4 --canary_repeats=1,4,16,64
    python train.py configs/shakespeare_char_cpu.py --data_dir=data/canaries --out_dir=out/canaries
    python evaluate.py --out_dir=out/canaries --eval_task=exposure

Preparing with canaries=N writes, for each repeat count K in canary_repeats, N random secrets of
one format into the training split only ("my code is 3 1 4 1 5 9"), each as its own document K
times, at seeded random places among the other documents. meta.json records them (so a dataset
with canaries is a test fixture: never ship one). Deduplication (dedup=True, the default) runs
after they are inserted, so it keeps one copy of each: the comparison that shows what it buys.

Exposure asks how much likelier the model finds a secret than every other secret of the format:

    exposure = log2 |R| - log2 rank

R is every possible secret (10^6 of them) and rank the secret's place when R is sorted by the
model's loss on it (1 = likeliest). A model that never saw the secret places it anywhere: about
1.4 bits on average (log2 |R| - E[log2 of a uniform rank]). One that memorised it places it
first: log2 10^6 = 19.9 bits, the most there is. The rank comes from exposure_samples random
candidates (all of R when that many or more): the share with a lower loss, times |R|; when none
is lower, from a normal fitted to the candidates' losses (the paper's extrapolation, with a
normal where it fits a skew-normal), so a memorised secret reads near 19.9 and not just
"more than log2 exposure_samples".
"""

import math
import random

import numpy as np
import torch

from data import DataError
from errors import ConfigError
from scoring import token_logprobs

PREFIX = "my code is"
DIGITS = 6                # a secret is DIGITS digits, written apart: "3 1 4 1 5 9"
SPACE = 10 ** DIGITS      # |R|
MAX_SHARE = 0.1           # the canaries' copies may be at most this share of the training split's characters


# ----------------------------------------------------------------------------- preparing

def repeat_counts(cfg):
    """canary_repeats '1,4,16' -> [1, 4, 16]."""
    counts = [int(k) for k in cfg.canary_repeats.split(",")]
    if len(set(counts)) != len(counts):
        raise ConfigError(f"canary_repeats={cfg.canary_repeats}: each repeat count once")
    return counts


def canary_text(secret):
    """'3 1 4 1 5 9' -> the document a canary is: 'my code is 3 1 4 1 5 9'."""
    return f"{PREFIX} {secret}"


def secret_text(value):
    """123456 -> '1 2 3 4 5 6'."""
    return " ".join(f"{value:0{DIGITS}d}")


def plan_canaries(cfg):
    """[(secret, K)] for cfg.canaries per repeat count, distinct, drawn with cfg.seed; [] when off."""
    if not cfg.canaries:
        return []
    counts = repeat_counts(cfg)
    values = random.Random(cfg.seed).sample(range(SPACE), cfg.canaries * len(counts))
    return [(secret_text(v), counts[i // cfg.canaries]) for i, v in enumerate(values)]


def canary_copies(canaries, seed):
    """Every copy of every canary as (place in [0, 1), name, text), in order of place: where among
    the training documents it goes (0 = before the first, 1 = after the last)."""
    rng = random.Random(seed + 1)
    copies = [(rng.random(), f"canary {i} copy {j}", canary_text(secret))
              for i, (secret, repeats) in enumerate(canaries) for j in range(repeats)]
    return sorted(copies)


def check_room(cfg, canaries, train_characters):
    """A DataError when the copies would be too large a share of the training split."""
    size = sum(repeats * len(canary_text(secret)) for secret, repeats in canaries)
    if size > MAX_SHARE * train_characters:
        raise DataError(f"canaries={cfg.canaries} x canary_repeats={cfg.canary_repeats}: their {size:,} characters "
                        f"would be {size / max(train_characters, 1):.0%} of the training split "
                        f"({train_characters:,}); at most {MAX_SHARE:.0%}: use fewer canaries or repeats, or more data")


class CanaryFeed:
    """The copies due as a training split is written: due(n) gives those whose place falls at or
    before n of the split's `expected` units (documents, or characters of a stream) and not given
    yet; due() all the rest."""

    def __init__(self, copies, expected):
        self.copies, self.expected, self.given = copies, expected, 0

    def due(self, done=math.inf):
        start = self.given
        while self.given < len(self.copies) and self.copies[self.given][0] * self.expected <= done:
            self.given += 1
        return [copy[1:] for copy in self.copies[start:self.given]]


def with_canaries(documents, copies):
    """The training split's [(name, text)] with each copy inserted at its place."""
    feed, out = CanaryFeed(copies, len(documents)), []
    for i, document in enumerate(documents):
        out += feed.due(i) + [document]
    return out + feed.due()


def canary_record(cfg, canaries, kept):
    """meta.json's record: what was asked, the format, and each secret with its repeats and the
    copies written (fewer than its repeats when deduplication dropped some). kept: {text: copies}."""
    return {"per_count": cfg.canaries, "repeats": cfg.canary_repeats, "prefix": PREFIX, "digits": DIGITS,
            "canaries": [{"secret": s, "repeats": k, "copies": kept.get(canary_text(s), 0)} for s, k in canaries]}


# ----------------------------------------------------------------------------- exposure

@torch.no_grad()
def sequence_losses(model, tok, texts, device):
    """The loss (nats, summed over tokens) of each text as a whole document after end-of-text,
    in batches of texts with the same number of tokens."""
    ids = [[tok.eot_id] + tok.encode(t) for t in texts]
    losses = np.zeros(len(texts))
    by_length = {}
    for i, seq in enumerate(ids):
        by_length.setdefault(len(seq), []).append(i)
    vocab = model.config.vocab_size
    for length, members in by_length.items():
        if length - 1 > model.config.block_size:
            raise ConfigError(f"a canary is {length - 1} tokens, longer than the model's block_size "
                              f"{model.config.block_size}")
        rows = max(1, (1 << 24) // (length * vocab))  # logits of at most 2^24 floats at a time
        for start in range(0, len(members), rows):
            chunk = members[start:start + rows]
            t = torch.tensor([ids[i] for i in chunk], device=device)  # (B, L)
            logp = token_logprobs(model, t[:, :-1], t[:, 1:]).sum(1)  # (B,)
            losses[chunk] = -logp.double().cpu().numpy()
    return losses


def candidate_secrets(record, samples, seed):
    """The secrets that a canary's rank is measured against: all of R, or `samples` drawn at random
    (with replacement, none of them a canary)."""
    if samples >= SPACE:
        return [secret_text(v) for v in range(SPACE)], True
    taken = {int(c["secret"].replace(" ", "")) for c in record["canaries"]}
    values = np.random.default_rng(seed).integers(0, SPACE, 2 * samples + len(taken))
    return [secret_text(int(v)) for v in values if int(v) not in taken][:samples], False


def rank_of(loss, candidate_losses, exact):
    """(rank among R, how it was found) of a secret with this loss."""
    lower = int((candidate_losses < loss).sum())
    if exact:
        return 1 + lower, "exact"
    if lower:
        return 1 + (SPACE - 1) * lower / len(candidate_losses), "sampled"
    mean, sd = candidate_losses.mean(), max(candidate_losses.std(), 1e-12)
    below = 0.5 * math.erfc((mean - loss) / (sd * math.sqrt(2)))  # P(a candidate's loss < this one)
    return 1 + (SPACE - 1) * below, "extrapolated"


def exposures(model, tok, record, samples, seed, device):
    """Each canary's loss, rank and exposure, and their summary per repeat count."""
    candidates, exact = candidate_secrets(record, samples, seed)
    candidate_losses = sequence_losses(model, tok, [canary_text(c) for c in candidates], device)
    losses = sequence_losses(model, tok, [canary_text(c["secret"]) for c in record["canaries"]], device)
    rows = []
    for canary, loss in zip(record["canaries"], losses):
        rank, how = rank_of(loss, candidate_losses, exact)
        rows.append({**canary, "loss": float(loss), "rank": float(rank),
                     "exposure": math.log2(SPACE) - math.log2(rank), "estimate": how})
    by_repeats = {}
    for k in sorted({r["repeats"] for r in rows}):
        group = [r for r in rows if r["repeats"] == k]
        values = [r["exposure"] for r in group]
        by_repeats[f"K={k}"] = {"canaries": len(group), "copies_in_data": float(np.mean([r["copies"] for r in group])),
                                "mean_exposure": float(np.mean(values)), "min_exposure": min(values),
                                "max_exposure": max(values)}
    return {"max_possible": math.log2(SPACE), "candidates": len(candidates), "by_repeats": by_repeats,
            "canaries": rows}


def print_exposures(result):
    print(f"exposure (bits; at most {result['max_possible']:.1f}) against {result['candidates']:,} candidates")
    print(f"{'repeats':>8} {'copies':>7} {'mean':>6} {'min':>6} {'max':>6}")
    for k, g in result["by_repeats"].items():
        print(f"{k[2:]:>8} {g['copies_in_data']:>7.1f} {g['mean_exposure']:>6.2f} {g['min_exposure']:>6.2f} "
              f"{g['max_exposure']:>6.2f}")
