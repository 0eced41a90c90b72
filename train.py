"""
Pretrain a GPT on prepared token files, on a laptop CPU, one GPU, or many under torchrun.

    python train.py configs/shakespeare_char_cpu.py
    python train.py configs/shakespeare_char.py --batch_size=32 --compile=True
    torchrun --nproc_per_node=8 train.py configs/gpt2_124m.py

Read it top to bottom: train() is the whole job on one screen; fit() is the training loop, the
one loop in this codebase (finetune.py runs its tasks through it too), with what comes before
and after it (start_run, end_run); then one optimizer step (train_step), the optimizer and its
learning-rate schedule. The tasks (what to learn, and how it is evaluated) are in tasks.py;
devices in compute.py, processes in distributed.py, data in data.py, checkpoints in
checkpoint.py, logging in metrics.py.

Batch size: one optimizer step sees batch_size x gradient_accumulation_steps sequences of
block_size tokens, however many processes share the work: accumulation is divided among them.

Exactness contract (tested): on CPU in float32, training 2N steps straight gives bit-for-bit the
weights of N steps + init_from=resume + N steps. Everything that decides the next step lives in
the checkpoint: model, optimizer, scaler, iteration, RNG states, and the loader's position.
"""

import exits  # noqa: F401  first: from here on a signal or a failed write ends the program with one line

import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from checkpoint import (checkpoint_path, continue_run, copy_checkpoint, load_checkpoint, load_model,
                        load_sharded_state, record_config, refuse_existing_run, remove_interrupted_saves,
                        run_checkpoint, run_settings, save_checkpoint, save_sharded_checkpoint)
from compute import peak_flops, setup_compute
from config import cli_config
from data import ensure_data
from distributed import (check_fsdp, from_master, gather_rng_states, gradient_sync, set_rng_state,
                         setup_processes, shard_model, wrap_ddp)
from errors import CheckpointError, ConfigError, DataError
from exits import GracefulStop
from files import lock_folder, unlock_folder
from metrics import (DivergenceWatch, MetricsLogger, Throughput, describe_end, describe_run, lower_is_better,
                     progress_bar)
from muon import CombinedOptimizer, Muon
from systems import checkpoint_blocks, plain_name
from probes import with_bias_probe
from tasks import LMTask
from tokenizer import model_vocab_size


def train(cfg):
    """Pretrain as cfg says; returns a summary dict (iterations, best metric, the model)."""
    procs = setup_processes(cfg)
    if cfg.init_from == "auto":  # restarts (torchrun --max_restarts, a requeued job) continue the run
        # rank 0 looks, for all: on node-local disks or a stale NFS cache processes might disagree
        cfg.set("init_from", "resume" if from_master(bool(run_checkpoint(cfg.out_dir))) else "scratch")
    resuming = cfg.init_from == "resume"
    shards = cfg.parallel == "fsdp" and torch_dist.is_initialized()  # then weights may come later: shard_model
    if resuming:  # the run's own settings come first: its data, its model, its optimizer
        loaded = load_model(cfg, weights=not shards)
        continue_run(cfg, loaded)
    meta = ensure_data(cfg, procs.master)
    if not resuming:
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        loaded = load_model(cfg, meta=meta, weights=procs.master or not shards)
    arch = loaded.model.config.arch
    if loaded.model.config.vocab_size != model_vocab_size(meta["tokenizer"], arch):
        raise DataError(f"init_from={cfg.init_from} has a {loaded.model.config.vocab_size}-token vocabulary "
                        f"but {cfg.data_dir} was prepared with {meta['vocab_size']}; prepare it with its tokenizer")
    if resuming and loaded.tokenizer != meta["tokenizer"]:
        raise DataError(f"{cfg.data_dir} was prepared with another tokenizer than the run in {cfg.out_dir} "
                        f"was trained on; resume with the run's data, or start a new out_dir")
    task = with_bias_probe(LMTask(cfg, procs, meta, arch), cfg, meta["tokenizer"])
    # (init_from=RUN starts a new run from RUN's weights: its optimizer and iteration stay behind)
    return fit(cfg, procs, loaded.model, task, loaded.checkpoint if resuming else None,
               extra_state={"tokenizer": meta["tokenizer"]})


@dataclass
class TrainState:
    """Everything that decides the next step: what a checkpoint holds."""
    model: torch.nn.Module  # the plain model, without compile or DDP wrappers
    optimizer: object
    scaler: torch.amp.GradScaler
    loader: object
    it: int = 0
    best: float = None      # best value of cfg.best_metric so far
    baseline: float = None  # its value when since_best was last reset: progress is measured from here
    since_best: int = 0     # evaluations since it last improved on baseline by more than min_delta

    def checkpoint(self, cfg, world, extra, weights=True):
        """The checkpoint dict; every process must call it (it gathers their RNG states). Under
        FSDP (weights=False) the weights and optimizer state are saved apart, in shards."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()} if weights else {}
        return {**state, "scaler": self.scaler.state_dict(), "iter_num": self.it, "best": self.best,
                "baseline": self.baseline, "since_best": self.since_best, "config": run_settings(cfg),
                "model_args": vars(self.model.config).copy(),
                "rng": gather_rng_states(world), "loader": self.loader.state_dict(), **extra}

    def restore(self, ckpt, cfg, rank):
        if ckpt["config"].get("optimizer", cfg.optimizer) != cfg.optimizer:
            raise CheckpointError(f"{cfg.out_dir}/ckpt_last.pt was trained with optimizer="
                                  f"{ckpt['config']['optimizer']}; resume with that optimizer, or start a new out_dir")
        if "sharded" in ckpt:  # an FSDP run's: resharded to however many processes run now
            load_sharded_state(ckpt["sharded"], self.model, self.optimizer, weights="model" not in ckpt)
        elif cfg.parallel == "fsdp":
            raise CheckpointError(f"{cfg.out_dir}/ckpt_last.pt was saved without FSDP; resume it with "
                                  f"parallel=ddp, or start a new out_dir")
        else:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # (empty when the run trained without float16: a new scaler starts then)
            self.scaler.load_state_dict(ckpt["scaler"])
        self.loader.load_state_dict(ckpt["loader"])
        self.it, self.best, self.since_best = ckpt["iter_num"], ckpt["best"], ckpt["since_best"]
        self.baseline = ckpt.get("baseline", self.best)
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])


def fit(cfg, procs, model, task, ckpt=None, lr_scales=None, grad_filter=None, extra_state=None):
    """The training loop, for any task (tasks.Task): task.loader gives batches, task.loss(model,
    batch) the loss, task.evaluate(model, autocast) the held-out numbers. lr_scales {name: factor}
    gives per-parameter learning rates; grad_filter(it) may drop gradients before each step
    (gradual unfreezing). extra_state goes into checkpoints; ckpt (resuming) is emptied once read.

    cfg.best_metric picks ckpt_best.pt ('val_loss' and 'val_headN': lower is better; any other
    metric the task reports: higher is better); cfg.patience > 0 stops early when it has not moved
    more than min_delta past its value at the last reset for that many evaluations, and the best
    weights are loaded back into the model."""
    run = start_run(cfg, procs, model, task, ckpt, lr_scales)
    state, model, autocast, max_iters = run.state, run.model, run.compute.autocast, run.max_iters
    log, stop, speed = MetricsLogger(cfg, procs.master, state.it), GracefulStop(), run.throughput
    watch = DivergenceWatch(run.compute.device, fp16=state.scaler.is_enabled())  # NaN or inf: stop
    pbar = progress_bar(max_iters, state.it, procs.master)
    train_loss, early = None, False
    # Python's cycle collector pauses one process at a time, and under DDP or FSDP every process
    # waits for the slowest: freeze what setup made, and collect only at evaluations, all together
    gc.collect(), gc.freeze(), gc.disable()
    try:
        while state.it < max_iters:
            lr = lr_at(state.it, cfg, max_iters)
            for group in state.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss, grad_norm = train_step(model, state.optimizer, state.scaler, state.loader, cfg, autocast, task.loss,
                                         grad_filter, state.it)
            watch.step(state.it, loss, grad_norm)
            state.it += 1
            pbar.update(1)
            log_now = state.it % cfg.log_interval == 0 or state.it == max_iters
            eval_now = state.it % cfg.eval_interval == 0 or state.it == max_iters
            stop_now = stop.agreed(procs.world, run.compute.device, check_now=log_now or eval_now)
            if log_now or eval_now or stop_now:  # before anything is logged or saved
                watch.check(procs.world)
            if log_now:
                # the logged train loss is this process's mean over its micro-batches of the step: a
                # noisy sample, not a mean over processes (evaluate's numbers are that)
                train_loss = loss.item()  # a host sync, so only at log steps
                tokens_per_s, mfu = speed.measure(state.loader.tokens)
                extra = task.step_metrics() if hasattr(task, "step_metrics") else {}  # e.g. task=rl's reward
                log.train(state.it, train_loss, lr, grad_norm.item(), state.loader.tokens, tokens_per_s, mfu, extra)
                pbar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            if eval_now:
                results = from_master(task.evaluate(model, autocast))  # one verdict on "improved" for all
                improved, early = state_after_eval(state, cfg, results)
                log.eval(state.it, results, improved)
                save_run(state, cfg, procs, improved, extra_state)
                gc.collect()
                speed.pause()  # evaluation time (and the collection) is not training throughput
            elif stop_now:
                save_run(state, cfg, procs, False, extra_state)
            if stop_now:
                pbar.write(f"stopped by signal at iteration {state.it}; saved {cfg.out_dir}/ckpt_last.pt "
                           f"(continue with init_from=resume)")
                break
            if early:
                pbar.write(f"early stopping at iteration {state.it}: {cfg.best_metric} has not improved by more than "
                           f"{cfg.min_delta} for {cfg.patience} evaluations; best {state.best:.4f} restored from "
                           f"ckpt_best.pt")
                break
    finally:  # however the loop ends, an error included: end the progress bar's line, restore signals
        pbar.close()
        log.close()
        stop.close()
        gc.unfreeze(), gc.enable()
    if early:
        restore_best(state.model, cfg)
    end_run(procs, run.compute, cfg.out_dir)
    return {"iter_num": state.it, "best": state.best, "best_metric": cfg.best_metric, "train_loss": train_loss,
            "stopped_early": early, "model": state.model}


@dataclass
class Run:
    """What start_run sets up for fit."""
    state: TrainState
    model: torch.nn.Module  # what computes: state.model, compiled and/or DDP-wrapped as cfg asks
    compute: object         # compute.Compute: device, dtype, autocast
    max_iters: int
    throughput: Throughput


def start_run(cfg, procs, model, task, ckpt, lr_scales):
    """Everything before the first step: the model on its device (sharded under FSDP), the
    optimizer, the state restored from ckpt when resuming, then compile and DDP."""
    try:  # before anything is written: a model without blocks (arch=lstm) refuses it
        checkpoint_blocks(model) if cfg.activation_checkpointing else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.init_from != "resume":
        refuse_existing_run(cfg.out_dir, cfg.overwrite)
    if procs.master:  # one writer per out_dir
        lock_folder(cfg.out_dir, "training")
        remove_interrupted_saves(cfg.out_dir)
    compute = setup_compute(cfg, procs.device)
    if cfg.parallel == "fsdp":
        check_fsdp(cfg, compute.dtype, model.config.arch)
    sharded = cfg.parallel == "fsdp" and torch_dist.is_initialized()
    if sharded:  # before the optimizer is built: it must hold the shards
        shard_model(model, cfg, compute)
    else:
        model = model.to(compute.device)
    state = TrainState(model, configure_optimizer(model, cfg, compute.device, lr_scales),
                       torch.amp.GradScaler(compute.device.type, enabled=compute.dtype == torch.float16), task.loader)
    max_iters = cfg.max_iters
    if cfg.epochs > 0:
        max_iters = math.ceil(cfg.epochs * task.train_size / task.items_per_iter)
    torch.manual_seed(cfg.seed + procs.rank)  # dropout masks differ between processes
    if ckpt is not None and ("optimizer" in ckpt or "sharded" in ckpt):
        state.restore(ckpt, cfg, procs.rank)
        ckpt.clear()  # its weights and optimizer state now live in the model and optimizer: free the copies
    record_config(cfg, state.model.config, procs.master)  # (once a resume has loaded: the run's values)
    if cfg.compile and not sharded:  # (under FSDP shard_model compiled each block)
        model = torch.compile(model)
    if procs.world > 1 and not sharded:
        model = wrap_ddp(model, compute.device)
    if procs.master:
        describe_run(cfg, state.model, procs.world, state.it, max_iters, task.items_per_iter / task.train_size)
    speed = Throughput(state.loader.tokens, state.model.flops_per_token(cfg.block_size),
                       peak_flops(compute.device), procs.world)
    return Run(state, model, compute, max_iters, speed)


def restore_best(model, cfg):
    """Early stopping ends with the best weights (ckpt_best) in the model, on every process."""
    # imported here: torch.distributed.checkpoint adds ~1 s to every start of the script
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    best = load_checkpoint(checkpoint_path(cfg.out_dir, "best"))["model"]
    # every process passes the full weights; under FSDP each keeps its own shard of them
    set_model_state_dict(model, best, options=StateDictOptions(full_state_dict=True))


def end_run(procs, compute, out_dir):
    if procs.master:
        describe_end(out_dir, compute.device)
    unlock_folder(out_dir)
    if torch_dist.is_initialized():  # under torchrun, even as its only process
        # Wait until every process's last collective is done and freed: gloo frees one on its own
        # thread (needing the GIL), and tearing the group down meanwhile deadlocked 1 run in 6.
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def state_after_eval(state, cfg, results):
    """Update the best metric and the early-stopping count; returns (improved, stop early)."""
    value = results["val"] if cfg.best_metric == "val_loss" else results.get(cfg.best_metric)
    if value is None:
        reported = ", ".join(k for k in results if k not in ("train", "val"))
        raise ConfigError(f"best_metric={cfg.best_metric!r} is not reported by this task "
                          f"(it reports val_loss, {reported})")
    lower = lower_is_better(cfg.best_metric)

    def gain(over):  # how much better value is than `over` (None: nothing to beat yet)
        return math.inf if over is None else (over - value if lower else value - over)
    improved = gain(state.best) > 0
    if improved:
        state.best = value
    if gain(state.baseline) > cfg.min_delta:
        state.baseline, state.since_best = value, 0
    else:  # small gains add up: a steady crawl of less than min_delta per evaluation still resets
        state.since_best += 1
    return improved, cfg.patience > 0 and state.since_best >= cfg.patience


def save_run(state, cfg, procs, is_best, extra_state):
    """ckpt_last always, ckpt_best too when the best metric improved: .pt files that only the
    master writes (ckpt_last then a copy of ckpt_best's bytes), or under FSDP .dcp folders that
    every process writes its shard into. Every process builds the state (it gathers their RNG
    states) and learns whether the master's write worked (else it would wait in a collective).
    ckpt_last is what a resume reads, so ckpt_best is written first: a crash between the two
    leaves ckpt_last one evaluation behind, and the resumed run redoes that evaluation and
    writes the same ckpt_best again."""
    sharded = cfg.parallel == "fsdp"
    ckpt = state.checkpoint(cfg, procs.world, extra_state or {}, weights=not sharded)
    paths = [os.path.join(cfg.out_dir, f"ckpt_{which}.{'dcp' if sharded else 'pt'}")
             for which in (("best", "last") if is_best else ("last",))]
    if sharded:
        for path in paths:
            save_sharded_checkpoint(ckpt, path, state.model, state.optimizer, procs.master)
        return
    failed = None
    if procs.master:
        try:
            save_checkpoint(ckpt, paths[0])
            if is_best:
                copy_checkpoint(paths[0], paths[1])
        except CheckpointError as e:
            failed = str(e)
    failed = from_master(failed)
    if failed:
        raise CheckpointError(failed)


# ----------------------------------------------------------------------------- one optimizer step

def train_step(model, optimizer, scaler, loader, cfg, autocast, loss_fn, grad_filter=None, it=0):
    """Accumulate gradients over this process's micro-batches, clip, and step. Returns (its mean
    loss over them, grad norm) as tensors (no host sync). loss_fn(model, batch) -> loss;
    grad_filter(it) may drop gradients before the step."""
    accum, total = loader.accum, 0.0
    for micro in range(accum):
        batch = loader.next()
        # under DDP or FSDP gradients are reduced across processes only after the last micro-batch
        with gradient_sync(model, enabled=micro == accum - 1):
            with autocast:
                loss = loss_fn(model, batch)
            scaler.scale(loss / accum).backward()
        total = total + loss.detach() / accum
    if grad_filter is not None:
        grad_filter(it)
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: the norm of sharded gradients comes as a DTensor
        grad_norm = grad_norm.full_tensor()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


# ----------------------------------------------------------------------------- optimizer and schedule

def configure_optimizer(model, cfg, device, lr_scales=None):
    """AdamW, or Muon for the hidden matrices plus AdamW for the rest (optimizer='muon').

    Which parameters are hidden matrices is the model's answer (GPT.hidden_matrices: the 2-D
    weights inside the blocks, every multi-token head's and LoRA adapters included), never a
    guess from names. AdamW decays 2-D weights (matmuls, embeddings), not biases and norms, by
    weight_decay; Muon decays its matrices by muon_weight_decay: each step multiplies a weight
    by 1 - lr * decay with that optimizer's own learning rate. Frozen parameters are left out.
    lr_scales {name: factor} groups parameters by learning-rate multiplier (layer-wise decay);
    Muon groups also carry muon_lr / learning_rate, so one schedule drives both: the loop sets
    every group's lr to lr_at(it) * group['lr_scale']."""
    trainable = {plain_name(name): p for name, p in model.named_parameters() if p.requires_grad}
    hidden = {id(p) for p in model.hidden_matrices()} if cfg.optimizer == "muon" else set()
    groups = {}
    for name, p in trainable.items():
        muon, decay = id(p) in hidden, p.dim() >= 2
        muon_scale = cfg.muon_lr / cfg.learning_rate if muon and cfg.learning_rate else 1.0  # (lr 0: all 0 anyway)
        scale = (lr_scales[name] if lr_scales else 1.0) * muon_scale
        weight_decay = (cfg.muon_weight_decay if muon else cfg.weight_decay) if decay else 0.0
        group = groups.setdefault((muon, decay, scale), {"params": [], "lr_scale": scale, "weight_decay": weight_decay})
        group["params"].append(p)
    adamw_groups = [g for (muon, *_), g in sorted(groups.items()) if not muon]
    muon_groups = [g for (muon, *_), g in sorted(groups.items()) if muon]
    in_groups = [id(p) for g in adamw_groups + muon_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(map(id, trainable.values())), "every parameter in exactly one group"
    if model.config.attn_backend == "flex" and device.type == "cpu":
        raise ConfigError("attn_backend=flex cannot train on a CPU (FlexAttention has no CPU backward pass in "
                          "this torch); train with attn_backend=sdpa, or on a GPU")
    optimizers = []
    if adamw_groups:
        optimizers.append(torch.optim.AdamW(adamw_groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                            fused=device.type == "cuda"))
    if muon_groups:
        optimizers.append(Muon(muon_groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps))
    if not optimizers:
        raise ConfigError("no parameter is left to train (check freeze and lora_targets)")
    return optimizers[0] if len(optimizers) == 1 else CombinedOptimizer(*optimizers)


def lr_at(it, cfg, max_iters):
    """Learning rate for step `it`: linear warmup, then cosine or warmup-stable-decay to min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if cfg.lr_schedule == "wsd":
        decay_start = max_iters - int(cfg.decay_frac * max_iters)
        if it < decay_start:
            return cfg.learning_rate
        frac = (it - decay_start) / max(1, max_iters - decay_start)
        return cfg.learning_rate + frac * (cfg.min_lr - cfg.learning_rate)
    frac = min(1.0, (it - cfg.warmup_iters) / max(1, max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.learning_rate - cfg.min_lr)


if __name__ == "__main__":
    train(cli_config())
