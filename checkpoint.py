"""
Models in and out of files: load_model(), the one way every script gets a model (fresh,
resumed, from a run folder or a checkpoint file, from Hugging Face), and checkpoints written
atomically, read without running code from them, plain (.pt) or sharded under FSDP (.dcp).

Read in order:
  1. models         load_model, build_model (which class a config makes), model_from_checkpoint
  2. checkpoints    where a run's checkpoints are, atomic saves, weights-only loads, sharded ones
"""

import contextlib
import json
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass, fields

import torch
import torch.distributed as torch_dist

from adapters import add_lora, classifier, merge_lora
from config import KEY_BY_NAME, ConfigError
from data import DataError, data_dirs, ensure_data, load_meta
from distributed import barrier
from encoder import BertGPT, uses_bert_extras
from errors import CheckpointError
from files import atomic_write, fsync_folder
from hf import GPT2_SIZES, from_hf, hf_tokenizer_meta
from model import GPT, GPTConfig
from multitoken import MultiTokenGPT
from cnn import GatedConvLM
from rnn import LSTMLM
from tokenizer import from_meta, model_vocab_size

# torch.distributed.checkpoint warns whenever it reads or writes in one process, which is on
# purpose here; FSDP2 warns that the model returns a view (the logits, cut to the true
# vocabulary), which matters only to in-place edits of it, and nothing here makes one.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

# ----------------------------------------------------------------------------- 1. models


@dataclass
class Loaded:
    model: torch.nn.Module   # on the CPU
    tokenizer: dict          # the tokenizer's meta (tokenizer.from_meta rebuilds it)
    checkpoint: dict = None  # the checkpoint it came from: resuming needs its optimizer state
    source: str = ""         # what was loaded: a checkpoint path, hf:PATH, a GPT-2 name, or scratch
    data_dir: str = None     # the data folder a checkpoint was trained on
    labels: list = None      # a fine-tuned classifier's label set


def load_model(cfg, init_from=None, meta=None, merge=True, weights=True):
    """The one way every script gets a model. init_from (default cfg.init_from) is one of
        scratch      fresh weights shaped by cfg, for the vocabulary of data_dir (meta)
        resume       out_dir/ckpt_last.pt, LoRA adapters kept, with the state to continue
        hf:PATH      a Hugging Face GPT-2 or BERT folder; gpt2, gpt2-medium, ... download one
        a folder     a run folder: its ckpt_best.pt, else ckpt_last.pt; or a checkpoint file
    LoRA adapters are merged into the weights unless merge=False. weights=False (scratch, or a
    sharded checkpoint): the model's shape only, built on the meta device without memory, for
    FSDP to shard before the weights arrive (distributed.shard_model). A bad source raises a
    CheckpointError (or a ConfigError for settings that make no model)."""
    source = init_from or cfg.init_from
    if is_gpt2_source(source):
        try:
            model = from_hf(source.removeprefix("hf:"), dropout=cfg.dropout, attn_backend=cfg.attn_backend,
                            pad_vocab_to=cfg.pad_vocab_to)
            tok_meta = hf_tokenizer_meta(source.removeprefix("hf:"))
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"init_from={source}: {e}") from None
        return Loaded(model, tok_meta, source=source)
    if source == "scratch":
        meta = meta or ensure_data(cfg, master=True)
        try:
            with contextlib.nullcontext() if weights else torch.device("meta"):
                model = build_model(GPTConfig.from_config(cfg, model_vocab_size(meta["tokenizer"], cfg.arch)))
        except ValueError as e:  # settings that do not make a model
            raise ConfigError(str(e)) from None
        return Loaded(model, meta["tokenizer"], source="scratch", data_dir=data_dirs(cfg.data_dir)[0])
    if source == "resume":
        path = run_checkpoint(cfg.out_dir) or checkpoint_path(cfg.out_dir, "last")
    elif os.path.isdir(source):
        path = checkpoint_path(source)
    elif os.path.isfile(source) or init_from:  # a file a script chose says itself that it is missing
        path = source
    else:
        raise CheckpointError(f"init_from={source}: no such run folder or checkpoint file; give one, hf:PATH, a "
                              f"GPT-2 name, or scratch (fresh weights, the no-transfer baseline)")
    ckpt = load_checkpoint(path, weights)
    if "model_args" not in ckpt or not {"model", "sharded"} & ckpt.keys() or not {"tokenizer", "config"} & ckpt.keys():
        raise CheckpointError(f"{path}: not a checkpoint of this project (a torch file without its model, shape or "
                              f"tokenizer); point at a ckpt_*.pt a run wrote")
    try:  # checkpoints carry their tokenizer; older ones point at their data folder
        tok_meta = ckpt.get("tokenizer") or load_meta(ckpt["config"]["data_dir"])["tokenizer"]
    except DataError as e:
        raise DataError(f"the tokenizer of {path}: {e}") from None
    finetune = ckpt.get("finetune") or {}
    return Loaded(model_from_checkpoint(ckpt, merge=merge and source != "resume"), tok_meta, ckpt, path,
                  data_dirs(ckpt["config"]["data_dir"])[0], finetune.get("labels"))  # of a mix, its own data


def continue_run(cfg, loaded):
    """Resume: cfg takes the run's saved settings, or a ConfigError names those the command
    contradicts, the model's shape (model_args) included."""
    ckpt = loaded.checkpoint
    shape = {k: v for k, v in ckpt["model_args"].items() if k in MODEL_KEYS}
    cfg.continue_run(ckpt["config"], os.path.dirname(loaded.source) or loaded.source, fixed=shape)


def checkpoint_path(source, which="best"):
    """A checkpoint itself, or a run folder's ckpt_{which} (ckpt_last when the run has none, e.g.
    no evaluation has improved yet). A checkpoint is a file ckpt_*.pt, or under FSDP a folder
    ckpt_*.dcp of shards (ckpt_*.dcp.old only exists when a crash hit the swap of two folders).
    When a folder holds both kinds (a run that moved between DDP and FSDP), the newer wins."""
    if is_checkpoint(source):
        return source
    for name in (which, "last"):
        found = [path for suffix in (".pt", ".dcp", ".dcp.old")
                 if is_checkpoint(path := os.path.join(source, f"ckpt_{name}{suffix}"))]
        if found:
            return max(found, key=lambda path: os.path.getmtime(checkpoint_file(path)))
    return os.path.join(source, f"ckpt_{which}.pt")  # missing: load_checkpoint says so


def checkpoint_file(path):
    """The file that makes path a checkpoint: itself, or a sharded folder's state.pt."""
    return path if os.path.isfile(path) else os.path.join(path, "state.pt")


def run_checkpoint(out_dir):
    """The checkpoint a resume of out_dir reads: its ckpt_last (a file or a sharded folder), else
    its ckpt_best (a first save that filled the disk leaves only that, and it holds the whole
    training state too); None when out_dir holds no run."""
    if not os.path.isdir(out_dir):
        return None
    path = checkpoint_path(out_dir, "last")
    path = path if is_checkpoint(path) else checkpoint_path(out_dir, "best")
    return path if is_checkpoint(path) else None


# what a run writes into out_dir, and a new run would replace (reference.pt: FrozenReference checks)
RUN_FILES = ("config.json", "metrics.jsonl", "loss.png")


def refuse_existing_run(out_dir, overwrite):
    """A run is the user's work, and so is anything else a new run would write over (a Hugging
    Face export's config.json, an earlier run's metrics): starting afresh in such a folder stops
    unless asked to replace it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"out_dir={out_dir} is a file, not a folder; choose another out_dir")
    path = run_checkpoint(out_dir)
    if path and not overwrite:
        raise CheckpointError(f"{out_dir} already holds a run ({os.path.basename(path)}); continue it with "
                              f"init_from=resume, choose another out_dir, or set overwrite=True to replace it")
    there = sorted(f for f in os.listdir(out_dir) if f in RUN_FILES or f.startswith("ckpt_")) \
        if os.path.isdir(out_dir) else []
    if there and not overwrite and not stopped_before_saving(out_dir):
        raise CheckpointError(f"{out_dir} holds files a new run would replace ({', '.join(there)}); choose another "
                              f"out_dir, or set overwrite=True to replace them")


def stopped_before_saving(out_dir):
    """Whether out_dir holds a run of this project that was killed before its first checkpoint
    (its config.json, perhaps metrics, nothing to resume): starting again there (the same command,
    or init_from=auto after a restart) replaces those leftovers, as a resume would have."""
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"out_dir", "init_from", "max_iters", "n_layer"} <= saved.keys()


def is_checkpoint(path):
    return os.path.isfile(checkpoint_file(path))


def load_for_inference(cfg, device):
    """(model in eval mode on device, tokenizer, Loaded) for evaluate.py and sample.py: GPT-2
    weights when init_from names them, else out_dir's ckpt_{checkpoint}.pt."""
    if is_gpt2_source(cfg.init_from):
        loaded = load_model(cfg)
    else:
        loaded = load_model(cfg, checkpoint_path(cfg.out_dir, cfg.checkpoint))
    try:
        tok = from_meta(loaded.tokenizer, cfg.gpt2_bpe_path, cfg.cache_dir)
    except (DataError, FileNotFoundError, ValueError) as e:
        raise DataError(f"cannot load the tokenizer: {e}") from None
    return loaded.model.to(device).eval(), tok, loaded


def is_gpt2_source(init_from):
    return init_from.startswith("hf:") or init_from in GPT2_SIZES


def build_model(config):
    """A fresh model of config's architecture: the GPT (model.py), with extra heads
    (multitoken.py) or BERT's extras (encoder.py), the LSTM (rnn.py) or the gated CNN (cnn.py)."""
    if config.arch == "lstm":
        return LSTMLM(config)
    if config.arch == "cnn":
        return GatedConvLM(config)
    if config.mtp_heads > 1:
        if uses_bert_extras(config):
            raise ValueError("mtp_heads > 1 goes with the plain GPT block: not with norm_position=post or "
                             "type_vocab_size > 0")
        return MultiTokenGPT(config)
    return BertGPT(config) if uses_bert_extras(config) else GPT(config)


def model_from_checkpoint(ckpt, merge=True):
    """The checkpoint's model: a GPT, an LSTMLM, or a fine-tuned classifier; LoRA adapters
    are merged into the weights unless merge=False (resuming a LoRA run)."""
    if not {"model", "model_args"} <= ckpt.keys() and "sharded" not in ckpt:
        raise CheckpointError("not a checkpoint of this project (no model weights and shape in it); point at a "
                              "ckpt_*.pt a run of this project wrote")
    config = GPTConfig(**ckpt["model_args"])
    finetune = ckpt.get("finetune") or {}
    with contextlib.nullcontext() if "model" in ckpt else torch.device("meta"):  # (a sharded one's, unread)
        if finetune.get("task") == "classify":
            model = classifier(config, len(finetune["labels"]), finetune["classify_pool"])
        else:
            model = build_model(config)
        if finetune.get("lora"):
            add_lora(model, **finetune["lora"])
    if "model" not in ckpt:
        return model
    try:
        model.load_state_dict(strip_wrapper_prefixes(ckpt["model"]))
    except RuntimeError as e:  # missing, unexpected or misshapen weights
        raise CheckpointError(f"the checkpoint's weights do not fit its own model_args (edited or mixed files?): "
                              f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    return merge_lora(model) if merge else model


def unwrap(model):
    """The plain module inside DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        # (not `a or b`: truth-testing a module calls its __len__, which a GPT does not have)
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def strip_wrapper_prefixes(state_dict):
    """Drop the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes from parameter names."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


# ----------------------------------------------------------------------------- 2. checkpoints

# The keys of the shared config that give a model's shape. Once a model is built its config
# (saved as model_args) owns them, not cfg: a run's saved settings leave them out. (block_size
# stays a setting: the training context may be shorter than the model's.)
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name not in ("vocab_size", "block_size"))


def run_settings(cfg):
    """cfg without the model's shape: what a checkpoint saves as its config."""
    return {k: v for k, v in cfg.to_dict().items() if k not in MODEL_KEYS}


def record_config(cfg, model_config, master):
    """Save the run's settings with the model's own shape (a loaded model's, not cfg's defaults)
    as out_dir/config.json, for the person reading the run, and print those that differ from
    the defaults."""
    if master:
        settings = {**run_settings(cfg), **{k: getattr(model_config, k) for k in MODEL_KEYS}}
        with atomic_write(os.path.join(cfg.out_dir, "config.json")) as f:
            json.dump(settings, f, indent=2)
        changed = {k: v for k, v in settings.items() if k not in KEY_BY_NAME or v != KEY_BY_NAME[k].default}
        print(f"config (all of it in {cfg.out_dir}/config.json; here what differs from the defaults):\n" +
              "\n".join(f"  {k} = {v!r}" for k, v in changed.items()))


def save_checkpoint(state, path):
    """Write atomically (files.atomic_write): a crash at any moment leaves either the old
    checkpoint or the new one, never half of one; a write that fails (a full disk) removes its
    partial file and raises a CheckpointError saying so."""
    try:
        with atomic_write(path, "wb") as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:  # (torch.save reports a failed write as a RuntimeError)
        raise CheckpointError(write_error(path, e)) from None


def copy_checkpoint(source, path):
    """path, atomically, as the checkpoint file just written to source without serialising the
    state again: a hard link (instant, no second copy on disk), or where the filesystem has none
    a copy of the bytes (docs/benchmarks.md). Sharing the file is safe because no checkpoint is
    ever written in place: every save writes a new file and renames it over the old name."""
    tmp = f"{path}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (some network and FUSE filesystems)
            with open(source, "rb") as f, atomic_write(path, "wb") as out:
                shutil.copyfileobj(f, out, 16 << 20)
            return
        os.replace(tmp, path)
        fsync_folder(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise CheckpointError(write_error(path, e)) from None


def write_error(path, e):
    # (torch.save's own message for a short write is about zip offsets; say what it means)
    reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write stopped short (is the disk full?)"
    return (f"could not write {path}: {reason}; the previous checkpoint is kept. Free disk space or fix the "
            f"folder's permissions, then continue with init_from=resume")


def remove_interrupted_saves(out_dir):
    """A save cut short (a kill, a full disk) leaves ckpt_*.tmp, which nothing reads, and a crash in
    a sharded save's swap may leave ckpt_*.dcp.old beside the new folder: remove them."""
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        path = os.path.join(out_dir, name)
        if name.startswith("ckpt_") and (name.endswith(".tmp") or (name.endswith(".old") and is_checkpoint(path[:-4]))):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# what reading a file that is damaged or not a checkpoint raises: a bad zip archive (RuntimeError),
# a pickle that would run code (UnpicklingError), an empty or cut-off file, a file of another kind
UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, OSError)


def damaged(path, e):
    # (torch's own message would suggest weights_only=False: running code from the file)
    return CheckpointError(f"{path}: not a checkpoint of this project, or a damaged one ({type(e).__name__}); "
                           f"train again, or point at another checkpoint")


def load_checkpoint(path, weights=True):
    """A checkpoint as a dict; a sharded one with its weights gathered (see load_sharded_checkpoint),
    or without them (weights=False: FSDP reads them into its shards). A missing, damaged or
    foreign file is a CheckpointError; anything else is a bug and raises as it is."""
    if not is_checkpoint(path):
        raise CheckpointError(f"{path}: no checkpoint there (train first, or check out_dir)")
    try:
        if os.path.isdir(path):
            ckpt = load_sharded_checkpoint(path, weights)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except UNREADABLE as e:
        raise damaged(path, e) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project; point at a ckpt_*.pt a run wrote")
    return ckpt


def save_sharded_checkpoint(ckpt, path, model, optimizer, master):
    """FSDP: every process writes its shard of the weights and optimizer state into the folder
    `path` with torch.distributed.checkpoint, and rank 0 the rest of ckpt as state.pt. The folder
    is written as path.tmp and swapped in whole (the old one renamed to path.old, then removed),
    so a crash leaves a complete checkpoint: the old one or the new one. Every process calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp, old = f"{path}.tmp", f"{path}.old"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
    barrier()
    weights, optimizer_state = get_state_dict(model, optimizer)  # this process's shards, by parameter name
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=tmp,
                 no_dist=not torch_dist.is_initialized())
    except (Exception, CheckpointException) as e:  # every process gets the failure of any (a full disk);
        # (torch's CheckpointException is a BaseException: `except Exception` alone lets it through)
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(write_error(path, e)) from None
    if master:
        save_checkpoint(ckpt, os.path.join(tmp, "state.pt"))  # last: a folder without it is no checkpoint
        if os.path.isdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        fsync_folder(os.path.dirname(os.path.abspath(path)))
    barrier()


def load_sharded_checkpoint(path, weights=True):
    """A sharded checkpoint folder as one dict: its state.pt, plus (weights=True) the model's full
    weights gathered from every process's shard (read here, in this process alone). The rest
    stays on disk, in shards ("sharded": path): load_sharded_state reads it into a sharded model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.api import CheckpointException
    ckpt = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    if not weights:
        return {**ckpt, "sharded": path}
    try:
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        weights = {name.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
                   for name, m in stored.items() if name.startswith("model.") and isinstance(m, TensorStorageMetadata)}
        dcp.load({"model": weights}, checkpoint_id=path, no_dist=True)
    except CheckpointException as e:  # (not an Exception: a shard missing or damaged)
        raise damaged(path, e) from None
    return {**ckpt, "model": weights, "sharded": path}


def load_sharded_state(path, model, optimizer, weights):
    """Fill optimizer (of model, sharded over any number of processes, or not at all), and the
    model's weights too when asked, from the sharded checkpoint at path, each process reading
    only its shards: torch.distributed.checkpoint reshards by parameter name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout to fill: this process's shards
    state = {"model": model_state, "optimizer": optimizer_state} if weights else {"optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=path, no_dist=not torch_dist.is_initialized())
    except CheckpointException as e:  # (not an Exception: a shard missing or damaged)
        raise damaged(path, e) from None
    set_state_dict(model, optimizer, model_state_dict=state.get("model", {}), optim_state_dict=state["optimizer"])


def export_checkpoint(source, path):
    """The checkpoint `source` (a sharded one gathered) written as one .pt file at `path`: the
    weights and what loading them needs, without the training state (for sharing, not resuming)."""
    if os.path.exists(path):
        raise CheckpointError(f"export_ckpt={path} already exists; choose a new file name")
    ckpt = load_checkpoint(source)
    training_state = ("optimizer", "scaler", "rng", "loader", "sharded")
    save_checkpoint({k: v for k, v in ckpt.items() if k not in training_state}, path)
    return f"wrote {path}: the weights of {source} in one file"
