"""
First Folio spelling -> modern spelling: a "translation" task set aligned speech by speech.

    python prepare/folio.py        -> data/shakespeare_folio/{train,val,test}.jsonl + stats.json

Records are {"prompt": folio speech, "completion": the same speech in modern spelling, "work": ...},
split by play exactly like the language-modelling data (test plays unseen in training).

How speeches are paired, per play:
  1. Parse speeches. Modern text: a block after a blank line whose first line is a speaker tag
     ("HAMLET." / "Hor." / "THESEUS") alone; stage directions in [brackets] are dropped. Folio text: an
     indented line "  Hor. text..." opens a speech; a line "Enter ..."/"Exit"/"Exeunt" ends it.
  2. Normalise words so old and new spellings of a word coincide (v->u, j->i, y->i, no final e,
     no doubled letters: "loue"/"love" -> "lou", "vs"/"us" -> "us").
  3. Align the two plays' word sequences with difflib's matcher (longest common blocks).
  4. Keep a (folio speech, modern speech) pair when each is the other's best partner and the
     aligned words cover at least MIN_COVER of both: one-to-one matches only.
The copy baseline (output = input) is the bar a model must beat; evaluate.py reports it.
"""

import difflib
import os
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exits  # noqa: E402,F401  from here on a signal or a failed write ends the program with one line
from data import task_dir_of  # noqa: E402
from prepare.common import TASK_SET_FILES, refuse_existing_dataset, run_main, write_jsonl_splits  # noqa: E402
from prepare.shakespeare import WORKS, read_texts, split_of  # noqa: E402

MIN_COVER = 0.5
# "HAMLET." / "Hor." / "First Lord." -- or, in A Midsummer Night's Dream, capitals with no period
MODERN_TAG = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3}\.|[A-Z][A-Z'\-]+(?: [A-Z'\-]+){0,3})$")
FOLIO_TAG = re.compile(r"^\s+([A-Z][A-Za-z'\-]*(?: [A-Z][A-Za-z'\-]*)?)[.:]\s+(\S.*)$")
FOLIO_DIRECTION = re.compile(r"^\s*(Enter|Exit|Exeunt|Manet|Flourish|Alarum|Sennet|Actus|Scena|Scoena)\b")


def modern_speeches(text):
    speeches = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if len(lines) >= 2 and MODERN_TAG.match(lines[0].strip()):
            speech = re.sub(r"\[[^\]]*\]", "", "\n".join(lines[1:]))
            speech = "\n".join(line.strip() for line in speech.split("\n") if line.strip())
            if speech:
                speeches.append(speech)
    return speeches


def folio_speeches(text):
    speeches, current = [], None
    for line in text.split("\n"):
        tag = FOLIO_TAG.match(line)
        if tag:
            current = [tag.group(2).strip()]
            speeches.append(current)
        elif current is not None and (not line.strip() or FOLIO_DIRECTION.match(line)):
            current = None  # a blank line or a stage direction ends the speech
        elif current is not None:
            current.append(line.strip())
    return ["\n".join(s) for s in speeches]


def norm_word(word):
    w = word.lower().replace("v", "u").replace("j", "i").replace("y", "i")
    w = re.sub(r"(.)\1", r"\1", w)
    return w[:-1] if len(w) > 2 and w.endswith("e") else w


def words_with_owner(speeches):
    words, owner = [], []
    for i, speech in enumerate(speeches):
        for w in re.findall(r"[A-Za-z]+", speech):
            words.append(norm_word(w))
            owner.append(i)
    return words, owner


def align_play(fol, mod):
    """[(i, j)]: folio speech i and modern speech j are the same speech (one-to-one pairs only)."""
    fw, fo = words_with_owner(fol)
    mw, mo = words_with_owner(mod)
    shared = Counter()
    matcher = difflib.SequenceMatcher(None, fw, mw, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        for k in range(size):
            shared[fo[a + k], mo[b + k]] += 1
    f_len, m_len = Counter(fo), Counter(mo)
    best_f, best_m = {}, {}  # each speech's partner with the most shared words
    for (f, m), n in shared.items():
        if n > best_f.get(f, (0, None))[0]:
            best_f[f] = (n, m)
        if n > best_m.get(m, (0, None))[0]:
            best_m[m] = (n, f)
    pairs = []
    for f, (n, m) in sorted(best_f.items()):
        if best_m[m][1] == f and n >= MIN_COVER * f_len[f] and n >= MIN_COVER * m_len[m]:
            pairs.append((f, m))
    return pairs


def folio_splits(cache_dir):
    modern, folio = read_texts(cache_dir), read_texts(cache_dir, folio=True)
    plays = [(work, folio_name) for work, (_, folio_name) in sorted(WORKS.items()) if folio_name]
    speeches = [(folio_speeches(folio[f]), modern_speeches(modern[w])) for w, f in plays]
    # plays align independently; map keeps their order. (Not multiprocessing.Pool: its exit,
    # terminate(), can hang on a worker that misses the SIGTERM; see prepare/text.py.)
    with ProcessPoolExecutor() as pool:
        aligned = list(pool.map(align_play, *zip(*speeches)))
    splits = {"train": [], "val": [], "test": []}
    per_play = {}
    for (work, _), (fol, mod), pairs in zip(plays, speeches, aligned):
        per_play[work] = len(pairs)
        splits[split_of(work)] += [{"prompt": fol[i], "completion": mod[j], "work": work} for i, j in pairs]
    stats = {"pairs": {s: len(r) for s, r in splits.items()}, "pairs_per_play": per_play,
             "identical_pairs": sum(r["prompt"] == r["completion"] for rs in splits.values() for r in rs)}
    return splits, stats


def prepare(cfg):
    task_dir = task_dir_of(cfg, "folio")
    refuse_existing_dataset(task_dir, cfg.overwrite, TASK_SET_FILES, key="task_dir")
    write_jsonl_splits(task_dir, *folio_splits(cfg.cache_dir))


def main():
    from config import cli_config
    prepare(cli_config())


if __name__ == "__main__":
    run_main(main)
