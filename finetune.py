"""
Fine-tune a trained model on a new, related task: transfer learning with a small learning rate,
regularisation, early stopping, layer-wise learning rates, gradual unfreezing, freezing and LoRA.

    python finetune.py configs/finetune_folio.py       # sft: First Folio -> modern spelling
    python finetune.py configs/finetune_genre.py       # classify: comedy / history / tragedy
    python finetune.py --task=lm --init_from=out/base --data_dir=data/tragedies --out_dir=out/adapted
    python finetune.py configs/dpo_folio.py            # dpo: modern spelling preferred to the Folio's
    python finetune.py configs/rl_addition.py          # rl: addition answers checked by a reward function

The loop, checkpoints, logging and resume are train.py's own (fit()); the starting weights
come from plumbing.load_model like every script's. This file only adds what is particular to
fine-tuning. Read it in order:
  1. load_base()        the starting weights (init_from=DIR of a run, a .pt file, hf:PATH, gpt2
                        names, or scratch) and their tokenizer, which every task reuses
  2. the tasks          lm (token files), sft (prompt -> completion, loss on the completion
                        only), classify (a head on the trunk), dpo (preference pairs against a
                        frozen reference), rl (sampled completions scored by a reward function);
                        each has loader, loss and evaluate
  3. techniques         dropout, freezing by name, LoRA, layer-wise LR decay, gradual unfreezing
  4. finetune()         puts them together and calls fit()
"""

import exits  # noqa: F401  first: from here on a signal or a failed write ends the program with one line

import copy
import os
import re

import torch
import torch.distributed as torch_dist

from adapters import GPTClassifier, add_lora, lora_disabled
from config import cli_config
from generate import generate
from model import check_flex_dropout, document_ids
from plumbing import (RandomBatches, continue_run, load_checkpoint, load_model, micro_batches_per_process,
                      model_from_checkpoint, read_meta, refuse_existing_run, save_checkpoint, setup_processes, unwrap)
from prepare.common import DataError, task_dir_of
from tasks import (classification_report, dpo_loss, group_advantages, keep_last, prepare_on_first_use, prompt_ids,
                   read_jsonl, reward_function, token_logprobs)
from tokenizer import from_meta
from train import LMTask, fit, heldout_losses

# ----------------------------------------------------------------------------- 1. the base model


def load_base(cfg):
    """(GPT with the starting weights, tokenizer meta) from init_from."""
    loaded = load_model(cfg)
    if loaded.labels:
        raise SystemExit(f"error: init_from={cfg.init_from} is a classifier; start from a language model")
    return loaded.model, loaded.tokenizer


def set_dropout(model, p):
    """Fine-tuning often wants more dropout than pretraining had: set every dropout layer to p."""
    try:
        check_flex_dropout(model.config.attn_backend, p)
    except ValueError as e:
        raise SystemExit(f"error: dropout={p}: {e}") from None
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        elif isinstance(m, torch.nn.LSTM) and m.num_layers > 1:  # its dropout between layers
            m.dropout = p


# ----------------------------------------------------------------------------- 2. tasks

def fitting_prompt(tok, cfg, path, i, text, room=0):
    """Record i's prompt as the model reads it (ids), or None to skip it (skip_long) when it
    leaves fewer than room + 1 positions of block_size for the answer."""
    prompt = prompt_ids(tok, cfg.prompt_template, text)
    if len(prompt) + room < cfg.block_size:
        return prompt
    if cfg.skip_long:
        return None
    needs = f" (+ max_new_tokens={room} to answer)" if room else ""
    raise DataError(f"{path}: record {i}: the prompt is {len(prompt)} tokens{needs}, longer than block_size="
                    f"{cfg.block_size}; shorten it, raise block_size or set skip_long=True")


def completion_example(prompt, completion, block_size):
    """(x, y, cut): prompt + completion as the model's input x and its next-token targets y,
    -1 (not scored) while the target is still the prompt; at most block_size + 1 tokens in all
    (cut: the completion lost its end)."""
    full = (prompt + completion)[:block_size + 1]
    y = [-1] * (len(prompt) - 1) + full[len(prompt):]
    return full[:-1], y, len(full) < len(prompt) + len(completion)


def completion_ids(tok, path, i, row, field):
    """A completion's ids, ended by end-of-text; an empty one is an error naming the record."""
    if not isinstance(row[field], str) or not row[field].strip():
        raise DataError(f"{path}: record {i}: {field!r} is empty or not text; every example needs one to learn from")
    return tok.encode(row[field]) + [tok.eot_id]


def report_skipped(path, rows, skipped, cut, cfg, kept):
    if cut or skipped:
        print(f"warning: {path}: {skipped} of {rows} examples skipped (prompt too long for block_size="
              f"{cfg.block_size}), {cut} completions cut to fit")
    if not kept:
        raise DataError(f"{path}: no example fits block_size={cfg.block_size}")


def sft_examples(path, tok, cfg):
    """[(x, y)] per record: x = the template-formatted prompt + completion, y the next-token
    targets with -1 (ignored) wherever the target is still part of the prompt."""
    rows = read_jsonl(path, ["prompt", "completion"], cfg.max_examples)
    examples, cut, skipped = [], 0, 0
    for i, r in enumerate(rows, 1):
        prompt = fitting_prompt(tok, cfg, path, i, r["prompt"])
        if prompt is None:
            skipped += 1
            continue
        x, y, was_cut = completion_example(prompt, completion_ids(tok, path, i, r, "completion"), cfg.block_size)
        cut += was_cut
        examples.append((x, y))
    report_skipped(path, len(rows), skipped, cut, cfg, examples)
    return examples


def pack(examples, block_size):
    """Greedily concatenate examples into rows of at most block_size tokens."""
    rows, x, y = [], [], []
    for ex_x, ex_y in examples:
        if x and len(x) + len(ex_x) > block_size:
            rows.append((x, y))
            x, y = [], []
        x, y = x + ex_x, y + ex_y
    return rows + [(x, y)] if x else rows


def pad_batch(rows, pad_id):
    """Right-pad (x, y) rows to the longest: x with pad_id, y with -1 (ignored)."""
    width = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (rx, ry) in enumerate(rows):
        x[i, :len(rx)], y[i, :len(ry)] = torch.tensor(rx), torch.tensor(ry)
    return x, y


def heldout_batches(splits, split, batch_size, procs):
    """This process's batches of a split's held-out rows: every val row, and as many train rows
    (so train and val are scored alike), dealt out among the processes a batch at a time."""
    rows = splits[split][:len(splits["val"])]
    return (rows[i:i + batch_size] for i in range(procs.rank * batch_size, len(rows), procs.world * batch_size))


class ExampleLoader(RandomBatches):
    """Random batches of whole examples, padded per batch."""

    def __init__(self, rows, pad_id, cfg, procs):
        self.rows, self.pad_id = rows, pad_id
        super().__init__(len(rows), cfg.batch_size, micro_batches_per_process(cfg, procs.world), procs.world,
                         procs.rank, cfg.seed, procs.device)

    def make_batch(self, picks):
        return self.to_device(*pad_batch([self.rows[i] for i in picks], self.pad_id))

    def count_tokens(self, picks):
        return sum(len(self.rows[i][0]) for i in picks)


class SFTTask:
    """Supervised fine-tuning: next-token loss on completion tokens only."""

    def __init__(self, cfg, procs, tok, task_dir):
        self.cfg, self.procs = cfg, procs
        self.doc_eot = tok.eot_id if cfg.doc_mask else None
        self.splits = {}
        for split in ("train", "val"):
            examples = sft_examples(os.path.join(task_dir, f"{split}.jsonl"), tok, cfg)
            self.splits[split] = pack(examples, cfg.block_size) if cfg.sft_packing else examples
        if cfg.sft_packing and not cfg.doc_mask:
            print("warning: sft_packing without doc_mask lets packed examples attend to each other")
        self.pad_id = tok.eot_id
        self.loader = ExampleLoader(self.splits["train"], tok.eot_id, cfg, procs)
        self.train_size = len(self.splits["train"])
        self.items_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps

    def loss(self, model, batch):
        x, y = batch
        return model(x, y, doc_ids=document_ids(x, self.doc_eot) if self.doc_eot is not None else None)[1]

    def evaluate(self, model, autocast):
        """Mean completion-token loss of head 1 (and of every head of a multi-token model) over
        the whole val split and as many train rows, the rows shared among the processes."""
        out = {}
        for split in ("train", "val"):
            batches = (self.loader.to_device(*pad_batch(rows, self.pad_id))
                       for rows in heldout_batches(self.splits, split, self.cfg.batch_size, self.procs))
            losses = heldout_losses(model, batches, autocast, self.procs, self.doc_eot)
            out[split] = losses[0]
            if split == "val" and len(losses) > 1:
                out.update({f"val_head{i + 1}": m for i, m in enumerate(losses)})
        return out


def classify_batch(rows, pad_id):
    """[(ids, label)] -> (idx (B, T) right-padded, lengths (B,), labels (B,))."""
    x, _ = pad_batch([(ids, []) for ids, _ in rows], pad_id)
    return x, torch.tensor([len(ids) for ids, _ in rows]), torch.tensor([label for _, label in rows])


class ClassifyLoader(ExampleLoader):
    def make_batch(self, picks):
        return self.to_device(*classify_batch([self.rows[i] for i in picks], self.pad_id))


class ClassifyTask:
    """text -> label with GPTClassifier; the label set comes from the train split."""

    def __init__(self, cfg, procs, tok, task_dir):
        self.cfg, self.procs, self.tok = cfg, procs, tok
        data = {s: read_jsonl(os.path.join(task_dir, f"{s}.jsonl"), ["text", "label"], cfg.max_examples)
                for s in ("train", "val")}
        self.labels = sorted({r["label"] for r in data["train"]})
        unknown = sorted({r["label"] for r in data["val"]} - set(self.labels))
        if unknown:
            raise DataError(f"label sets differ between splits: val has {unknown}, train only {self.labels}")
        self.splits, self.truncated = {}, {}
        for split, rows in data.items():
            # keep a passage's end when it is too long: 'last' pooling reads the final token
            cut = [keep_last([tok.eot_id] + tok.encode(r["text"]), cfg.block_size) for r in rows]
            self.splits[split] = [(ids, self.labels.index(r["label"])) for (ids, _), r in zip(cut, rows)]
            self.truncated[split] = sum(was_cut for _, was_cut in cut)
            if self.truncated[split] and procs.master:
                print(f"warning: {task_dir}/{split}.jsonl: {self.truncated[split]} of {len(rows)} texts are longer "
                      f"than block_size={cfg.block_size} tokens; the model reads only their last {cfg.block_size}")
        self.loader = ClassifyLoader(self.splits["train"], tok.eot_id, cfg, procs)
        self.train_size = len(self.splits["train"])
        self.items_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps

    def loss(self, model, batch):
        return model(*batch)[1]

    @torch.no_grad()
    def predict(self, model, rows, autocast):
        """(predicted label indices, mean loss) over rows."""
        model.eval()
        preds, total = [], 0.0
        for i in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[i:i + self.cfg.batch_size]
            batch = [t.to(self.procs.device) for t in classify_batch(chunk, self.tok.eot_id)]
            with autocast:
                logits, loss = model(*batch)
            total += loss.item() * len(batch[0])
            preds += logits.argmax(dim=-1).tolist()
        model.train()
        return preds, total / len(rows)

    def evaluate(self, model, autocast):
        """train/val loss (val and as many train rows), val accuracy and macro-F1."""
        out = {}
        for split in ("train", "val"):
            rows = self.splits[split][:len(self.splits["val"])]
            preds, out[split] = self.predict(model, rows, autocast)
            if split == "val":
                report = classification_report([r[1] for r in rows], preds, list(range(len(self.labels))))
                out["val_accuracy"], out["val_macro_f1"] = report["accuracy"], report["macro_f1"]
        return out


class PreferenceTask:
    """DPO on {prompt, chosen, rejected} records: raise the chosen completion against the rejected
    one, measured against the frozen reference (the starting weights; see FrozenReference)."""

    def __init__(self, cfg, procs, tok, task_dir):
        self.cfg, self.procs = cfg, procs
        self.splits = {s: preference_pairs(os.path.join(task_dir, f"{s}.jsonl"), tok, cfg) for s in ("train", "val")}
        self.loader = PairLoader(self.splits["train"], tok.eot_id, cfg, procs)
        self.reference = None  # set by finetune() once the policy is built
        self.train_size = len(self.splits["train"])
        self.items_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps

    def scores(self, model, batch):
        """(loss, implicit rewards of chosen and rejected (B,), the policy's log-probabilities of
        chosen and of rejected (B,)) for a batch of B pairs: chosen rows first, then rejected."""
        x, y = batch  # (2B, T)
        policy = token_logprobs(model, x, y).sum(1)
        reference = self.reference.token_logprobs(model, x, y).sum(1)
        B = len(x) // 2
        loss, chosen, rejected = dpo_loss(policy[:B], policy[B:], reference[:B], reference[B:], self.cfg.dpo_beta)
        if self.cfg.dpo_sft_weight > 0:  # the chosen completions' mean next-token loss
            loss = loss - self.cfg.dpo_sft_weight * policy[:B].sum() / (y[:B] >= 0).sum()
        return loss, chosen, rejected, policy[:B].detach(), policy[B:].detach()

    def loss(self, model, batch):
        return self.scores(model, batch)[0]

    @torch.no_grad()
    def evaluate(self, model, autocast):
        """DPO loss of the val pairs and as many train pairs; on val also the mean reward margin,
        the preference accuracy (chosen's implicit reward higher) and the policy's own accuracy
        (chosen more likely than rejected, whatever the reference thought): the behaviour itself."""
        out, n_val = {}, len(self.splits["val"])
        raw = unwrap(model)
        raw.eval()
        for split in ("train", "val"):
            sums = torch.zeros(4, device=self.procs.device)  # loss, margin, preferred, policy prefers chosen
            for pairs in heldout_batches(self.splits, split, self.cfg.batch_size, self.procs):
                with autocast:
                    loss, chosen, rejected, logp_chosen, logp_rejected = self.scores(raw, self.loader.to_batch(pairs))
                margin = chosen - rejected
                sums += torch.stack([loss * len(margin), margin.sum(), (margin > 0).sum(),
                                     (logp_chosen > logp_rejected).sum()]).float()
            if self.procs.world > 1:
                torch_dist.all_reduce(sums)
            loss, margin, preferred, policy_prefers = (sums / min(n_val, len(self.splits[split]))).tolist()
            out[split] = loss
        out.update(val_reward_margin=margin, val_preference_accuracy=preferred, val_policy_accuracy=policy_prefers)
        raw.train()
        return out


def preference_pairs(path, tok, cfg):
    """[((x, y) of prompt + chosen, (x, y) of prompt + rejected)] per record."""
    rows = read_jsonl(path, ["prompt", "chosen", "rejected"], cfg.max_examples)
    pairs, cut, skipped = [], 0, 0
    for i, r in enumerate(rows, 1):
        chosen, rejected = (completion_ids(tok, path, i, r, field) for field in ("chosen", "rejected"))
        if chosen == rejected:
            raise DataError(f"{path}: record {i}: 'chosen' and 'rejected' are the same text; a pair needs two "
                            f"different completions")
        prompt = fitting_prompt(tok, cfg, path, i, r["prompt"])
        if prompt is None:
            skipped += 1
            continue
        (*c, cut_c), (*j, cut_j) = (completion_example(prompt, ids, cfg.block_size) for ids in (chosen, rejected))
        cut += cut_c or cut_j
        pairs.append((tuple(c), tuple(j)))
    report_skipped(path, len(rows), skipped, cut, cfg, pairs)
    return pairs


class PairLoader(ExampleLoader):
    """Random batches of B preference pairs as one padded batch of 2B rows: chosen, then rejected."""

    def make_batch(self, picks):
        return self.to_batch([self.rows[i] for i in picks])

    def to_batch(self, pairs):
        return self.to_device(*pad_batch([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id))

    def count_tokens(self, picks):
        return sum(len(c[0]) + len(r[0]) for c, r in (self.rows[i] for i in picks))


class RewardTask:
    """RL with a verifiable reward, GRPO-style (Shao et al. 2024): each step samples rl_group_size
    completions of every prompt with the KV cache, scores them with the reward function, and
    raises the log-probability of those that beat their group's mean (policy gradient with the
    group as baseline), optionally held near the reference by a KL penalty. One gradient step per
    batch of samples, so the policy that sampled is the one updated (no importance ratio needed)."""

    def __init__(self, cfg, procs, tok, task_dir):
        self.cfg, self.procs, self.tok = cfg, procs, tok
        self.score = reward_function(cfg.reward)
        self.splits = {s: rl_prompts(os.path.join(task_dir, f"{s}.jsonl"), tok, cfg) for s in ("train", "val")}
        self.loader = PromptLoader(self.splits["train"], tok.eot_id, cfg, procs)
        self.reference = None  # set by finetune() when rl_kl_coef > 0
        self.rewards = []  # the mean reward of each step since the last log line
        self.train_size = len(self.splits["train"])
        self.items_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps

    def sample_and_score(self, model, prompts, group_size, temperature):
        """Sample group_size completions of each (text, ids) prompt; returns (the prompts repeated
        group_size times, their completions' ids, rewards (B * G,)). Sampling runs on the plain
        module in eval mode (no dropout), from the global RNG, which checkpoints save: a resumed
        run samples alike."""
        raw = unwrap(model)
        raw.eval()
        repeated = [p for p in prompts for _ in range(group_size)]
        completions = generate(raw, [ids for _, ids in repeated], self.cfg.max_new_tokens, temperature,
                               stop_ids={self.tok.eot_id})
        raw.train()
        rewards = [self.score(text, self.tok.decode([t for t in c if t != self.tok.eot_id]))
                   for (text, _), c in zip(repeated, completions)]
        return repeated, completions, torch.tensor(rewards)

    def rollout(self, model, prompts, group_size, temperature):
        """sample_and_score, with the samples as a training batch: ((x, y) of every prompt +
        completion, rewards (B * G,))."""
        repeated, completions, rewards = self.sample_and_score(model, prompts, group_size, temperature)
        rows = [completion_example(ids, c, self.cfg.block_size)[:2] for (_, ids), c in zip(repeated, completions)]
        return self.loader.to_device(*pad_batch(rows, self.tok.eot_id)), rewards

    def loss(self, model, prompts):
        (x, y), rewards = self.rollout(model, prompts, self.cfg.rl_group_size, self.cfg.temperature)
        self.rewards.append(rewards.mean().item())
        advantages = group_advantages(rewards, self.cfg.rl_group_size).to(x.device)  # (B * G,)
        logp = token_logprobs(model, x, y, self.cfg.temperature)  # (B * G, T)
        scored = (y >= 0).sum()
        loss = -(advantages[:, None] * logp).sum() / scored  # every completion token weighs the same
        if self.reference is not None:  # k3 estimator of KL(policy || reference) (Schulman 2020), >= 0
            delta = self.reference.token_logprobs(model, x, y, self.cfg.temperature) - logp
            loss = loss + self.cfg.rl_kl_coef * ((delta.exp() - delta - 1) * (y >= 0)).sum() / scored
        return loss

    def step_metrics(self):
        """What the log line adds: the mean sampled reward of the steps since the last one."""
        mean, self.rewards = sum(self.rewards) / max(1, len(self.rewards)), []
        return {"reward": mean}

    @torch.no_grad()
    def evaluate(self, model, autocast):
        """The mean reward of greedy completions of the val prompts and as many train prompts
        (with a 0/1 reward: pass@1). Reported as train/val losses of minus the reward (lower is
        better, so best_metric=val_loss keeps the best-rewarded weights) and as val_reward."""
        out, n_val = {}, len(self.splits["val"])
        for split in ("train", "val"):
            total = torch.zeros((), device=self.procs.device)
            for prompts in heldout_batches(self.splits, split, self.cfg.batch_size, self.procs):
                with autocast:
                    total += self.sample_and_score(model, prompts, 1, 0.0)[2].sum()
            if self.procs.world > 1:
                torch_dist.all_reduce(total)
            # (0.0 - : no "-0.0" in the logs)
            out[split] = 0.0 - total.item() / min(n_val, len(self.splits[split]))
        out["val_reward"] = -out["val"]
        return out


def rl_prompts(path, tok, cfg):
    """[(prompt text, prompt ids)] per record, each leaving max_new_tokens of room in the context."""
    rows = read_jsonl(path, ["prompt"], cfg.max_examples)
    prompts = [(r["prompt"], fitting_prompt(tok, cfg, path, i, r["prompt"], cfg.max_new_tokens))
               for i, r in enumerate(rows, 1)]
    kept = [p for p in prompts if p[1] is not None]
    report_skipped(path, len(rows), len(rows) - len(kept), 0, cfg, kept)
    return kept


class PromptLoader(ExampleLoader):
    """Random batches of prompts: the rows themselves (RewardTask.loss samples their completions)."""

    def make_batch(self, picks):
        return [self.rows[i] for i in picks]

    def count_tokens(self, picks):
        return sum(len(self.rows[i][1]) for i in picks)


class FrozenReference:
    """The model dpo and rl measure the policy against: the starting weights, frozen. With LoRA
    that is the policy with its adapters switched off (no second copy). Otherwise a frozen copy,
    written once to out_dir/reference.pt so that a resumed run measures against the same model."""

    def __init__(self, model=None):
        self.model = model  # None: the policy's own base weights (LoRA)

    @classmethod
    def start(cls, cfg, procs, policy, lora, resuming):
        if lora:
            return cls()
        path = os.path.join(cfg.out_dir, "reference.pt")
        if resuming:
            if not os.path.isfile(path):
                raise SystemExit(f"error: {path} is missing: a task={cfg.task} run needs the reference model it "
                                 f"started from; start a new out_dir")
            model = model_from_checkpoint(load_checkpoint(path))
        else:
            model = copy.deepcopy(policy)
            if procs.master:
                refuse_existing_run(cfg.out_dir, cfg.overwrite)  # before writing into out_dir
                os.makedirs(cfg.out_dir, exist_ok=True)
                save_checkpoint({"model": model.state_dict(), "model_args": vars(model.config).copy()}, path)
        return cls(model.requires_grad_(False).eval())

    @torch.no_grad()
    def token_logprobs(self, policy, x, y, temperature=1.0):
        if self.model is not None:
            return token_logprobs(self.model.to(x.device), x, y, temperature)
        raw = unwrap(policy)
        was_training = raw.training
        raw.eval()
        with lora_disabled(raw):
            logp = token_logprobs(raw, x, y, temperature)
        raw.train(was_training)
        return logp


# ----------------------------------------------------------------------------- 3. techniques

def layer_lr_scales(model, decay):
    """{name: factor} for configure_optimizer: the top (final norm, heads) gets the full LR, each
    block below decay x less, the embeddings the least (depths from GPT.parameter_depths)."""
    top = model.config.n_layer
    return {name: decay ** (top - depth) for name, depth in model.parameter_depths().items()}


def unfrozen_depth(it, every, n_layer):
    """Gradual unfreezing (ULMFiT): at step `it` every parameter at depth >= this trains. Stage 0
    is the head and the last block; one more block joins every `every` steps; embeddings last."""
    return max(-1, n_layer - 1 - it // every)


def gradual_unfreezing(every, model):
    """grad_filter(it) for fit(): drop the gradients of the model's parameters still frozen at
    step `it`. (Dropping gradients rather than toggling requires_grad keeps DDP's buckets
    valid; AdamW leaves a parameter without a gradient untouched, weight decay included.)"""
    depths = model.parameter_depths()
    params = dict(model.named_parameters())

    def drop_frozen(it):
        lowest = unfrozen_depth(it, every, model.config.n_layer)
        for name, depth in depths.items():
            if depth < lowest:
                params[name].grad = None
    return drop_frozen


def freeze_by_pattern(model, patterns):
    """requires_grad=False for parameters whose name matches any pattern; returns their names."""
    regexes = [re.compile(p) for p in patterns.split(",") if p]
    frozen = [n for n, p in model.named_parameters() if any(r.search(n) for r in regexes)]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    if regexes and not frozen:
        raise SystemExit(f"error: freeze={patterns!r} matches no parameter name (e.g. transformer.wte.weight)")
    return frozen


# ----------------------------------------------------------------------------- 4. putting it together

def build_finetune_model(cfg, base, task):
    """The model fit() trains: the base weights in the task's model, with LoRA adapters if
    asked, and freezing applied. Returns (model, lora settings or None)."""
    model, lora = base, None
    if not cfg.keep_mtp_heads or cfg.task in ("classify", "dpo", "rl"):  # these read head 1 only
        model.drop_mtp_heads()
    if cfg.task == "classify":
        model = GPTClassifier(base.config, len(task.labels), cfg.classify_pool)
        missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
        assert all(k.startswith(("cls_head.", "pooler.")) for k in missing), missing
    if cfg.lora_rank > 0:
        lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                "targets": [t for t in cfg.lora_targets.split(",") if t]}
        if add_lora(model, **lora) == 0:
            raise SystemExit(f"error: lora_targets={cfg.lora_targets!r} names no linear layer in the blocks")
    apply_freezing(model, cfg, lora)
    return model, lora


def apply_freezing(model, cfg, lora):
    """With LoRA only the adapters (and a new head) train; freeze= patterns freeze more."""
    if lora:
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith(("cls_head.", "pooler.")))
    freeze_by_pattern(model, cfg.freeze)


def finetune(cfg):
    procs = setup_processes(cfg)
    ckpt, base = None, None
    if cfg.init_from == "resume":
        loaded = load_model(cfg)
        continue_run(cfg, loaded)
        ckpt, model_to_resume, tok_meta = loaded.checkpoint, loaded.model, loaded.tokenizer
        if "finetune" not in ckpt or ckpt["finetune"]["task"] != cfg.task:
            raise SystemExit(f"error: {cfg.out_dir}/ckpt_last.pt is not a task={cfg.task} fine-tuning run")
    else:
        base, tok_meta = load_base(cfg)
        set_dropout(base, cfg.dropout)
        if cfg.block_size > base.config.block_size:
            raise SystemExit(f"error: block_size={cfg.block_size} exceeds the base model's {base.config.block_size}")
    arch = (base if ckpt is None else model_to_resume).config.arch
    check_task_fits(cfg, arch)
    try:
        tok = from_meta(tok_meta, cfg.gpt2_bpe_path, cfg.cache_dir)
        task = make_task(cfg, procs, tok, tok_meta, arch)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    if ckpt is not None:
        model, lora = model_to_resume, ckpt["finetune"]["lora"]
        apply_freezing(model, cfg, lora)
    else:
        model, lora = build_finetune_model(cfg, base, task)
    if cfg.task == "dpo" or (cfg.task == "rl" and cfg.rl_kl_coef > 0):
        task.reference = FrozenReference.start(cfg, procs, model, lora, resuming=ckpt is not None)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if procs.master:
        print(f"fine-tuning {cfg.task}: {n_train:,} of {sum(p.numel() for p in model.parameters()):,} parameters train")
    extra = {"tokenizer": tok_meta, "finetune": {"task": cfg.task, "labels": getattr(task, "labels", None),
                                                 "classify_pool": cfg.classify_pool, "lora": lora}}
    try:  # (a reward function fails only once training runs)
        return fit(cfg, procs, model, task, ckpt,
                   lr_scales=layer_lr_scales(model, cfg.lr_layer_decay) if cfg.lr_layer_decay != 1.0 else None,
                   grad_filter=gradual_unfreezing(cfg.unfreeze_every, model) if cfg.unfreeze_every > 0 else None,
                   extra_state=extra)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


def check_task_fits(cfg, arch):
    """What a base model's architecture or the settings cannot do, said before any work."""
    if arch == "bert" and cfg.task in ("sft", "dpo", "rl"):
        raise SystemExit(f"error: task={cfg.task} trains next-token prediction, which an encoder (arch=bert) does "
                         f"not do; fine-tune it with task=classify, or task=lm (more masked-LM training)")
    if cfg.task in ("dpo", "rl") and cfg.parallel == "fsdp":
        raise SystemExit(f"error: task={cfg.task} runs with parallel=ddp (its reference model and sampling are not "
                         f"sharded); for a model too large for one device, train LoRA adapters (lora_rank)")
    if cfg.task == "rl" and not cfg.reward:
        raise SystemExit("error: task=rl needs reward=module:function, a Python function (prompt, completion) -> "
                         "float (e.g. reward=prepare.addition:reward)")
    if cfg.task == "rl" and cfg.temperature == 0:
        raise SystemExit("error: task=rl learns from differences between sampled completions: set temperature > 0 "
                         "(1.0 samples the model's own distribution)")
    if cfg.task == "classify" and cfg.classify_pool == "first" and arch != "bert":
        raise SystemExit("error: classify_pool=first pools the first token, which in a decoder sees only itself "
                         "(the end-of-text every text starts with): use classify_pool=last or mean, or an encoder")
    if cfg.task in ("dpo", "rl") and (cfg.dropout > 0 or (cfg.lora_rank > 0 and cfg.lora_dropout > 0)):
        raise SystemExit(f"error: task={cfg.task} compares the policy with its reference model, which runs without "
                         f"dropout: set dropout=0 and lora_dropout=0, so that the two start as the same function")
    if arch == "lstm" and (cfg.task == "classify" or cfg.lora_rank > 0):
        raise SystemExit("error: the classification head and LoRA adapters are built on transformer blocks; "
                         "fine-tune an LSTM (arch=lstm) with task=lm or task=sft, without lora_rank")


# each task's built-in task set: prepare/{name}.py writes data/shakespeare_{name}
DEFAULT_TASK_SET = {"sft": "folio", "classify": "genre", "dpo": "folio_preferences", "rl": "addition"}


def make_task(cfg, procs, tok, tok_meta, arch="gpt"):
    """The task object fit() trains; its data must be in the base model's tokenizer."""
    if cfg.task == "lm":
        meta = read_meta(cfg.data_dir)
        if meta["tokenizer"] != tok_meta:
            raise DataError(f"{cfg.data_dir} was tokenized with {meta['tokenizer']['kind']} (vocab "
                            f"{meta['vocab_size']}), not the base model's {tok_meta['kind']} tokenizer; prepare it "
                            f"with the same tokenizer")
        return LMTask(cfg, procs, meta, arch)
    task_dir = task_dir_of(cfg, DEFAULT_TASK_SET[cfg.task])
    if procs.master:
        prepare_on_first_use(cfg, os.path.join(task_dir, "train.jsonl"))
    if procs.world > 1:
        torch_dist.barrier()
    tasks = {"sft": SFTTask, "classify": ClassifyTask, "dpo": PreferenceTask, "rl": RewardTask}
    return tasks[cfg.task](cfg, procs, tok, task_dir)


if __name__ == "__main__":
    finetune(cli_config())
