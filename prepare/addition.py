"""
Multi-digit addition as text: a task whose answers can be checked exactly, for SFT and then RL.

    python prepare/addition.py     -> data/shakespeare_addition/{train,val,test}.jsonl + stats.json

Records are {"prompt": "123 plus 45", "completion": "168"}: two numbers below 10**DIGITS drawn
at random with a fixed seed; no problem appears in two splits. Prompts use only characters the
Shakespeare character vocabulary has (digits, letters, spaces), so a model pretrained on it can
learn the task. reward() below is the verifiable reward finetune.py task=rl calls:

    python finetune.py configs/rl_addition.py     # reward = "prepare.addition:reward"
"""

import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exits  # noqa: E402,F401  from here on a signal or a failed write ends the program with one line
from data import task_dir_of  # noqa: E402
from prepare.common import TASK_SET_FILES, refuse_existing_dataset, run_main  # noqa: E402
from prepare.common import write_jsonl_splits  # noqa: E402

DIGITS = 2
SIZES = {"train": 8_000, "val": 200, "test": 500}  # of the 10,000 problems with DIGITS = 2
PROBLEM = re.compile(r"^(\d+) plus (\d+)$")


def reward(prompt, completion):
    """1.0 when the completion is exactly the sum (surrounding spaces aside), else 0.0."""
    match = PROBLEM.match(prompt.strip())
    if match is None:
        raise ValueError(f"not an addition problem: {prompt!r} (expected 'A plus B')")
    return float(completion.strip() == str(int(match[1]) + int(match[2])))


def addition_splits(seed=1337):
    rng, seen = random.Random(seed), set()
    splits = {}
    for split, size in SIZES.items():
        rows = []
        while len(rows) < size:
            a, b = rng.randrange(10 ** DIGITS), rng.randrange(10 ** DIGITS)
            if (a, b) not in seen:  # every problem in one split only
                seen.add((a, b))
                rows.append({"prompt": f"{a} plus {b}", "completion": str(a + b)})
        splits[split] = rows
    return splits, {"problems": SIZES, "digits": DIGITS, "seed": seed}


def prepare(cfg):
    task_dir = task_dir_of(cfg, "addition")
    refuse_existing_dataset(task_dir, cfg.overwrite, TASK_SET_FILES, key="task_dir")
    write_jsonl_splits(task_dir, *addition_splits())


def main():
    from config import cli_config
    prepare(cli_config())


if __name__ == "__main__":
    run_main(main)
