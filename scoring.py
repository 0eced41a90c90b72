"""
What fine-tuning and evaluation share about tasks: reading task files, showing a prompt to the
model, scoring text under the model, and classification metrics.

    read_jsonl, task_path     JSONL task files, with errors that name the line
    prompt_ids                a prompt as the model reads it, in training and evaluation alike
    scoring_windows           how a text longer than the context is scored: overlapping windows
    score_tokens, lm_metrics, continuation_score
                              log-likelihood of tokens given what comes before them
    mask_tokens, mlm_metrics  an encoder's objective: hide tokens, score how well it fills them in
    token_logprobs, dpo_loss, group_advantages, reward_function
                              post-training: preference pairs (DPO) and rewards (RL)
    bootstrap_interval        a confidence interval for a mean (the bias probe)
    classification_report     accuracy, per-class and macro precision / recall / F1, confusion
"""


import numpy as np
import torch
import torch.nn.functional as F

from data import DataError

# ----------------------------------------------------------------------------- scoring text


def scoring_windows(n, first, block_size, stride):
    """Windows (begin, end, j0) that score the targets ids[first .. n-1] of a sequence of n ids
    exactly once: a window reads ids[begin:end] and predicts ids[begin+1 : end+1]; its positions
    from j0 on are scored (earlier ones were scored by the previous window).

    Windows advance by stride, so every target after the first window keeps at least
    block_size - stride tokens of context. The first window starts as late as it can while
    still giving target `first` that much context, or ends at the last target when everything
    from there fits in one window (a short continuation gets the longest context)."""
    begin = max(0, min(first - 1 - (block_size - stride), n - 1 - block_size))
    windows, scored_until = [], first - 1  # targets up to scored_until are done
    while True:
        end = min(begin + block_size, n - 1)
        windows.append((begin, end, scored_until - begin))
        scored_until = end
        if end == n - 1:
            return windows
        begin += stride


@torch.no_grad()
def score_tokens(model, ids, first, stride, batch_size, device, heads=1, progress=False):
    """Log-likelihood of ids[first:] (a 1-D int array), each token given what precedes it, over
    scoring_windows. Returns (total nats per head, tokens scored per head, whether head 1's
    argmax equals every scored token). With heads > 1, head h (1-based) at each scored
    position predicts the token h steps ahead where the window holds it."""
    from tqdm import tqdm
    n = len(ids)
    if n < 2 or not 1 <= first < n:
        raise DataError("fewer than 2 tokens: nothing to score")
    block_size = model.config.block_size
    windows = scoring_windows(n, first, block_size, min(stride, block_size))
    totals, counts, greedy = [0.0] * heads, [0] * heads, True
    for i in tqdm(range(0, len(windows), batch_size), desc="scoring", unit="batch", disable=not progress):
        batch = windows[i:i + batch_size]
        width = max(end - begin for begin, end, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.full((len(batch), width), -1, dtype=torch.long)  # -1: not scored in this window
        for row, (begin, end, j0) in enumerate(batch):
            chunk = torch.as_tensor(ids[begin:end + 1].astype("int64"))
            x[row, :end - begin] = chunk[:-1]
            y[row, j0:end - begin] = chunk[1 + j0:]
        x, y = x.to(device), y.to(device)
        all_logits = model.multi_head_logits(x)[:heads] if heads > 1 else [model(x)[0]]
        for h, logits in enumerate(all_logits):
            target = y
            if h:  # head h+1 at a scored position t predicts y[t + h]
                target = torch.full_like(y, -1)
                target[:, :-h] = torch.where(y[:, :-h] >= 0, y[:, h:], -1)
            totals[h] += F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-1,
                                         reduction="sum").item()
            counts[h] += int((target >= 0).sum())
            if h == 0:
                scored = y >= 0
                greedy = greedy and bool((logits.argmax(dim=-1)[scored] == y[scored]).all())
    assert counts[0] == n - first, "every token is scored exactly once"
    return totals, counts, greedy


def lm_metrics(model, ids, stride, batch_size, device, progress=True):
    """(total nats, tokens scored, mean loss of each multi-token head or []) of ids[1:] given
    everything before: the language-modelling score of a whole split or document."""
    heads = getattr(model.config, "mtp_heads", 1)
    totals, counts, _ = score_tokens(model, ids, 1, stride, batch_size, device, heads, progress)
    return totals[0], counts[0], ([t / c for t, c in zip(totals, counts)] if heads > 1 else [])


def continuation_score(model, context, continuation, device):
    """(log p(continuation | context) summed over its tokens, whether greedy decoding would
    produce exactly this continuation). A context longer than the window is cropped on the
    left; a continuation longer than the window is scored in overlapping windows."""
    ids = np.array(context + continuation, dtype=np.int64)
    block_size = model.config.block_size
    totals, _, greedy = score_tokens(model, ids, len(context), max(1, block_size // 2), 8, device)
    return -totals[0], greedy


def sequence_logprob(model, context, continuation, device):
    return continuation_score(model, context, continuation, device)[0]


def pair_gaps(model, tok, pairs, device):
    """Counterfactual pairs [{"a", "b", ...}] -> log p(a) - log p(b) of each (numpy, nats): each
    sentence scored whole after end-of-text, where a document starts; a sentence shared by
    several pairs once."""
    logp, gaps = {}, []
    for r in pairs:
        for text in (r["a"], r["b"]):
            if text not in logp:
                logp[text] = sequence_logprob(model, [tok.eot_id], tok.encode(text), device)
        gaps.append(logp[r["a"]] - logp[r["b"]])
    return np.array(gaps)


# ----------------------------------------------------------------------------- masked language modelling


def mask_tokens(x, mask_id, vocab_size, eot_id, prob=0.15, generator=None):
    """RoBERTa's dynamic masking (Liu et al. 2019), drawn afresh for every batch. x (B, T): token
    ids below vocab_size (the model's). Each token but end-of-text (a document boundary, like
    BERT's special tokens) is chosen with probability prob; a chosen token is shown as mask_id 80%
    of the time, as a random token 10% (never the mask), and unchanged 10%, so the model cannot
    rely on seeing the mask. Returns (inputs (B, T), targets (B, T): the original token where
    chosen, -1 elsewhere). generator: a fixed masking for evaluation (a CPU torch.Generator);
    None draws from the global RNG on x's device, which checkpoints save, so a resumed run masks
    alike."""
    device = x.device if generator is None else "cpu"
    roll = torch.rand((3, *x.shape), generator=generator, device=device).to(x.device)  # (3, B, T)
    chosen = (roll[0] < prob) & (x != eot_id)
    random_ids = torch.randint(vocab_size - 1, x.shape, generator=generator, device=device).to(x.device)
    random_ids = random_ids + (random_ids >= mask_id).long()  # any id but the mask's
    inputs = torch.where(chosen & (roll[1] < 0.8), mask_id, x)
    inputs = torch.where(chosen & (roll[1] >= 0.8) & (roll[2] < 0.5), random_ids, inputs)
    return inputs, torch.where(chosen, x, -1)


@torch.no_grad()
def mlm_metrics(model, ids, mask_id, eot_id, prob, batch_size, seed, device):
    """An encoder's score on a token split (ids: anything sliced to numpy arrays): mean
    cross-entropy over masked positions and the share of them it predicts exactly (masked-token
    accuracy), over consecutive windows of block_size tokens with a masking fixed by seed.
    Perplexity does not apply: an encoder is not a probability model of text (each prediction
    sees the rest of the window)."""
    T = min(model.config.block_size, len(ids))
    windows = len(ids) // T
    gen = torch.Generator().manual_seed(seed)
    total, correct, count = 0.0, 0, 0
    for i in range(0, windows, batch_size):
        chunk = ids[i * T:min(i + batch_size, windows) * T]  # (read a batch at a time: a split may be large)
        x, y = mask_tokens(torch.as_tensor(chunk.astype("int64")).view(-1, T), mask_id, model.config.vocab_size,
                           eot_id, prob, gen)
        logits = model(x.to(device))[0].float()
        y = y.to(device)
        scored = y >= 0
        total += F.cross_entropy(logits[scored], y[scored], reduction="sum").item()
        correct += int((logits.argmax(dim=-1)[scored] == y[scored]).sum())
        count += int(scored.sum())
    if not count:
        raise DataError("no token was masked: the split is too short to score")
    return {"mlm_loss": total / count, "masked_accuracy": correct / count, "masked_tokens": count,
            "tokens": windows * T, "mask_prob": prob}


# ----------------------------------------------------------------------------- preferences and rewards


def token_logprobs(model, x, y, temperature=1.0):
    """log p(y_t | x_<=t) at every scored position (y >= 0; 0 elsewhere): (B, T) float32, with
    gradients when the caller allows them. x, y (B, T) as for the loss, the prompt's targets -1.
    temperature divides the logits: the distribution completions were sampled from."""
    logits = model(x)[0].float() / temperature  # (B, T, V): head 1, the next-token policy
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return logp * (y >= 0)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Direct preference optimisation (Rafailov et al. 2023). Each argument (B,) is a completion's
    summed log-probability under the policy or the frozen reference. The implicit reward of a
    completion is beta * (log pi - log ref); the loss is -log sigmoid(reward chosen - reward
    rejected), which raises the chosen completion against the rejected one, relative to how the
    reference rated them. Returns (mean loss, implicit rewards of chosen (B,), of rejected (B,))."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def group_advantages(rewards, group_size):
    """GRPO's advantages (Shao et al. 2024): rewards (B * G,) of G completions per prompt, each minus
    its group's mean and divided by the group's standard deviation, so a completion is judged
    against its siblings, with no value network. A group that all scored alike gets 0: nothing
    to learn from it."""
    r = rewards.view(-1, group_size)  # (B, G)
    return ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)).flatten()


def bootstrap_interval(values, level=0.95, resamples=2000, seed=0):
    """(low, high): the percentile bootstrap confidence interval of the mean of values (Efron
    1979): the mean of `resamples` resamples with replacement, cut at (1 - level) / 2 each side."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return tuple(float(q) for q in np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


# ----------------------------------------------------------------------------- classification


def classification_report(gold, pred, labels):
    """Accuracy, per-class and macro precision/recall/F1, confusion matrix (rows gold, cols pred).
    A class never predicted has precision 0 (no true positives), as in scikit-learn's default."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, pred):
        confusion[index[g]][index[p]] += 1
    per_class = {}
    for label, i in index.items():
        tp = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        actual = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    macro = {k: sum(c[k] for c in per_class.values()) / len(labels) for k in ("precision", "recall", "f1")}
    accuracy = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    return {"accuracy": accuracy, "macro_precision": macro["precision"], "macro_recall": macro["recall"],
            "macro_f1": macro["f1"], "per_class": per_class, "labels": list(labels), "confusion": confusion}
