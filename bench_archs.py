"""
The three language-model architectures at the CPU quick start's budget, over several seeds:
the decoder (configs/shakespeare_char_cpu.py), the LSTM (configs/shakespeare_lstm_cpu.py) and
the gated CNN (configs/shakespeare_cnn_cpu.py). Each run trains with train.py, then
evaluate.py scores its best checkpoint on the whole validation split (sliding windows, not the
eval_iters sample training logs). Prints a Markdown table, mean ± sd over the seeds.

    python bench_archs.py                       # 3 seeds x 3 configs, about 15 minutes on 2 cores
    python bench_archs.py --seeds=1 --max_iters=200 --out=/tmp/archs

Runs go one at a time: wall time and tokens/s mean something only on an otherwise idle machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {"decoder": "configs/shakespeare_char_cpu.py", "LSTM": "configs/shakespeare_lstm_cpu.py",
           "gated CNN": "configs/shakespeare_cnn_cpu.py"}
HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd):
    done = subprocess.run([sys.executable, *cmd], cwd=HERE, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def one_run(config, seed, out, extra):
    """Train and evaluate one seed -> {parameters, val_loss, tokens_per_s, wall_s}."""
    t0 = time.time()
    log = run(["train.py", config, f"--out_dir={out}", f"--seed={seed}", "--plot=False", *extra])
    wall = time.time() - t0
    params = float(log.split("model: ")[1].split("M parameters")[0])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    speeds = [r["tokens_per_s"] for r in rows if r["kind"] == "train"]
    run(["evaluate.py", f"--out_dir={out}", "--eval_split=val"])
    scores = json.load(open(os.path.join(out, "eval.json")))
    (val,) = [v["metrics"]["loss"] for k, v in scores.items() if k.endswith(":val")]
    return dict(parameters=params, val_loss=val, tokens_per_s=statistics.mean(speeds), wall_s=wall)


def spread(values, digits):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max_iters", type=int, default=0, help="0 = the configs' own")
    parser.add_argument("--out", default="out/bench_archs", help="a folder for the runs (replaced)")
    args = parser.parse_args()
    extra = ["--overwrite=True"] + ([f"--max_iters={args.max_iters}"] if args.max_iters else [])
    print("| model | parameters | whole-val loss | tokens/s | wall time (s) |\n| --- | --- | --- | --- | --- |")
    for name, config in CONFIGS.items():
        runs = [one_run(config, 1337 + s, os.path.join(args.out, f"{name.split()[-1]}_{s}"), extra)
                for s in range(args.seeds)]
        column = {k: [r[k] for r in runs] for k in runs[0]}
        print(f"| {name} | {column['parameters'][0]:.2f}M | {spread(column['val_loss'], 3)} | "
              f"{spread(column['tokens_per_s'], 0)} | {spread(column['wall_s'], 1)} |", flush=True)


if __name__ == "__main__":
    main()
