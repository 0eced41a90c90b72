"""
Fine-tune a trained model on a new, related task: transfer learning with a small learning rate,
regularisation, early stopping, layer-wise learning rates, gradual unfreezing, freezing and LoRA.

    python finetune.py configs/finetune_folio.py       # sft: First Folio -> modern spelling
    python finetune.py configs/finetune_genre.py       # classify: comedy / history / tragedy
    python finetune.py --task=lm --init_from=out/base --data_dir=data/tragedies --out_dir=out/adapted

The loop, checkpoints, logging and resume are train.py's own (fit()); this file only adds what
is particular to fine-tuning. Read it in order:
  1. load_base()        the starting weights (init_from=DIR of a run, a .pt file, hf:PATH, gpt2
                        names) and their tokenizer, which every task reuses
  2. the three tasks    lm (token files), sft (prompt -> completion, loss on the completion
                        only), classify (a head on the trunk); each has loader, loss and evaluate
  3. techniques         dropout, freezing by name, LoRA, layer-wise LR decay, gradual unfreezing
  4. finetune()         puts them together and calls fit()
"""

import importlib
import os
import re

import torch

from config import cli_config
from evaluate import classification_report, prompt_ids, read_jsonl
from model import GPT, GPTClassifier, GPTConfig, add_lora, document_ids
from prepare.common import DataError, load_meta, task_dir_of
from tokenizer import GPT2_META, from_meta
from train import (LMTask, RandomBatches, fit, gpt2_weights, is_gpt2_source, load_checkpoint, model_from_checkpoint,
                   setup)

# ----------------------------------------------------------------------------- 1. the base model


def load_base(cfg):
    """(GPT with the starting weights, tokenizer meta) from init_from."""
    source = cfg.init_from
    if is_gpt2_source(source):
        return gpt2_weights(cfg), GPT2_META
    if source == "scratch":  # the no-transfer baseline: same task, fresh weights, data_dir's tokenizer
        from train import ensure_data
        meta = ensure_data(cfg, master=True)
        return GPT(GPTConfig.from_config(cfg, meta["vocab_size"])), meta["tokenizer"]
    path = source
    if os.path.isdir(path):
        path = next((p for p in (os.path.join(source, "ckpt_best.pt"), os.path.join(source, "ckpt_last.pt"))
                     if os.path.isfile(p)), os.path.join(source, "ckpt_best.pt"))
    if not os.path.exists(path):
        raise SystemExit(f"error: init_from={source}: no such run folder or checkpoint file; give one, hf:PATH, "
                         f"a GPT-2 name, or scratch (fresh weights, the no-transfer baseline)")
    ckpt = load_checkpoint(path)
    if "finetune" in ckpt and ckpt["finetune"].get("task") == "classify":
        raise SystemExit(f"error: init_from={source} is a classifier; start from a language model")
    tok_meta = ckpt.get("tokenizer") or load_meta(ckpt["config"]["data_dir"])["tokenizer"]
    return model_from_checkpoint(ckpt), tok_meta


def set_dropout(model, p):
    """Fine-tuning often wants more dropout than pretraining had: set every dropout layer to p."""
    model.config.dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


# ----------------------------------------------------------------------------- 2. tasks

def sft_examples(path, tok, cfg):
    """[(x, y)] per record: x = the template-formatted prompt + completion, y the next-token
    targets with -1 (ignored) wherever the target is still part of the prompt."""
    rows = read_jsonl(path, ["prompt", "completion"], cfg.max_examples)
    examples, cut, skipped = [], 0, 0
    for i, r in enumerate(rows, 1):
        prompt = prompt_ids(tok, cfg.prompt_template, r["prompt"])
        completion = tok.encode(r["completion"]) + [tok.eot_id]
        if len(prompt) >= cfg.block_size:
            if cfg.skip_long:
                skipped += 1
                continue
            raise DataError(f"{path}: record {i}: the prompt is {len(prompt)} tokens, longer than "
                            f"block_size={cfg.block_size}; shorten it, raise block_size or set skip_long=True")
        full = (prompt + completion)[:cfg.block_size + 1]
        cut += len(full) < len(prompt) + len(completion)
        y = [-1] * (len(prompt) - 1) + full[len(prompt):]
        examples.append((full[:-1], y))
    if cut or skipped:
        print(f"warning: {path}: {skipped} of {len(rows)} examples skipped (prompt longer than block_size="
              f"{cfg.block_size}), {cut} completions cut to fit")
    if not examples:
        raise DataError(f"{path}: no example fits block_size={cfg.block_size}")
    return examples


def pack(examples, block_size, pad_id):
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


class ExampleLoader(RandomBatches):
    """Random batches of whole examples, padded per batch."""

    def __init__(self, rows, pad_id, cfg, dist):
        self.rows, self.pad_id = rows, pad_id
        super().__init__(len(rows), cfg.batch_size, cfg.gradient_accumulation_steps, dist["world"], dist["rank"],
                         cfg.seed, dist["device"])

    def make_batch(self, picks):
        return self.to_device(*pad_batch([self.rows[i] for i in picks], self.pad_id))


class SFTTask:
    """Supervised fine-tuning: next-token loss on completion tokens only."""

    def __init__(self, cfg, dist, tok, task_dir):
        self.cfg, self.dist = cfg, dist
        self.doc_eot = tok.eot_id if cfg.doc_mask else None
        self.splits = {}
        for split in ("train", "val"):
            examples = sft_examples(os.path.join(task_dir, f"{split}.jsonl"), tok, cfg)
            self.splits[split] = pack(examples, cfg.block_size, tok.eot_id) if cfg.sft_packing else examples
        if cfg.sft_packing and not cfg.doc_mask:
            print("warning: sft_packing without doc_mask lets packed examples attend to each other")
        self.pad_id = tok.eot_id
        self.loader = ExampleLoader(self.splits["train"], tok.eot_id, cfg, dist)
        self.train_size = len(self.splits["train"])
        self.items_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * dist["world"]

    def loss(self, model, batch):
        x, y = batch
        return model(x, y, doc_ids=document_ids(x, self.doc_eot) if self.doc_eot is not None else None)[1]

    @torch.no_grad()
    def evaluate(self, model, autocast):
        """Mean completion-token loss over the whole val split and as many train rows."""
        model.eval()
        out = {}
        for split in ("train", "val"):
            rows = self.splits[split][:len(self.splits["val"])]
            total = count = 0
            for i in range(0, len(rows), self.cfg.batch_size):
                x, y = pad_batch(rows[i:i + self.cfg.batch_size], self.pad_id)
                x, y = x.to(self.dist["device"]), y.to(self.dist["device"])
                with autocast:
                    n = int((y >= 0).sum())
                    total += self.loss(model, (x, y)).item() * n
                    count += n
            out[split] = total / count
        model.train()
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

    def __init__(self, cfg, dist, tok, task_dir):
        self.cfg, self.dist, self.tok = cfg, dist, tok
        data = {s: read_jsonl(os.path.join(task_dir, f"{s}.jsonl"), ["text", "label"], cfg.max_examples)
                for s in ("train", "val")}
        self.labels = sorted({r["label"] for r in data["train"]})
        unknown = sorted({r["label"] for r in data["val"]} - set(self.labels))
        if unknown:
            raise DataError(f"label sets differ between splits: val has {unknown}, train only {self.labels}")
        # keep a passage's end when it is too long: 'last' pooling reads the final token
        self.splits = {s: [(([tok.eot_id] + tok.encode(r["text"]))[-cfg.block_size:], self.labels.index(r["label"]))
                           for r in rows] for s, rows in data.items()}
        self.loader = ClassifyLoader(self.splits["train"], tok.eot_id, cfg, dist)
        self.train_size = len(self.splits["train"])
        self.items_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * dist["world"]

    def loss(self, model, batch):
        return model(*batch)[1]

    @torch.no_grad()
    def predict(self, model, rows, autocast):
        """(predicted label indices, mean loss) over rows."""
        model.eval()
        preds, total = [], 0.0
        for i in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[i:i + self.cfg.batch_size]
            batch = [t.to(self.dist["device"]) for t in classify_batch(chunk, self.tok.eot_id)]
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


# ----------------------------------------------------------------------------- 3. techniques

def depth_of(name, n_layer):
    """Where a parameter sits: block i -> i; embeddings -> -1 (lowest); final norm and heads ->
    n_layer (top). A tied output head is the embedding table, so it counts as an embedding."""
    m = re.search(r"\.h\.(\d+)\.", f".{name}")
    if m:
        return int(m.group(1))
    if "wte" in name or "wpe" in name:
        return -1
    return n_layer


def layer_lr_scale(decay, n_layer):
    """lr_scale for configure_optimizer: the top gets the full LR, each block below decay x less."""
    return lambda name: decay ** (n_layer - depth_of(name, n_layer))


def unfrozen_depth(it, every, n_layer):
    """Gradual unfreezing (ULMFiT): at step `it` every parameter at depth >= this trains. Stage 0
    is the head and the last block; one more block joins every `every` steps; embeddings last."""
    return max(-1, n_layer - 1 - it // every)


def gradual_unfreezing(every, n_layer):
    """grad_filter for fit(): drop the gradients of parameters still frozen at this step. (Dropping
    gradients rather than toggling requires_grad keeps DDP's buckets valid; AdamW leaves a
    parameter without a gradient untouched, weight decay included.)"""
    def drop_frozen(it, model):
        lowest = unfrozen_depth(it, every, n_layer)
        for name, p in model.named_parameters():
            if depth_of(name, n_layer) < lowest:
                p.grad = None
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

def build_finetune_model(cfg, base, task, ckpt=None):
    """The model fit() trains: the base weights in the task's model with LoRA adapters if asked,
    or, when resuming, the run's own model. Freezing applies either way. Returns (model, lora)."""
    if ckpt is not None:
        model, lora = model_from_checkpoint(ckpt, merge=False), ckpt["finetune"]["lora"]
    else:
        model, lora = base, None
        if not cfg.keep_mtp_heads or cfg.task == "classify":  # a classifier never uses them
            model.drop_mtp_heads()
        if cfg.task == "classify":
            model = GPTClassifier(base.config, len(task.labels), cfg.classify_pool)
            missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
            assert all(k.startswith("cls_head.") for k in missing), missing
        if cfg.lora_rank > 0:
            lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                    "targets": [t for t in cfg.lora_targets.split(",") if t]}
            if add_lora(model, **lora) == 0:
                raise SystemExit(f"error: lora_targets={cfg.lora_targets!r} names no linear layer in the blocks")
    if lora:
        for name, p in model.named_parameters():  # only the adapters (and a new head) train
            p.requires_grad_("lora_" in name or name.startswith("cls_head."))
    freeze_by_pattern(model, cfg.freeze)
    return model, lora


def finetune(cfg):
    dist = setup(cfg)
    ckpt, base = None, None
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt_last.pt"))
        if "finetune" not in ckpt or ckpt["finetune"]["task"] != cfg.task:
            raise SystemExit(f"error: {cfg.out_dir}/ckpt_last.pt is not a task={cfg.task} fine-tuning run")
        tok_meta = ckpt["tokenizer"]
    else:
        base, tok_meta = load_base(cfg)
        set_dropout(base, cfg.dropout)
        if cfg.block_size > base.config.block_size:
            raise SystemExit(f"error: block_size={cfg.block_size} exceeds the base model's {base.config.block_size}")
    try:
        tok = from_meta(tok_meta, cfg.gpt2_bpe_path, cfg.cache_dir)
        task = make_task(cfg, dist, tok, tok_meta)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    model, lora = build_finetune_model(cfg, base, task, ckpt)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dist["rank"] == 0:
        print(f"fine-tuning {cfg.task}: {n_train:,} of {sum(p.numel() for p in model.parameters()):,} parameters train")
    n_layer = model.config.n_layer
    extra = {"tokenizer": tok_meta, "finetune": {"task": cfg.task, "labels": getattr(task, "labels", None),
                                                 "classify_pool": cfg.classify_pool, "lora": lora}}
    return fit(cfg, dist, model, task, ckpt,
               lr_scale=layer_lr_scale(cfg.lr_layer_decay, n_layer) if cfg.lr_layer_decay != 1.0 else None,
               grad_filter=gradual_unfreezing(cfg.unfreeze_every, n_layer) if cfg.unfreeze_every > 0 else None,
               extra_state=extra)


def make_task(cfg, dist, tok, tok_meta):
    """The task object fit() trains; its data must be in the base model's tokenizer."""
    if cfg.task == "lm":
        meta = load_meta(cfg.data_dir)
        if meta["tokenizer"] != tok_meta:
            raise DataError(f"{cfg.data_dir} was tokenized with {meta['tokenizer']['kind']} (vocab "
                            f"{meta['vocab_size']}), not the base model's {tok_meta['kind']} tokenizer; prepare it "
                            f"with the same tokenizer")
        return LMTask(cfg, dist, meta)
    name = "folio" if cfg.task == "sft" else "genre"
    task_dir = task_dir_of(cfg, name)
    if not cfg.task_dir and not os.path.isfile(os.path.join(task_dir, "train.jsonl")) and dist["rank"] == 0:
        print(f"{task_dir} is empty: preparing the {name} task set")
        importlib.import_module(f"prepare.{name}").prepare(cfg)
    if dist["world"] > 1:
        torch.distributed.barrier()
    return (SFTTask if cfg.task == "sft" else ClassifyTask)(cfg, dist, tok, task_dir)


if __name__ == "__main__":
    finetune(cli_config())
