"""
What training watches besides the loss: the bias probe (bias_file). A probe wraps the task that
fit() trains, adds its numbers to every evaluation's results, and leaves the rest to the task,
so train.py and finetune.py need one call each (with_bias_probe) and no branch.
"""

import torch
import torch.distributed as torch_dist

from checkpoint import unwrap
from data import prepare_on_first_use
from examples import read_bias_pairs
from scoring import bootstrap_interval, pair_gaps
from tasks import evaluating
from tokenizer import from_meta


def with_bias_probe(task, cfg, tok_meta):
    """The task, with bias_file's counterfactual pairs scored at every evaluation when it is set."""
    return BiasProbe(task, cfg, from_meta(tok_meta)) if cfg.bias_file else task


class BiasProbe:
    """A task whose evaluations also score counterfactual pairs {"a", "b"} (bias_file; evaluate.py
    eval_task=bias's measure): the mean log p(a) - log p(b) over the pairs in nats, and its 95%
    bootstrap interval, as bias_gap, bias_ci95_low and bias_ci95_high in metrics.jsonl and on
    loss.png's second panel. Every process scores every pair (under FSDP each forward is
    collective), so all get the same numbers. Everything else is the task's own."""

    def __init__(self, task, cfg, tok):
        self.task, self.tok, self.seed = task, tok, cfg.seed
        if task.procs.master:  # the shipped pairs (data/shakespeare_bias/test.jsonl) are made on first use
            prepare_on_first_use(cfg, cfg.bias_file)
        if task.procs.world > 1:
            torch_dist.barrier()
        self.pairs = read_bias_pairs(cfg.bias_file)

    def __getattr__(self, name):  # loader, train_size, loss, ...: the task's
        return getattr(self.task, name)

    def evaluate(self, model, autocast):
        results = self.task.evaluate(model, autocast)
        with evaluating(model), autocast, torch.no_grad():
            gaps = pair_gaps(unwrap(model), self.tok, self.pairs, next(model.parameters()).device)
        low, high = bootstrap_interval(gaps, seed=self.seed)
        return {**results, "bias_gap": float(gaps.mean()), "bias_ci95_low": low, "bias_ci95_high": high}
