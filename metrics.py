"""
What a run reports: metrics.jsonl (one JSON object per log line or evaluation, appended; a
resume cuts it back to its checkpoint), loss.png, optional wandb, and a progress bar that the
log lines print around.
"""

import json
import os
import sys
import time
import warnings

import torch

from errors import DataError, TrainingDiverged
from files import atomic_write


class Throughput:
    """Tokens per second between log lines, and MFU: the share of the devices' peak FLOPs the
    training uses (None where the peak is unknown: CPU, MPS)."""

    def __init__(self, tokens, flops_per_token, peak, world):
        self.flops_per_token, self.peak, self.world = flops_per_token, peak, world
        self.t0, self.tokens = time.time(), tokens

    def measure(self, tokens):
        """(tokens per second, MFU) since the last measure(); tokens: the count so far, all processes."""
        now = time.time()
        tokens_per_s = (tokens - self.tokens) / (now - self.t0)
        self.t0, self.tokens = now, tokens
        mfu = self.flops_per_token * tokens_per_s / (self.peak * self.world) if self.peak else None
        return tokens_per_s, mfu

    def pause(self):
        """Start the clock again: the time since the last measure() was not spent training."""
        self.t0 = time.time()


class DivergenceWatch:
    """Notices the first step whose loss or gradient norm is not finite, without reading anything
    back to the host at every step (a few tiny device ops instead); check() reads it at log and
    evaluation steps, before anything is logged or saved, so a diverged run stops there and its
    last checkpoint keeps finite weights. Under float16 an infinite gradient norm is no alarm: the
    loss scaler skips that step and lowers the scale."""

    def __init__(self, device, fp16):
        self.fp16 = fp16
        self.first = torch.full((), -1, dtype=torch.long, device=device)  # iteration of the first bad step
        self.values = torch.zeros(2, device=device)                         # its loss and gradient norm

    def step(self, it, loss, grad_norm):
        values = torch.stack([loss.float(), grad_norm.float()])
        bad = ~torch.isfinite(values[0] if self.fp16 else values).all()
        new = bad & (self.first < 0)
        self.first = torch.where(new, it, self.first)
        self.values = torch.where(new, values, self.values)

    def check(self, world):
        """Raise TrainingDiverged on every process if any process saw a bad step."""
        first = self.first.clone()
        if world > 1:  # every process must stop: a bad loss on one rank is everyone's problem
            import torch.distributed as torch_dist
            torch_dist.all_reduce(first, op=torch_dist.ReduceOp.MAX)
        if first.item() >= 0:
            loss, grad_norm = self.values.tolist()
            raise TrainingDiverged(f"training diverged at iteration {first.item()}: loss {loss}, gradient norm "
                                   f"{grad_norm}; nothing was saved after it (ckpt_last holds the last finite "
                                   f"weights). Lower learning_rate, set grad_clip (e.g. 1.0) or use bfloat16, "
                                   f"then resume or start again")


def describe_run(cfg, model, world, it, max_iters, epochs_per_iter):
    """What a run is about to do, in three lines (the master's)."""
    print(f"model: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(embeddings=False) / 1e6:.2f}M "
          f"without embeddings)")
    print(f"global batch: {cfg.batch_size} x {cfg.gradient_accumulation_steps} micro-batches (shared by {world} "
          f"processes) of {cfg.block_size} tokens; max_iters {max_iters} = {max_iters * epochs_per_iter:.2f} epochs")
    if it >= max_iters:
        print(f"{cfg.out_dir} is already at iteration {it} of max_iters={max_iters}: nothing to train; set a higher "
              f"max_iters (or epochs) to go on")


def describe_end(out_dir, device):
    """The run's last lines: peak GPU memory, and where its results are."""
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    kept = [name for name in ("ckpt_best.pt", "ckpt_best.dcp", "ckpt_last.pt", "ckpt_last.dcp", "metrics.jsonl",
                              "loss.png") if os.path.exists(os.path.join(out_dir, name))]
    print(f"done: {out_dir}/ holds {', '.join(kept)}")


def lower_is_better(metric):
    """Losses (val_loss, each multi-token head's val_headN, each mixed dataset's val_loss_FOLDER)
    fall as a model improves; the tasks' other metrics (accuracy, F1, reward) rise."""
    return metric == "val_loss" or metric.startswith(("val_head", "val_loss_"))


class MetricsLogger:
    """metrics.jsonl (one JSON object per log/eval), loss.png, optional wandb, overfit warning."""

    def __init__(self, cfg, master, start_iter):
        self.cfg, self.master = cfg, master
        self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.evals = []  # (iter, train_loss, val_loss) for the plot and the overfitting check
        self.wandb = None
        self.t0 = time.time()  # records carry elapsed_s: seconds since this process started training
        if not master:
            return
        if start_iter == 0 and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh log; a resumed one appends
        elif os.path.exists(self.path):
            self.evals = [(r["iter"], r["train_loss"], r["val_loss"]) for r in self.rows_until(start_iter)
                          if r["kind"] == "eval"]
        if cfg.wandb_log:
            self.wandb = start_wandb(cfg)

    def rows_until(self, start_iter):
        """Keep only the log's rows up to the checkpoint a resume starts from: a crashed run logged
        steps past its last save, which the resumed run logs again."""
        rows = read_metrics(self.path)
        kept = [r for r in rows if r["iter"] <= start_iter]
        with open(self.path) as f:
            torn = not f.read().endswith("\n")  # a crash during a write cut the last line short
        if len(kept) < len(rows) or torn:
            with atomic_write(self.path) as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        return kept

    def _write(self, record):
        if not self.master:
            return
        record["elapsed_s"] = round(time.time() - self.t0, 2)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            numbers = {k: v for k, v in record.items() if k not in ("kind", "iter", "elapsed_s")}
            self.wandb.log(numbers, step=record["iter"])

    def train(self, it, loss, lr, grad_norm, tokens, tokens_per_s, mfu, extra=None):
        """tokens: every token trained on so far, over all processes (runs compare by it); extra:
        the task's own numbers (task=rl: the mean sampled reward)."""
        extra = extra or {}
        self._write({"kind": "train", "iter": it, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                     "tokens_per_s": tokens_per_s, "mfu": mfu, **extra})
        if self.master:
            mfu_text = f", mfu {mfu * 100:.1f}%" if mfu is not None else ""
            shown = "".join(f", {k} {v:.4f}" for k, v in extra.items())
            progress_write(f"iter {it}: loss {loss:.4f}{shown}, lr {lr:.2e}, grad norm {grad_norm:.2f}, "
                           f"{tokens_per_s:,.0f} tok/s{mfu_text}")

    def eval(self, it, results, best):
        """results: 'train' and 'val' losses plus any task metrics (val_accuracy, ...)."""
        extra = {k: v for k, v in results.items() if k not in ("train", "val")}
        self._write({"kind": "eval", "iter": it, "train_loss": results["train"], "val_loss": results["val"], **extra})
        if not self.master:
            return
        self.evals.append((it, results["train"], results["val"]))
        shown = "".join(f", {k} {v:.4f}" for k, v in extra.items())
        mark = " (best)" if best else ""
        progress_write(f"eval {it}: train {results['train']:.4f}, val {results['val']:.4f}{shown}{mark}")
        n = self.cfg.overfit_patience
        recent = self.evals[-(n + 1):]
        if n > 0 and len(recent) == n + 1 and all(b[2] > a[2] and b[1] < a[1] for a, b in zip(recent, recent[1:])):
            progress_write(f"warning: val loss rose {n} evaluations in a row while train loss fell: overfitting. "
                           f"ckpt_best.pt holds the best weights; consider more dropout or stopping.")
        if self.cfg.plot:
            try:
                plot_losses(self.path, os.path.join(self.cfg.out_dir, "loss.png"))
            except OSError as e:  # a plot is no reason to stop training (a full disk stops the next save)
                progress_write(f"warning: could not write {self.cfg.out_dir}/loss.png ({e.strerror or e}); "
                               f"training goes on")

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(cfg):
    """wandb is optional: offline unless WANDB_MODE says otherwise; any failure only warns."""
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        import wandb
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=cfg.to_dict(), dir=cfg.out_dir)
    except Exception as e:
        warnings.warn(f"wandb disabled: {type(e).__name__}: {e}")
        return None


def read_metrics(path):
    """metrics.jsonl's rows; a line cut short by a crash is skipped. A row this project did not
    write (not an object with kind and iter) is a DataError naming the line: a resume would
    otherwise rewrite the file without it."""
    rows = []
    with open(path, errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            ours = isinstance(row, dict) and row.get("kind") in ("train", "eval") and isinstance(row.get("iter"), int)
            if not ours:
                raise DataError(f"{path}:{lineno}: not a row of this project's metrics log; move the file away "
                                f"(or fix the line) and rerun")
            rows.append(row)
    return rows


def plot_losses(metrics_path, png_path):
    """Train and val loss against iteration, written atomically to png_path. The best val loss
    (ckpt_best.pt) is marked; if val loss ended above its best, the stretch after the best
    evaluation is shaded as overfitting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    train = [(r["iter"], r["loss"]) for r in rows if r["kind"] == "train"]
    evals = [(r["iter"], r["train_loss"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    rewards = [(r["iter"], r["reward"]) for r in rows if r["kind"] == "train" and "reward" in r]
    bias = [(r["iter"], r["bias_gap"], r["bias_ci95_low"], r["bias_ci95_high"]) for r in rows if "bias_gap" in r]
    panels = 1 + bool(rewards) + bool(bias)  # task=rl's rewards and bias_file's gap below the loss
    fig, axes = plt.subplots(panels, 1, figsize=(7, 4 + 2.5 * (panels - 1)), sharex=True, squeeze=False)
    ax, below = axes[0, 0], list(axes[1:, 0])
    if rewards:
        plot_rewards(below.pop(0), rewards, [(r["iter"], r["val_reward"]) for r in rows if "val_reward" in r])
    if bias:
        plot_bias(below.pop(0), bias)
    if train:
        ax.plot(*zip(*train), color="tab:blue", alpha=0.35, lw=1, label="train (batch)")
    if evals:
        its, tr, va = zip(*evals)
        ax.plot(its, tr, "o-", color="tab:blue", label="train (eval)")
        ax.plot(its, va, "o-", color="tab:orange", label="val")
        best = min(range(len(va)), key=va.__getitem__)
        ax.plot(its[best], va[best], "*", color="tab:red", ms=14, label=f"best val {va[best]:.4f} (ckpt_best.pt)")
        if best < len(va) - 1:
            ax.axvspan(its[best], its[-1], color="tab:red", alpha=0.08, label="val above its best: overfitting")
    ax.set_xlabel("iteration")
    ax.set_ylabel("policy loss; evals: minus the reward" if rewards else "cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def plot_rewards(ax, sampled, greedy):
    """task=rl's panel of loss.png: the mean reward of the sampled completions at each log line,
    and of greedy completions of the val prompts at each evaluation."""
    ax.plot(*zip(*sampled), color="tab:green", alpha=0.5, lw=1, label="train (sampled completions)")
    if greedy:
        ax.plot(*zip(*greedy), "o-", color="tab:purple", label="val (greedy completions)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_bias(ax, bias):
    """bias_file's panel of loss.png: the mean gap log p(a) - log p(b) at each evaluation, with its
    95% bootstrap interval as a band; 0 is no preference."""
    its, gap, low, high = zip(*bias)
    ax.plot(its, gap, "o-", color="tab:brown", label="mean gap log p(a) - log p(b)")
    ax.fill_between(its, low, high, color="tab:brown", alpha=0.2, label="95% interval")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("bias probe (nats)")
    ax.grid(alpha=0.3)
    ax.legend()


_pbar = None


def progress_bar(total, initial, master):
    global _pbar
    from tqdm import tqdm
    # on a terminal only: redirected to a log, the redraws would fill it (the log lines say the same)
    _pbar = tqdm(total=total, initial=initial, disable=not master or not sys.stderr.isatty(), unit="it",
                 dynamic_ncols=True)
    return _pbar


def progress_write(text):
    """Print a line without breaking the progress bar."""
    if _pbar is not None and not _pbar.disable:
        _pbar.write(text)
    else:
        print(text)
