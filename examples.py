"""
Task files into examples: JSONL records read with errors that name the line, a prompt shown
to the model the same way in fine-tuning and evaluation, and the (x, y) rows each task trains
on, targets of -1 wherever nothing is to be learned (the prompt, the padding).
"""

import functools
import importlib
import json
import math
import numbers
import os
import string
import sys

import torch

from data import DataError, task_dir_of
from errors import ConfigError

# ----------------------------------------------------------------------------- task files

# what each field of a task file holds (a label: a name or a number; bool is no number here)
FIELD_KINDS = {"text": str, "prompt": str, "completion": str, "chosen": str, "rejected": str, "context": str,
               "a": str, "b": str, "label": (str, int), "choices": list, "answer": int, "messages": list}


def read_jsonl(path, fields, max_examples=0):
    """Records of a JSONL file, each a JSON object with `fields` of the kinds FIELD_KINDS says;
    errors name the line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such task file (set task_file or task_dir)")
    rows = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 (byte {e.start}); save it as UTF-8") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: a record is a JSON object with {', '.join(fields)}; "
                            f"this line holds a {type(row).__name__}")
        missing = [k for k in fields if k not in row]
        if missing:
            raise DataError(f"{path}:{lineno}: missing field {missing[0]!r} (needs {', '.join(fields)})")
        for name in fields:
            kind, value = FIELD_KINDS.get(name, object), row[name]
            if isinstance(value, bool) or not isinstance(value, kind):
                wanted = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise DataError(f"{path}:{lineno}: field {name!r} must be a {wanted}, not {json.dumps(value)[:40]}")
        rows.append(row)
        if max_examples and len(rows) == max_examples:
            break
    if not rows:
        raise DataError(f"{path}: empty task file")
    kinds = {type(r["label"]).__name__ for r in rows} if "label" in fields else set()
    if len(kinds) > 1:
        raise DataError(f"{path}: labels mix {' and '.join(sorted(kinds))}; give every label as a name (or every "
                        f"one as a number)")
    return rows


def read_bias_pairs(path, max_examples=0):
    """A counterfactual pair file (evaluate.py eval_task=bias, train.py bias_file): rows {"a", "b"}
    of two different non-empty sentences (other fields kept)."""
    rows = read_jsonl(path, ["a", "b"], max_examples)
    for i, r in enumerate(rows, 1):
        if not all(isinstance(r[k], str) and r[k].strip() for k in "ab") or r["a"] == r["b"]:
            raise DataError(f"{path}: record {i}: 'a' and 'b' must be two different, non-empty sentences")
    return rows


def task_path(cfg, default_task):
    """cfg.task_file, or the eval_split file of the task set (task_dir or its default folder)."""
    return cfg.task_file or os.path.join(task_dir_of(cfg, default_task), f"{cfg.eval_split}.jsonl")


def prompt_ids(tok, template, prompt):
    """What a model reads before its answer, in fine-tuning and evaluation alike: end-of-text
    (a document starts here, as in pretraining) and the prompt shown through the template."""
    check_template(template)
    return [tok.eot_id] + tok.encode(template.format(prompt=prompt))


@functools.lru_cache(maxsize=8)
def check_template(template):
    """prompt_template must show the prompt, once or more, and nothing else: without {prompt}
    every example would train on the same text; another {name} has no value to fill it."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:  # a lone { or }
        raise ConfigError(f"prompt_template={template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    if names != {"prompt"}:
        raise ConfigError(f"prompt_template={template!r} must contain {{prompt}}" +
                          (f" and no other field (it has {', '.join(sorted(names - {'prompt'}))})"
                           if names - {"prompt"} else ""))


def keep_last(ids, block_size):
    """ids cropped to their last block_size tokens, and whether anything was cut."""
    return ids[-block_size:], len(ids) > block_size


# ----------------------------------------------------------------------------- examples

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


def classify_batch(rows, pad_id):
    """[(ids, label)] -> (idx (B, T) right-padded, lengths (B,), labels (B,))."""
    x, _ = pad_batch([(ids, []) for ids, _ in rows], pad_id)
    return x, torch.tensor([len(ids) for ids, _ in rows]), torch.tensor([label for _, label in rows])


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


def rl_prompts(path, tok, cfg):
    """[(prompt text, prompt ids)] per record, each leaving max_new_tokens of room in the context."""
    rows = read_jsonl(path, ["prompt"], cfg.max_examples)
    prompts = [(r["prompt"], fitting_prompt(tok, cfg, path, i, r["prompt"], cfg.max_new_tokens))
               for i, r in enumerate(rows, 1)]
    kept = [p for p in prompts if p[1] is not None]
    report_skipped(path, len(rows), len(rows) - len(kept), 0, cfg, kept)
    return kept



# ----------------------------------------------------------------------------- rewards

def reward_function(spec):
    """reward='module:function' -> a callable (prompt, completion) -> float that checks what the
    user's function returns. The module is imported from the Python path (the current folder
    included); any failure is a DataError naming the spec."""
    module_name, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except ImportError as e:
        raise DataError(f"reward={spec}: cannot import {module_name} ({e}); put it on the Python path "
                        f"(PYTHONPATH) or in the current folder") from None
    except AttributeError:
        raise DataError(f"reward={spec}: module {module_name} has no function {name}") from None

    def score(prompt, completion):
        try:
            value = fn(prompt, completion)
        except Exception as e:
            raise DataError(f"reward={spec} raised {type(e).__name__}: {e} (prompt {prompt!r}, completion "
                            f"{completion!r}); a reward function must return a number for any completion") from None
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise DataError(f"reward={spec} returned {value!r} for prompt {prompt!r}, completion {completion!r}; "
                            f"it must return a finite number")
        return float(value)
    return score
