"""
A conversation set built offline from what the project has, for finetune.py task=chat.

    python prepare/chat.py     -> data/shakespeare_chat/{train,val,test}.jsonl + stats.json

Two sources, each row {"messages": [{"role", "content"}, ...]} (conversation.py's format):
  - the plays' dialogue: within a scene, one speaker's speech is the user turn and the next
    speaker's reply the assistant turn, EXCHANGES exchanges in a row at most; the system message
    names the play, act and scene ("Hamlet, act 1, scene 1"). Speeches longer than MAX_SPEECH
    characters end a conversation (a small model's context is short), stage directions are
    dropped. Split by play, as the token data is (shakespeare.py's VAL_WORKS, TEST_WORKS).
  - the addition task (prepare/addition.py, its own splits): "12 plus 30" -> "42", a question
    with one right answer among the dialogue.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exits  # noqa: E402,F401  from here on a signal or a failed write ends the program with one line
from data import task_dir_of  # noqa: E402
from prepare.addition import addition_splits  # noqa: E402
from prepare.common import TASK_SET_FILES, refuse_existing_dataset, run_main, write_jsonl_splits  # noqa: E402
from prepare.shakespeare import WORKS, read_texts, split_of  # noqa: E402

EXCHANGES = 2
MAX_SPEECH = 200
ADDITION_ROWS = {"train": 2000, "val": 100, "test": 200}
# the texts' own variants: "ACT I.", "ACT 2.", "ACT 1", "ACT FIRST"; "Scene I.", "SCENE II", ...;
# speakers "Ber.", "First Clown.", "KING RICHARD." and (A Midsummer Night's Dream) "THESEUS"
ORDINALS = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}
ACT = re.compile(r"^ACT ([IVX]+|\d+|" + "|".join(ORDINALS) + r")\.?$", re.IGNORECASE)
SCENE = re.compile(r"^Scene ([IVX]+|\d+)\b", re.IGNORECASE)
SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{0,30}\.|[A-Z][A-Z' ]{1,30})$")
ROMAN = {"I": 1, "V": 5, "X": 10}


def roman(numeral):
    """'IV' -> 4 (and '4', 'FOURTH' -> 4)."""
    if numeral.isdigit() or numeral.upper() in ORDINALS:
        return int(numeral) if numeral.isdigit() else ORDINALS[numeral.upper()]
    values = [ROMAN[c] for c in numeral.upper()]
    return sum(-v if v < w else v for v, w in zip(values, values[1:] + [0]))


def scenes(text):
    """[(act, scene, [speech, ...])] of a play: each speech the text after a speaker's name."""
    out, act = [], 0
    for paragraph in text.split("\n\n"):
        lines = [line for line in paragraph.strip().split("\n") if line.strip()]
        if not lines:
            continue
        if ACT.match(lines[0]):
            act = roman(ACT.match(lines[0])[1])
        elif SCENE.match(lines[0]) and act:
            out.append((act, roman(SCENE.match(lines[0])[1]), []))
        elif out and len(lines) > 1 and SPEAKER.match(lines[0]):
            speech = re.sub(r"\[[^\]]*\]", "", "\n".join(lines[1:])).strip()  # no stage directions
            out[-1][2].append(speech)
        elif out and lines[0].startswith("["):
            out[-1][2].append(None)  # an entrance or exit: the conversation ends here
    return out


def conversations(title, text):
    """Rows of consecutive speeches, user and assistant in turn, up to EXCHANGES exchanges each."""
    rows = []
    for act, scene, speeches in scenes(text):
        system = {"role": "system", "content": f"{title}, act {act}, scene {scene}"}
        turns = []
        for speech in speeches + [None]:
            if speech and len(speech) <= MAX_SPEECH and len(turns) < 2 * EXCHANGES:
                turns.append({"role": "assistant" if len(turns) % 2 else "user", "content": speech})
                continue
            if len(turns) >= 2:
                rows.append({"messages": [system] + turns[:len(turns) // 2 * 2]})
            turns = [{"role": "user", "content": speech}] if speech and len(speech) <= MAX_SPEECH else []
    return rows


def chat_splits(cache_dir):
    texts = read_texts(cache_dir)
    splits = {"train": [], "val": [], "test": []}
    for work, (genre, _) in WORKS.items():
        if genre != "poem":
            title = work.replace("_", " ").title()
            splits[split_of(work)] += conversations(title, texts[work])
    dialogue = {split: len(rows) for split, rows in splits.items()}
    for split, rows in addition_splits()[0].items():
        splits[split] += [{"messages": [{"role": "user", "content": r["prompt"]},
                                        {"role": "assistant", "content": r["completion"]}]}
                          for r in rows[:ADDITION_ROWS[split]]]
    return splits, {"conversations_from_dialogue": dialogue, "addition": ADDITION_ROWS, "exchanges": EXCHANGES,
                    "max_speech_chars": MAX_SPEECH}


def prepare(cfg):
    task_dir = task_dir_of(cfg, "chat")
    refuse_existing_dataset(task_dir, cfg.overwrite, TASK_SET_FILES, key="task_dir")
    write_jsonl_splits(task_dir, *chat_splits(cfg.cache_dir))


def main():
    from config import cli_config
    prepare(cli_config())


if __name__ == "__main__":
    run_main(main)
