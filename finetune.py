"""
Fine-tune a trained model on a new, related task: transfer learning with a small learning rate,
regularisation, early stopping, layer-wise learning rates, gradual unfreezing, freezing and LoRA.

    python finetune.py configs/finetune_folio.py       # sft: First Folio -> modern spelling
    python finetune.py configs/finetune_genre.py       # classify: comedy / history / tragedy
    python finetune.py --task=lm --init_from=out/base --data_dir=data/tragedies --out_dir=out/adapted
    python finetune.py configs/dpo_folio.py            # dpo: modern spelling preferred to the Folio's
    python finetune.py configs/rl_addition.py          # rl: addition answers checked by a reward function

The loop, checkpoints, logging and resume are train.py's own (fit()); the starting weights
come from checkpoint.load_model like every script's; the tasks (lm, sft, classify, dpo, rl) are
tasks.py's. This file only adds what is particular to fine-tuning. Read it in order:
  1. load_base()        the starting weights (init_from=DIR of a run, a .pt file, hf:PATH, gpt2
                        names, or scratch) and their tokenizer, which every task reuses;
                        with_dropout() for a new dropout rate
  2. techniques         freezing by name, LoRA, layer-wise LR decay, gradual unfreezing
  3. finetune()         puts them together with the task and calls fit()
"""

import exits  # noqa: F401  first: from here on a signal or a failed write ends the program with one line

import dataclasses
import re

import torch

from adapters import add_lora, classifier
from checkpoint import build_model, continue_run, load_model
from config import cli_config
from conversation import TEMPLATE, with_turn_tokens
from distributed import setup_processes
from errors import CheckpointError, ConfigError
from multitoken import MultiTokenGPT
from probes import with_bias_probe
from tasks import FrozenReference, make_task
from tokenizer import from_meta
from train import fit

# ----------------------------------------------------------------------------- 1. the base model


def load_base(cfg):
    """(GPT with the starting weights, tokenizer meta) from init_from."""
    loaded = load_model(cfg)
    if loaded.labels:
        raise CheckpointError(f"init_from={cfg.init_from} is a classifier; start from a language model")
    return loaded.model, loaded.tokenizer


def with_dropout(model, p):
    """Fine-tuning often wants more dropout than pretraining had. The model's config is the one
    owner of its dropout, read by every layer when it is built, so a new rate means the same
    weights in a model built with it (the model itself when p is its rate already)."""
    if p == model.config.dropout:
        return model
    try:
        rebuilt = build_model(dataclasses.replace(model.config, dropout=p))
    except ValueError as e:
        raise ConfigError(f"dropout={p}: {e}") from None
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt


# ----------------------------------------------------------------------------- 2. techniques

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
    try:
        regexes = [re.compile(p) for p in patterns.split(",") if p]
    except re.error as e:
        raise ConfigError(f"freeze={patterns!r}: not a regular expression ({e})") from None
    frozen = [n for n, p in model.named_parameters() if any(r.search(n) for r in regexes)]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    if regexes and not frozen:
        raise ConfigError(f"freeze={patterns!r} matches no parameter name (e.g. transformer.wte.weight)")
    return frozen


# ----------------------------------------------------------------------------- 3. putting it together

def build_finetune_model(cfg, base, task):
    """The model fit() trains: the base weights in the task's model, with LoRA adapters if
    asked, and freezing applied. Returns (model, lora settings or None)."""
    model, lora = base, None
    torch.manual_seed(cfg.seed)  # new weights (a classifier head, LoRA's A) start alike in every run and process
    if isinstance(model, MultiTokenGPT) and (not cfg.keep_mtp_heads or cfg.task in ("classify", "dpo", "rl")):
        model.drop_mtp_heads()  # these tasks read head 1 only
    if cfg.task == "chat":  # embedding rows for the turn markers
        model = with_turn_tokens(model, task.tok)
    if cfg.task == "classify":
        model = classifier(base.config, len(task.labels), cfg.classify_pool)
        missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
        assert all(k.startswith(("cls_head.", "pooler.")) for k in missing), missing
    if cfg.lora_rank > 0:
        lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                "targets": [t for t in cfg.lora_targets.split(",") if t]}
        if add_lora(model, **lora) == 0:
            raise ConfigError(f"lora_targets={cfg.lora_targets!r} names no linear layer in the blocks")
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
            raise CheckpointError(f"{cfg.out_dir}/ckpt_last.pt is not a task={cfg.task} fine-tuning run")
    else:
        base, tok_meta = load_base(cfg)
        base = with_dropout(base, cfg.dropout)
        if cfg.block_size > base.config.block_size:
            raise ConfigError(f"block_size={cfg.block_size} exceeds the base model's {base.config.block_size}")
    arch = (base if ckpt is None else model_to_resume).config.arch
    check_task_fits(cfg, arch)
    tok = from_meta(tok_meta, cfg.gpt2_bpe_path, cfg.cache_dir)
    task = with_bias_probe(make_task(cfg, procs, tok, tok_meta, arch), cfg, tok_meta)
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
                                                 "classify_pool": cfg.classify_pool, "lora": lora,
                                                 "chat_template": TEMPLATE if cfg.task == "chat" else None}}
    return fit(cfg, procs, model, task, ckpt,
               lr_scales=layer_lr_scales(model, cfg.lr_layer_decay) if cfg.lr_layer_decay != 1.0 else None,
               grad_filter=gradual_unfreezing(cfg.unfreeze_every, model) if cfg.unfreeze_every > 0 else None,
               extra_state=extra)


def check_task_fits(cfg, arch):
    """What a base model's architecture or the settings cannot do, said before any work."""
    if arch == "bert" and cfg.task in ("sft", "dpo", "rl", "chat"):
        raise ConfigError(f"task={cfg.task} trains next-token prediction, which an encoder (arch=bert) does "
                          f"not do; fine-tune it with task=classify, or task=lm (more masked-LM training)")
    if cfg.task in ("dpo", "rl") and cfg.parallel == "fsdp":
        raise ConfigError(f"task={cfg.task} runs with parallel=ddp (its reference model and sampling are not "
                          f"sharded); for a model too large for one device, train LoRA adapters (lora_rank)")
    if cfg.task == "rl" and not cfg.reward:
        raise ConfigError("task=rl needs reward=module:function, a Python function (prompt, completion) -> "
                          "float (e.g. reward=prepare.addition:reward)")
    if cfg.task == "rl" and cfg.temperature == 0:
        raise ConfigError("task=rl learns from differences between sampled completions: set temperature > 0 "
                          "(1.0 samples the model's own distribution)")
    if cfg.task == "classify" and cfg.classify_pool == "first" and arch != "bert":
        raise ConfigError("classify_pool=first pools the first token, which in a decoder sees only itself "
                          "(the end-of-text every text starts with): use classify_pool=last or mean, or an encoder")
    if cfg.task in ("dpo", "rl") and (cfg.dropout > 0 or (cfg.lora_rank > 0 and cfg.lora_dropout > 0)):
        raise ConfigError(f"task={cfg.task} compares the policy with its reference model, which runs without "
                          f"dropout: set dropout=0 and lora_dropout=0, so that the two start as the same function")
    if arch == "lstm" and (cfg.task == "classify" or cfg.lora_rank > 0):
        raise ConfigError("the classification head and LoRA adapters are built on transformer blocks; "
                          "fine-tune an LSTM (arch=lstm) with task=lm or task=sft, without lora_rank")
    if cfg.task == "classify" and cfg.bias_file:
        raise ConfigError("bias_file scores sentences by their probability, and a classifier gives none; "
                          "probe its base model instead")
    if arch == "cnn" and cfg.lora_rank > 0:
        raise ConfigError("LoRA adapters wrap linear layers and arch=cnn's convolutions read their weights as "
                          "kernels; fine-tune a CNN without lora_rank")



if __name__ == "__main__":
    finetune(cli_config())
