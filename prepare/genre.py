"""
Genre classification task set: passages of Shakespeare's plays labelled comedy / history / tragedy.

    python prepare/genre.py        -> data/shakespeare_genre/{train,val,test}.jsonl + stats.json

Each play is cut into consecutive passages of PASSAGE_LINES non-blank lines, each a JSON line
{"text": ..., "label": ..., "work": ...}. Labels come from the First Folio grouping in
prepare/shakespeare.py's WORKS; the poems are left out. Splits are by work and identical to the
language-modelling splits, so test passages come from plays no model has seen in training.
"""

import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exits  # noqa: E402,F401  from here on a signal or a failed write ends the program with one line
from data import DataError, task_dir_of  # noqa: E402
from prepare.common import TASK_SET_FILES, refuse_existing_dataset, run_main, write_jsonl_splits  # noqa: E402
from prepare.shakespeare import WORKS, read_texts, split_of  # noqa: E402

PASSAGE_LINES = 20
LABELS = ("comedy", "history", "tragedy")


# where a play's body starts: its first act, prologue or induction. What comes before (title,
# dramatis personae) would give the label away ("THE TRAGEDY OF ...").
BODY_START = re.compile(r"^\s*((ACT|Act)\s+(1|I|FIRST)\b|PROLOGUE|Prologue|INDUCTION)")


def passages(text):
    """Consecutive runs of PASSAGE_LINES non-blank lines of the play's body (a short tail is dropped)."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if BODY_START.match(line)), None)
    if start is None:
        raise DataError("a play without an act or prologue heading; the genre task cannot find its body")
    lines = [line for line in lines[start:] if line.strip()]
    return ["\n".join(lines[i:i + PASSAGE_LINES]) for i in range(0, len(lines) - PASSAGE_LINES + 1, PASSAGE_LINES)]


def genre_splits(cache_dir):
    texts = read_texts(cache_dir)
    splits = {"train": [], "val": [], "test": []}
    for work in sorted(WORKS):
        genre = WORKS[work][0]
        if genre in LABELS:
            splits[split_of(work)] += [{"text": p, "label": genre, "work": work} for p in passages(texts[work])]
    stats = {split: dict(sorted(Counter(r["label"] for r in records).items())) for split, records in splits.items()}
    return splits, {"class_counts": stats, "passage_lines": PASSAGE_LINES, "labels": list(LABELS)}


def prepare(cfg):
    task_dir = task_dir_of(cfg, "genre")
    refuse_existing_dataset(task_dir, cfg.overwrite, TASK_SET_FILES, key="task_dir")
    write_jsonl_splits(task_dir, *genre_splits(cfg.cache_dir))


def main():
    from config import cli_config
    prepare(cli_config())


if __name__ == "__main__":
    run_main(main)
