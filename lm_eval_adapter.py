"""
Our checkpoints inside EleutherAI's lm-evaluation-harness (optional dependency: pip install lm-eval).

    python evaluate.py --out_dir=out/run --eval_task=harness --harness_tasks=my_task --harness_include=tasks/

HarnessLM implements the harness's three requests on top of the scoring in scoring.py:
  loglikelihood          log p(continuation | context) and whether greedy decoding yields it
  loglikelihood_rolling  a whole document's log-likelihood, sliding window as in eval_task=lm
  generate_until         KV-cache decoding until a stop string, end-of-text or max_gen_toks
An empty context is the end-of-text token, which opens every document in our training data.
"""

import os

import numpy as np
from lm_eval.api.model import LM

from errors import ConfigError
from generate import generate
from scoring import continuation_score, lm_metrics


class HarnessLM(LM):
    def __init__(self, model, tok, device, batch_size=8, max_gen_toks=256):
        super().__init__()
        self.model, self.tok, self._device = model, tok, device
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks

    def _context(self, text):
        return [self.tok.eot_id] + self.tok.encode(text) if text else [self.tok.eot_id]

    def loglikelihood(self, requests):
        return [continuation_score(self.model, self._context(ctx), self.tok.encode(cont), self._device)
                for ctx, cont in (r.args for r in requests)]

    def loglikelihood_rolling(self, requests):
        out = []
        for (text,) in (r.args for r in requests):
            ids = np.array(self._context(text), dtype=np.int64)
            stride = max(1, self.model.config.block_size // 2)
            total, _, _ = lm_metrics(self.model, ids, stride, self.batch_size, self._device, progress=False)
            out.append(-total)
        return out

    def generate_until(self, requests):
        out = []
        for context, kw in (r.args for r in requests):
            until = kw.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            temperature = kw.get("temperature", 0.0) if kw.get("do_sample", False) else 0.0
            new = generate(self.model, [self._context(context)], kw.get("max_gen_toks", self.max_gen_toks),
                           temperature, stop_ids={self.tok.eot_id},
                           should_stop=lambda ids: any(u in self.tok.decode(ids) for u in until))[0]
            text = self.tok.decode([t for t in new if t != self.tok.eot_id])
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def run_harness(model, tok, cfg, device):
    """Evaluate cfg.harness_tasks; returns {task: {metric: value}} (numbers only)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    if not cfg.harness_tasks:
        raise ConfigError("eval_task=harness needs harness_tasks=name[,name...]")
    if cfg.harness_include and not os.path.isdir(cfg.harness_include):
        raise ConfigError(f"harness_include={cfg.harness_include}: no such folder of task YAML files")
    manager = TaskManager(include_path=cfg.harness_include or None)
    unknown = [t for t in cfg.harness_tasks.split(",") if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"harness_tasks: no lm-evaluation-harness task named {', '.join(unknown)}; check the "
                          f"name, or point harness_include at the folder of its YAML file")
    results = simple_evaluate(model=HarnessLM(model, tok, device, cfg.batch_size, cfg.max_new_tokens),
                              tasks=cfg.harness_tasks.split(","), task_manager=manager,
                              limit=cfg.max_examples or None, log_samples=False)
    return {task: {k.replace(",none", ""): v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in results["results"].items()}
