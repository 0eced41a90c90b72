"""
Preference pairs for DPO: modern spelling chosen over First Folio spelling, the same words.

    python prepare/folio_preferences.py
    -> data/shakespeare_folio_preferences/{train,val,test,test_choice}.jsonl + stats.json

From the speech pairs of prepare/folio.py (the same play-level splits: test plays unseen), each
record is {"prompt": the end of the speech before and a newline, "chosen": a modern speech, "rejected": that
speech with every word whose Folio spelling differs ("serve" -> "serue", "ten" -> "tenne")
spelled the Folio's way, "work", "swaps"}. Only spelling differs between chosen and rejected:
punctuation, line breaks and word choice are the modern text's in both, so a preference learned
from these pairs is a preference for modern spelling. Speeches longer than MAX_SPEECH characters
or without any spelling difference are left out. test_choice.jsonl holds the test pairs as
{"context", "choices": [chosen, rejected], "answer": 0} for evaluate.py eval_task=choice: its
accuracy is the share of held-out pairs where the model finds modern spelling likelier.
"""

import difflib
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exits  # noqa: E402,F401  from here on a signal or a failed write ends the program with one line
from data import task_dir_of  # noqa: E402
from prepare.common import TASK_SET_FILES, refuse_existing_dataset, run_main  # noqa: E402
from prepare.common import write_jsonl_splits  # noqa: E402
from prepare.folio import folio_splits, norm_word  # noqa: E402

MAX_SPEECH = 80   # characters: prompt + chosen fit a 128-character context
CONTEXT = 40      # characters of the speech before, cut at a word boundary
WORD = re.compile(r"[A-Za-z]+")


def folio_spelled(modern, folio):
    """(modern text with the Folio's spelling of each word the two align on, words swapped).
    Words align when they normalise alike (prepare.folio.norm_word) inside a matching run."""
    m_words, f_words = list(WORD.finditer(modern)), WORD.findall(folio)
    matcher = difflib.SequenceMatcher(None, [norm_word(w[0]) for w in m_words], [norm_word(w) for w in f_words],
                                      autojunk=False)
    out, last, swaps = [], 0, 0
    for a, b, size in matcher.get_matching_blocks():
        for k in range(size):
            word, old = m_words[a + k], f_words[b + k]
            if old.lower() != word[0].lower():  # the modern word's capitalisation, the Folio's letters
                respelled = old[0].upper() + old[1:].lower() if word[0][0].isupper() else old.lower()
                out += [modern[last:word.start()], respelled]
                last, swaps = word.end(), swaps + 1
    return "".join(out) + modern[last:], swaps


def context_before(previous):
    """The last CONTEXT characters of the previous speech, starting at a word."""
    tail = previous.replace("\n", " ")[-CONTEXT:]
    return tail[tail.find(" ") + 1:] if len(previous) > CONTEXT and " " in tail else tail


def preference_splits(cache_dir):
    speech_pairs, _ = folio_splits(cache_dir)
    splits, swapped = {}, {}
    for split, rows in speech_pairs.items():
        records, previous = [], {}
        for r in rows:
            modern, work = r["completion"], r["work"]
            before = previous.get(work)
            previous[work] = modern
            if before is None or len(modern) > MAX_SPEECH:
                continue
            rejected, swaps = folio_spelled(modern, r["prompt"])
            if rejected != modern:
                records.append({"prompt": context_before(before) + "\n", "chosen": modern, "rejected": rejected,
                                "work": work, "swaps": swaps})
        splits[split], swapped[split] = records, sum(r["swaps"] for r in records)
    # the held-out pairs as a two-way choice for evaluate.py eval_task=choice, which reads the
    # context as end-of-text + context: what task=dpo shows the model with prompt_template="{prompt}"
    splits["test_choice"] = [{"context": r["prompt"], "choices": [r["chosen"], r["rejected"]], "answer": 0}
                             for r in splits["test"]]
    return splits, {"pairs": {s: len(r) for s, r in splits.items()}, "words_respelled": swapped,
                    "max_speech_chars": MAX_SPEECH, "context_chars": CONTEXT}


def prepare(cfg):
    task_dir = task_dir_of(cfg, "folio_preferences")
    refuse_existing_dataset(task_dir, cfg.overwrite, TASK_SET_FILES, key="task_dir")
    write_jsonl_splits(task_dir, *preference_splits(cfg.cache_dir))


def main():
    from config import cli_config
    prepare(cli_config())


if __name__ == "__main__":
    run_main(main)
