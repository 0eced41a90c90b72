"""
Every training task behind one interface (Task), so that train.fit runs them all alike:

    LMTask          next-token (or, for an encoder, masked-token) prediction over token files
    SFTTask         prompt -> completion, loss on the completion only
    ClassifyTask    text -> label with a classification head
    PreferenceTask  DPO on {prompt, chosen, rejected}, against a frozen reference
    RewardTask      RL: sampled completions scored by a reward function (GRPO-style)

make_task builds the one a config asks for. What the tasks read comes from examples.py, how
their outputs become numbers from scoring.py.
"""

import copy
import functools
import math
import os
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP

from adapters import lora_disabled
from checkpoint import load_checkpoint, model_from_checkpoint, refuse_existing_run, save_checkpoint, unwrap
from conversation import chat_examples
from data import (DataError, MixedLoader, RandomBatches, TokenLoader, data_dirs, load_meta, mixture_weights,
                  prepare_on_first_use, task_dir_of)
from distributed import micro_batches_per_process
from errors import CheckpointError, ConfigError
from examples import (classify_batch, completion_example, keep_last, pack, pad_batch, preference_pairs,
                      read_jsonl, reward_function, rl_prompts, sft_examples)
from generate import generate
from model import document_ids
from scoring import classification_report, dpo_loss, group_advantages, mask_tokens, token_logprobs
from tokenizer import from_meta, mask_id_of, model_vocab_size


class Task(Protocol):
    """What train.fit asks of a task. items are what train_size counts: tokens, or examples."""
    loader: RandomBatches  # batches to train on: loader.next(), resumable (state_dict)
    train_size: int        # items in the train split (epochs = passes over them)
    items_per_iter: int    # items one optimizer step consumes, over all processes

    def loss(self, model, batch):
        """The scalar to minimise on one micro-batch."""

    def evaluate(self, model, autocast) -> dict:
        """{'train': loss, 'val': loss, and any metric such as 'val_accuracy'}; every process
        calls it and gets the same numbers. (Optional: step_metrics() -> {name: number}, added
        to each log line.)"""


@contextmanager
def evaluating(model):
    """The model in eval mode (no dropout) inside the block, back in its own mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- language modelling

class LMTask:
    """Language modelling over token files (pretraining, and finetune.py's task=lm): next-token
    prediction for a decoder; for an encoder (arch='bert') the masked tokens of each window."""

    def __init__(self, cfg, procs, meta, arch="gpt"):
        self.cfg, self.procs = cfg, procs
        if cfg.doc_mask and arch in ("lstm", "cnn"):
            raise ConfigError(f"doc_mask needs attention: arch={arch} reads across documents; set doc_mask=False")
        self.eot_id = meta["eot_id"] if cfg.doc_mask else None
        self.masking = None
        if arch == "bert":  # the batch's windows, masked: (x, generator=None) -> (inputs, targets)
            self.masking = functools.partial(mask_tokens, mask_id=mask_id_of(meta["tokenizer"]),
                                             vocab_size=model_vocab_size(meta["tokenizer"], arch),
                                             eot_id=meta["eot_id"], prob=cfg.mask_prob)
        accum, folders = micro_batches_per_process(cfg, procs.world), data_dirs(cfg.data_dir)
        place = (cfg.batch_size, cfg.block_size, accum, procs.world, procs.rank, cfg.seed, procs.device,
                 meta["eot_id"] if cfg.align_to_documents else None, True)
        self.loader = (MixedLoader(folders, mixture_weights(cfg), *place) if len(folders) > 1 else
                       TokenLoader(cfg.data_dir, "train", *place))
        from_meta(meta["tokenizer"], cfg.gpt2_bpe_path, cfg.cache_dir)  # a cut table: stop now, not at sampling
        # val is first read at the first evaluation: open it now, so a missing or damaged one stops at once
        for folder in folders:
            TokenLoader(folder, "val", cfg.batch_size, cfg.block_size, 1, 1, 0, cfg.seed, procs.device, check_ids=True)
        self.train_size = len(self.loader.data)  # tokens
        self.items_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps

    def loss(self, model, batch):
        x, y = batch
        doc_ids = document_ids(x, self.eot_id) if self.eot_id is not None else None
        if self.masking is not None:
            x, y = self.masking(x)
        return model(x, y, doc_ids=doc_ids)[1]

    def evaluate(self, model, autocast):
        return estimate_loss(model, self.cfg, self.procs, autocast, self.eot_id, self.masking, self.loader.data)


@torch.no_grad()
def estimate_loss(model, cfg, procs, autocast, eot_id=None, masking=None, train_data=None):
    """Mean loss over cfg.eval_iters batches per split. The batches are the same at every
    evaluation (a fixed seed), so curves compare like with like and training RNG is untouched.
    masking: an encoder's (LMTask.masking), drawn from a generator seeded alike every time.
    train_data: the train split's SplitTokens when open (its shards are not mapped twice). A mix
    (data_dir=NEW,OLD) is scored on its first folder, and on each other's val split as val_loss_FOLDER."""
    out, (first, *others) = {}, data_dirs(cfg.data_dir)
    splits = [("train", "train", first), ("val", "val", first)] + [
        (f"val_loss_{os.path.basename(os.path.normpath(d))}", "val", d) for d in others]
    for name, split, folder in splits:
        loader = TokenLoader(folder, split, cfg.batch_size, cfg.block_size, cfg.eval_iters, procs.world,
                             procs.rank, seed=cfg.seed + 1, device=procs.device,
                             data=train_data if split == "train" else None)
        batches = (loader.next() for _ in range(cfg.eval_iters))
        if masking is not None:
            generator = torch.Generator().manual_seed(cfg.seed + 2 + procs.rank)
            batches = (masking(x, generator=generator) for x, _ in batches)
        losses = heldout_losses(model, batches, autocast, procs, eot_id)
        out[name] = losses[0]
        if name == "val" and len(losses) > 1:
            out.update({f"val_head{i + 1}": m for i, m in enumerate(losses)})
    return out


@torch.no_grad()
def heldout_losses(model, batches, autocast, procs, eot_id=None):
    """Mean next-token loss of each head over batches of (x, y) (targets of -1 not scored), every
    scored token weighing the same, over all processes. Head 1's is what `val_loss` means
    everywhere: comparable whatever mtp_heads is. One head: the model's own forward, compiled
    when compile=True (DDP's wrapper skipped: its forward prepares gradient reduction)."""
    raw = unwrap(model)
    module = model.module if isinstance(model, DDP) else model
    n_heads = raw.config.mtp_heads
    totals = torch.zeros(n_heads, device=procs.device)
    count = torch.zeros((), device=procs.device)
    with evaluating(model):
        for x, y in batches:
            doc_ids = document_ids(x, eot_id) if eot_id is not None else None
            with autocast:
                losses = [module(x, y, doc_ids=doc_ids)[1]] if n_heads == 1 else raw.head_losses(x, y, doc_ids)
            scored = (y >= 0).sum()  # (a batch with nothing scored has a NaN loss: it adds 0)
            totals += torch.where(scored > 0, torch.stack(losses).float() * scored, 0.0)
            count += scored
    if procs.world > 1:
        torch_dist.all_reduce(totals)
        torch_dist.all_reduce(count)
    return (totals / count).tolist()


# ----------------------------------------------------------------------------- tasks on examples

def heldout_batches(splits, split, batch_size, procs):
    """This process's batches of a split's held-out rows: every val row, and as many train rows
    (so train and val are scored alike), dealt out among the processes a batch at a time. Every
    process gets the same number of batches, the last ones empty ([]) where it runs out of rows:
    under FSDP each batch's forward is a collective that every process must join."""
    rows = splits[split][:len(splits["val"])]
    rounds = math.ceil(len(rows) / (procs.world * batch_size))
    starts = ((k * procs.world + procs.rank) * batch_size for k in range(rounds))
    return (rows[i:i + batch_size] for i in starts)


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


class ExampleTask:
    """What the tasks on a task set's examples share: its train.jsonl and val.jsonl read into
    rows (read_split), a loader of random batches of them (loader_type), sizes counted in
    examples, and for dpo and rl the frozen reference (set by finetune() once the policy is
    built)."""
    loader_type = ExampleLoader

    def __init__(self, cfg, procs, tok, task_dir):
        self.cfg, self.procs, self.tok = cfg, procs, tok
        self.splits = {split: self.read_split(os.path.join(task_dir, f"{split}.jsonl"), split)
                       for split in ("train", "val")}  # (train first: it may decide what val must hold)
        self.loader = self.loader_type(self.splits["train"], tok.eot_id, cfg, procs)
        self.train_size = len(self.splits["train"])
        self.items_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps
        self.reference = None

    def read_split(self, path, split):
        """The rows of one split's task file."""
        raise NotImplementedError


class SFTTask(ExampleTask):
    """Supervised fine-tuning: next-token loss on completion tokens only (task=chat: on the
    assistant turns of conversations, read by conversation.chat_examples)."""
    examples_of = staticmethod(sft_examples)

    def __init__(self, cfg, procs, tok, task_dir):
        self.doc_eot = tok.eot_id if cfg.doc_mask else None
        super().__init__(cfg, procs, tok, task_dir)
        if cfg.sft_packing and not cfg.doc_mask:
            print("warning: sft_packing without doc_mask lets packed examples attend to each other")

    def read_split(self, path, split):
        examples = self.examples_of(path, self.tok, self.cfg)
        return pack(examples, self.cfg.block_size) if self.cfg.sft_packing else examples

    def loss(self, model, batch):
        x, y = batch
        return model(x, y, doc_ids=document_ids(x, self.doc_eot) if self.doc_eot is not None else None)[1]

    def evaluate(self, model, autocast):
        """Mean completion-token loss of head 1 (and of every head of a multi-token model) over
        the whole val split and as many train rows, the rows shared among the processes."""
        out = {}
        for split in ("train", "val"):
            # (a process out of rows runs an unscored row: FSDP gathers weights in every forward)
            batches = (self.loader.to_device(*pad_batch(rows or [([self.tok.eot_id], [-1])], self.tok.eot_id))
                       for rows in heldout_batches(self.splits, split, self.cfg.batch_size, self.procs))
            losses = heldout_losses(model, batches, autocast, self.procs, self.doc_eot)
            out[split] = losses[0]
            if split == "val" and len(losses) > 1:
                out.update({f"val_head{i + 1}": m for i, m in enumerate(losses)})
        return out


class ClassifyLoader(ExampleLoader):
    def make_batch(self, picks):
        return self.to_device(*classify_batch([self.rows[i] for i in picks], self.pad_id))


class ClassifyTask(ExampleTask):
    """text -> label with a classifier (adapters.classifier); the label set comes from the train split."""
    loader_type = ClassifyLoader

    def __init__(self, cfg, procs, tok, task_dir):
        self.truncated = {}
        super().__init__(cfg, procs, tok, task_dir)

    def read_split(self, path, split):
        """[(ids, label index)]; a long text keeps its end: 'last' pooling reads the final token."""
        cfg, tok = self.cfg, self.tok
        rows = read_jsonl(path, ["text", "label"], cfg.max_examples)
        if split == "train":
            self.labels = sorted({r["label"] for r in rows})
            if len(self.labels) < 2:  # (one class: every prediction right, accuracy and F1 of 1.0 that mean nothing)
                raise DataError(f"{path}: every example has the label {self.labels[0]!r}; a classifier needs at "
                                f"least two labels to tell apart")
        unknown = sorted({r["label"] for r in rows} - set(self.labels))
        if unknown:
            raise DataError(f"label sets differ between splits: {split} has {unknown}, train only {self.labels}")
        cut = [keep_last([tok.eot_id] + tok.encode(r["text"]), cfg.block_size) for r in rows]
        self.truncated[split] = sum(was_cut for _, was_cut in cut)
        if self.truncated[split] and self.procs.master:
            print(f"warning: {path}: {self.truncated[split]} of {len(rows)} texts are longer than block_size="
                  f"{cfg.block_size} tokens; the model reads only their last {cfg.block_size}")
        return [(ids, self.labels.index(r["label"])) for (ids, _), r in zip(cut, rows)]

    def loss(self, model, batch):
        return model(*batch)[1]

    @torch.no_grad()
    def predict(self, model, rows, autocast):
        """(predicted label indices, mean loss) over rows."""
        preds, total = [], 0.0
        with evaluating(model):
            for i in range(0, len(rows), self.cfg.batch_size):
                chunk = rows[i:i + self.cfg.batch_size]
                batch = [t.to(self.procs.device) for t in classify_batch(chunk, self.tok.eot_id)]
                with autocast:
                    logits, loss = model(*batch)
                total += loss.item() * len(batch[0])
                preds += logits.argmax(dim=-1).tolist()
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


class PairLoader(ExampleLoader):
    """Random batches of B preference pairs as one padded batch of 2B rows: chosen, then rejected."""

    def make_batch(self, picks):
        return self.to_batch([self.rows[i] for i in picks])

    def to_batch(self, pairs):
        return self.to_device(*pad_batch([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id))

    def count_tokens(self, picks):
        return sum(len(c[0]) + len(r[0]) for c, r in (self.rows[i] for i in picks))


class PreferenceTask(ExampleTask):
    """DPO on {prompt, chosen, rejected} records: raise the chosen completion against the rejected
    one, measured against the frozen reference (the starting weights; see FrozenReference)."""
    loader_type = PairLoader

    def read_split(self, path, split):
        return preference_pairs(path, self.tok, self.cfg)

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
        with evaluating(unwrap(model)) as raw:
            for split in ("train", "val"):
                sums = torch.zeros(4, device=self.procs.device)  # loss, margin, preferred, policy prefers chosen
                for pairs in filter(None, heldout_batches(self.splits, split, self.cfg.batch_size, self.procs)):
                    with autocast:
                        scores = self.scores(raw, self.loader.to_batch(pairs))
                    loss, chosen, rejected, logp_chosen, logp_rejected = scores
                    margin = chosen - rejected
                    sums += torch.stack([loss * len(margin), margin.sum(), (margin > 0).sum(),
                                         (logp_chosen > logp_rejected).sum()]).float()
                if self.procs.world > 1:
                    torch_dist.all_reduce(sums)
                loss, margin, preferred, policy_prefers = (sums / min(n_val, len(self.splits[split]))).tolist()
                out[split] = loss
        out.update(val_reward_margin=margin, val_preference_accuracy=preferred, val_policy_accuracy=policy_prefers)
        return out


class PromptLoader(ExampleLoader):
    """Random batches of prompts: the rows themselves (RewardTask.loss samples their completions)."""

    def make_batch(self, picks):
        return [self.rows[i] for i in picks]

    def count_tokens(self, picks):
        return sum(len(self.rows[i][1]) for i in picks)


class RewardTask(ExampleTask):
    """RL with a verifiable reward, GRPO-style (Shao et al. 2024): each step samples rl_group_size
    completions of every prompt with the KV cache, scores them with the reward function, and
    raises the log-probability of those that beat their group's mean (policy gradient with the
    group as baseline), optionally held near the reference by a KL penalty. One gradient step per
    batch of samples, so the policy that sampled is the one updated (no importance ratio needed)."""

    loader_type = PromptLoader

    def __init__(self, cfg, procs, tok, task_dir):
        self.score = reward_function(cfg.reward)
        self.rewards = []  # the mean reward of each step since the last log line
        super().__init__(cfg, procs, tok, task_dir)

    def read_split(self, path, split):
        return rl_prompts(path, self.tok, self.cfg)

    def sample_and_score(self, model, prompts, group_size, temperature):
        """Sample group_size completions of each (text, ids) prompt; returns (the prompts repeated
        group_size times, their completions' ids, rewards (B * G,)). Sampling runs on the plain
        module in eval mode (no dropout), from the global RNG, which checkpoints save: a resumed
        run samples alike."""
        repeated = [p for p in prompts for _ in range(group_size)]
        with evaluating(unwrap(model)) as raw:
            completions = generate(raw, [ids for _, ids in repeated], self.cfg.max_new_tokens, temperature,
                                   stop_ids={self.tok.eot_id})
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
            for prompts in filter(None, heldout_batches(self.splits, split, self.cfg.batch_size, self.procs)):
                with autocast:
                    total += self.sample_and_score(model, prompts, 1, 0.0)[2].sum()
            if self.procs.world > 1:
                torch_dist.all_reduce(total)
            # (0.0 - : no "-0.0" in the logs)
            out[split] = 0.0 - total.item() / min(n_val, len(self.splits[split]))
        out["val_reward"] = -out["val"]
        return out


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
                raise CheckpointError(f"{path} is missing: a task={cfg.task} run needs the reference model it "
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
        with evaluating(unwrap(policy)) as raw, lora_disabled(raw):
            return token_logprobs(raw, x, y, temperature)


# each task's built-in task set: prepare/{name}.py writes data/shakespeare_{name}
DEFAULT_TASK_SET = {"sft": "folio", "classify": "genre", "dpo": "folio_preferences", "rl": "addition", "chat": "chat"}


def make_task(cfg, procs, tok, tok_meta, arch="gpt"):
    """The task object fit() trains; its data must be in the base model's tokenizer."""
    if cfg.task == "lm":
        meta = load_meta(cfg.data_dir)
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
    chat = type("ChatTask", (SFTTask,), {"examples_of": staticmethod(chat_examples)})
    tasks = {"sft": SFTTask, "classify": ClassifyTask, "dpo": PreferenceTask, "rl": RewardTask, "chat": chat}
    return tasks[cfg.task](cfg, procs, tok, task_dir)
