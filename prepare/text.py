"""
Your own text corpus through the same cleaning, tokenizing and splitting as the built-in data.

    python prepare/text.py --input=notes/,book.txt --data_dir=data/mine --tokenizer=sentencepiece

Each file is one document (folders are searched recursively for *.txt and *.md). Documents are
cleaned, exact duplicates dropped, optionally scrubbed of e-mail addresses, URLs and phone numbers
(--scrub_pii=True), then assigned to train / val / test by a hash of their text: the assignment
of a document never changes when others are added or removed, and no document is ever split.
"""

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare.common import (DataError, check_splits, clean_text, decode_utf8, dedup, run_main, scrub_pii,  # noqa: E402
                            write_dataset)
from tokenizer import build_tokenizer  # noqa: E402

TEXT_SUFFIXES = (".txt", ".md")


def find_files(inputs):
    if not inputs:
        raise DataError("no input given; pass --input=FILE_OR_FOLDER[,MORE]")
    files = []
    for item in inputs:
        if os.path.isfile(item):
            files.append(item)
        elif os.path.isdir(item):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs
                           if f.endswith(TEXT_SUFFIXES))
            if not found:
                raise DataError(f"--input={item}: folder has no {'/'.join(TEXT_SUFFIXES)} files")
            files.extend(found)
        else:
            raise DataError(f"--input={item}: no such file or folder")
    return files


def split_by_hash(text, val_fraction, test_fraction):
    """A stable pseudo-random position in [0, 1) from the document's own bytes."""
    u = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def text_splits(cfg):
    docs = []
    for path in find_files([p for p in cfg.input.split(",") if p]):
        with open(path, "rb") as f:
            text = clean_text(decode_utf8(f.read(), path))
        if text:
            docs.append((path, text))
    if not docs:
        raise DataError(f"--input={cfg.input}: the corpus is empty (no non-blank documents)")
    docs, duplicates = dedup(docs)
    scrubbed = 0
    if cfg.scrub_pii:
        cleaned = []
        for name, text in docs:
            text, n = scrub_pii(text)
            cleaned.append((name, text))
            scrubbed += n
        docs = cleaned
    splits = {"train": [], "val": [], "test": []}
    for name, text in docs:
        splits[split_by_hash(text, cfg.val_fraction, cfg.test_fraction)].append((name, text))
    return splits, {"duplicates_dropped": duplicates, "scrubbed_spans": scrubbed}


def main():
    from config import cli_config
    cfg = cli_config()
    if cfg.data_dir.startswith(os.path.join("data", f"{cfg.dataset}_")) and cfg.input:
        raise DataError("set --data_dir for your corpus (the default names the built-in dataset)")
    splits, stats = text_splits(cfg)
    check_splits(splits)
    tok = build_tokenizer(cfg, [text for _, text in splits["train"]])
    write_dataset(splits, tok, cfg, {"input": cfg.input}, stats)


if __name__ == "__main__":
    run_main(main)
