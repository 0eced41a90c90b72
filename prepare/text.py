"""
Your own corpus, of any size, through the same cleaning, splitting and tokenizing as the built-in data.

    python prepare/text.py --input=notes/,book.txt --data_dir=data/mine --tokenizer=sentencepiece
    python prepare/text.py --input=crawl/ --text_field=content --tokenizer=gpt2 --data_dir=data/crawl
    python prepare/text.py --input=hf:HuggingFaceFW/fineweb-edu/sample/10BT --tokenizer=gpt2 \\
        --data_dir=data/fineweb_edu

Inputs, by extension (folders are searched recursively for all of these):
    .txt .md              one document per file
    .jsonl .jsonl.gz      one document per line, in the field text_field
    .parquet              one document per row, in the column text_field, read row group by row group
    hf:OWNER/NAME[/DIR]   a Hugging Face dataset's Parquet files (those under DIR), each downloaded
                          into cache_dir when the stream reaches it

Documents stream through cleaning, exact dedup, PII scrubbing (--scrub_pii=True), a split chosen
by a hash of the text (a document's split never changes when others are added or removed, and no
document is ever split), and tokenization into shards of shard_tokens tokens. The corpus is never
held in memory: the main process cuts the input into batches of documents (~1 MB each) and hands
them to num_proc worker processes, which read, parse, clean, hash and tokenize them; it takes their
results back in order, drops duplicates and writes. So the output is the same whatever num_proc is.

With --canaries=N --canary_repeats=1,4,16, N random secrets per repeat count go into the training
split, each that many times (privacy.py; evaluate.py --eval_task=exposure measures them), before
deduplication (--dedup=False keeps every copy).

With --counterfactual=augment (or swap), a chosen share of the training documents also get (or
are replaced by) a copy with every bias_terms pair swapped: He -> She, HIS -> HER, her -> his or
him (prepare/common.py's rule). meta.json records how many and the term counts before and after.

Tokenizers that learn (char, sentencepiece) first read the training split's first
tokenizer_sample_chars characters in a separate pass; meta.json records how much they read.
"""

import collections
import gzip
import json
import os
import sys
from types import SimpleNamespace
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import exits  # noqa: E402,F401  from here on a signal or a failed write ends the program with one line
from data import SPLITS, DataError  # noqa: E402
from prepare.common import (DatasetWriter, SeenDigests, bias_share, clean_text,  # noqa: E402
                            counterfactual_stats, counterfactual_versions, decode_utf8, document_digest,
                            refuse_existing_dataset, run_main, scrub_pii, term_counter, terms_counted)
from privacy import CanaryFeed, canary_copies, canary_record, canary_text, check_room, plan_canaries  # noqa: E402
from tokenizer import build_tokenizer  # noqa: E402

TEXT_SUFFIXES = (".txt", ".md")          # one document per file
ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")  # one document per row
TASK_BYTES = 1 << 20                     # input per unit of work sent to a worker


# ----------------------------------------------------------------------------- inputs

def find_inputs(cfg):
    """Every input file as (label, path_or_fetch, bytes): a local path, or for hf: a function that
    downloads the file and returns its path. Checked before any work starts."""
    items = [p for p in cfg.input.split(",") if p]
    if not items:
        raise DataError("no input given; pass --input=FILE_OR_FOLDER[,MORE] or --input=hf:OWNER/NAME")
    found = []
    for item in items:
        if item.startswith("hf:"):
            found.extend(hf_parquet_files(item[3:], cfg.cache_dir))
        elif os.path.isfile(item):
            if not item.endswith(TEXT_SUFFIXES + ROW_SUFFIXES):
                raise DataError(f"--input={item}: unknown kind of file; give {', '.join(TEXT_SUFFIXES + ROW_SUFFIXES)}")
            found.append((item, item, os.path.getsize(item)))
        elif os.path.isdir(item):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs
                           if f.endswith(TEXT_SUFFIXES + ROW_SUFFIXES))
            if not files:
                raise DataError(f"--input={item}: folder has no {', '.join(TEXT_SUFFIXES + ROW_SUFFIXES)} files")
            found.extend((f, f, os.path.getsize(f)) for f in files)
        else:
            raise DataError(f"--input={item}: no such file or folder")
    return found


def hf_parquet_files(spec, cache_dir):
    """The Parquet files of Hugging Face dataset OWNER/NAME (under DIR when given), in order, with
    their sizes."""
    from huggingface_hub import HfApi, hf_hub_download
    parts = spec.strip("/").split("/")
    repo, folder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        sizes = {f.path: f.size for f in HfApi().list_repo_tree(repo, folder or None, recursive=True,
                                                                repo_type="dataset") if hasattr(f, "size")}
    except Exception as e:  # offline, a wrong name, a gated dataset: all say the same to the user
        raise DataError(f"--input=hf:{spec}: cannot list the dataset's files ({type(e).__name__}); check the "
                        f"name and your connection, or download the Parquet files and pass their folder") from None
    names = sorted(n for n in sizes if n.endswith(".parquet") and n.startswith(f"{folder}/" if folder else ""))
    if not names:
        raise DataError(f"--input=hf:{spec}: no .parquet files there; name a folder that holds them")
    local_dir = os.path.join(cache_dir, "hf", repo)

    def fetcher(name):
        return lambda: hf_hub_download(repo, name, repo_type="dataset", local_dir=local_dir)
    return [(f"hf:{repo}/{n}", fetcher(n), sizes[n]) for n in names]


def tasks(inputs, text_field):
    """The corpus cut into units of work, in order, each about TASK_BYTES: ("files", [(name, path)])
    of whole text files, ("lines", label, first_line_number, lines) of JSONL, or ("rows", label,
    path, row_group, first_row) of a Parquet file. Workers read the files themselves (lines is
    (path, start, size) of a plain file; only a gzip file's lines, which need one sequential
    reader, come as bytes), parse and clean, so that scales with num_proc and no text is copied
    through a pipe."""
    files, size = [], 0
    for label, path, file_size in fetched_ahead(inputs):
        try:
            if path.endswith(TEXT_SUFFIXES):
                files.append((label, path))
                size += file_size
                if size >= TASK_BYTES:
                    yield "files", files
                    files, size = [], 0
            elif path.endswith(".parquet"):
                yield from parquet_tasks(path, label, text_field)
            else:
                yield from jsonl_tasks(path, label)
        except OSError as e:  # unreadable, or a gzip file that is not one
            raise unreadable(label, e) from None
        except EOFError:
            raise DataError(f"{label}: compressed file ends early (truncated); download or copy it again") from None
    if files:
        yield "files", files


def fetched_ahead(inputs, threads=2):
    """inputs as (label, local path, bytes), in order. The hf: files are downloaded on `threads`
    threads, in order, while the workers prepare the files before them: downloading each only
    when its turn comes would leave every worker idle for the whole download."""
    pool = ThreadPoolExecutor(threads)
    try:
        paths = [pool.submit(where) if callable(where) else where for _, where, _ in inputs]
        for (label, _, size), path in zip(inputs, paths):
            yield label, path if isinstance(path, str) else path.result(), size
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def unreadable(label, error):
    return DataError(f"{label}: cannot read ({error.strerror or error}); check the file")


def jsonl_tasks(path, label):
    """Runs of whole lines: where they lie in a plain file, or their bytes from a gzip file."""
    gz = path.endswith(".gz")
    line, start = 1, 0
    with (gzip.open if gz else open)(path, "rb") as f:
        while chunk := f.read(TASK_BYTES):
            tail = f.readline()  # end on a line break
            size = len(chunk) + len(tail)
            yield "lines", label, line, chunk + tail if gz else (path, start, size)
            line += newlines(chunk) + tail.count(b"\n")
            start += size


def newlines(data):
    # numpy counts faster than bytes.count (docs/LOG.md): the main process reads every byte of the
    # input and must keep up with all the workers
    return int(np.count_nonzero(np.frombuffer(data, np.uint8) == ord("\n")))


def parquet_tasks(path, label, text_field):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, ValueError) as e:
        raise DataError(f"{label}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{label}: no column '{text_field}' (columns: {', '.join(schema.names)}); "
                        f"set --text_field to the column that holds the text")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{label}: column '{text_field}' holds {kind}, not text; set --text_field")
    first = 0
    for group in range(pf.num_row_groups):  # a worker holds one row group at a time
        yield "rows", label, path, group, first
        first += pf.metadata.row_group(group).num_rows


def documents_of(task, text_field):
    """[(name, raw)] of one task, in order; raw is bytes (a text file) or str (a row)."""
    if task[0] == "files":
        return [(name, read_file(name, path)) for name, path in task[1]]
    if task[0] == "rows":
        import pyarrow.parquet as pq
        _, label, path, group, first = task
        texts = pq.ParquetFile(path).read_row_group(group, columns=[text_field]).column(0).to_pylist()
        return [(f"{label}:row {first + i}", text or "") for i, text in enumerate(texts)]
    _, label, number, chunk = task
    if isinstance(chunk, tuple):  # (path, start, size) of a plain file
        path, start, size = chunk
        chunk = read_file(label, path, start, size)
    docs = []
    for number, line in enumerate(chunk.split(b"\n"), number):
        if line.strip():
            docs.append((f"{label}:{number}", jsonl_text(line, f"{label}:{number}", text_field)))
    return docs


def read_file(name, path, start=0, size=-1):
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(size)
    except OSError as e:
        raise unreadable(name, e) from None


def jsonl_text(line, where, text_field):
    try:
        row = json.loads(line)
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8; convert the file to UTF-8") from None
    except ValueError as e:
        raise DataError(f"{where}: not JSON ({e.args[0].split(':')[0]}); fix or remove the line") from None
    if not isinstance(row, dict) or text_field not in row:
        keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: no field '{text_field}' (found: {keys}); set --text_field to the field "
                        f"that holds the text")
    text = row[text_field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field '{text_field}' is a {type(text).__name__}, not text")
    return text or ""


# ----------------------------------------------------------------------------- the workers

WORKER = {}  # what each worker process needs, set once by start_worker


def start_worker(settings, tok):
    WORKER.update(settings)
    WORKER["count_terms"] = term_counter(settings["bias_terms"])[1]
    WORKER["versions"] = counterfactual_versions(settings["counterfactual"])
    WORKER["tok"] = tok  # None in the sampling pass


def process(task):
    """In a worker: one task -> (documents, payloads). documents: [(name, digest, split, characters,
    scrubbed, term counts, term counts before, swaps)] in order; digest and split are None for an
    empty document; term counts are its occurrences of the bias terms (None in the sampling pass,
    or when the document is not in the bias sample), and before counterfactual augmentation (a
    counterfactual copy had none before: it is new). payloads[split] holds that split's
    documents in the same order: their token ids (tokenizer.PackedDocuments, from one tokenizer
    call), or their texts when there is no tokenizer yet (the sampling pass)."""
    documents, texts = [], {split: [] for split in SPLITS}
    tok, count_terms, versions_of = WORKER["tok"], WORKER["count_terms"], WORKER["versions"]
    for name, raw in documents_of(task, WORKER["text_field"]):
        text = clean_text(decode_utf8(raw, name) if isinstance(raw, bytes) else raw)
        if not text:
            documents.append((name, None, None, 0, 0, None, None, 0))
            continue
        digest = document_digest(text)  # of the cleaned text: what dedup compares
        scrubbed = 0
        if WORKER["scrub_pii"]:
            text, scrubbed = scrub_pii(text)
        # the split comes from a hash of the final text (the same as digest when nothing was scrubbed)
        split = split_of(document_digest(text) if scrubbed else digest, WORKER["val_fraction"],
                         WORKER["test_fraction"])
        counted = tok is not None and count_terms and terms_counted(digest, WORKER["bias_share"])
        terms = count_terms(text) if counted else None
        versions, swaps = [text], 0
        if versions_of and tok is not None and split == "train":
            versions, swaps = versions_of(text, digest)
        for version in versions:
            texts[split].append(version)
            if version is text:
                documents.append((name, digest, split, len(text), scrubbed, terms, terms, 0))
            else:  # a counterfactual: its own digest (dedup must not take it for the original)
                before = collections.Counter() if len(versions) > 1 else terms  # augment: a new document
                documents.append((f"{name} (counterfactual)", document_digest(version), split, len(version), 0,
                                  count_terms(version) if counted else None, before, swaps))
    if tok is None:  # the sampling pass reads only the training split
        return documents, {"train": texts["train"]}
    return documents, {split: tok.encode_documents(t, WORKER["dtype"]) for split, t in texts.items()}


def each_document(documents, payloads):
    """One task's results as (document, its payload) in input order: its token ids, or its text."""
    given = dict.fromkeys(payloads, 0)  # per split: how many of its payloads are given out
    for document in documents:
        split = document[2]
        if split not in payloads:  # an empty document, or one the sampling pass does not need
            yield document, None
            continue
        yield document, payloads[split][given[split]]
        given[split] += 1


def split_of(digest, val_fraction, test_fraction):
    """The split of a document from its digest: a stable pseudo-random position in [0, 1)."""
    u = digest / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def processed(cfg, inputs, tok=None, dtype=np.uint32, bias_share=1.0):
    """Every document of the inputs with its payload, in input order, through process(): in
    num_proc workers, with at most two tasks per worker in flight so memory stays bounded."""
    settings = {"scrub_pii": cfg.scrub_pii, "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
                "dtype": dtype, "text_field": cfg.text_field, "bias_terms": cfg.bias_terms, "bias_share": bias_share,
                "counterfactual": SimpleNamespace(counterfactual=cfg.counterfactual, bias_terms=cfg.bias_terms,
                                                  counterfactual_share=cfg.counterfactual_share)}
    work = tasks(inputs, cfg.text_field)
    workers = cfg.num_proc or available_cores()
    if workers == 1:
        start_worker(settings, tok)
        for task in work:
            yield from each_document(*process(task))
        return
    # each worker gets the tokenizer built here: inherited as it is where processes fork (Linux),
    # unpickled where they start afresh; never loaded from its files again
    pool = ProcessPoolExecutor(workers, initializer=start_worker, initargs=(settings, tok))
    pending = collections.deque()
    try:
        for task in work:
            pending.append(pool.submit(process, task))
            if len(pending) >= 2 * workers:
                yield from each_document(*pending.popleft().result())
        while pending:
            yield from each_document(*pending.popleft().result())
    finally:
        # On an error or an early stop (the tokenizer's sample is complete) the tasks not yet
        # started are dropped and the workers exit once their current one is done. No signals:
        # multiprocessing.Pool's terminate() hung here twice, its SIGTERM lost by a worker
        # waiting for the task queue's lock, which terminate() itself holds.
        pool.shutdown(cancel_futures=True)


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ----------------------------------------------------------------------------- the two passes

def training_sample(cfg, inputs):
    """The training split's documents in order (deduplicated), for a tokenizer to learn from;
    build_tokenizer stops reading when it has enough. The canaries come first: their characters
    must be in a character vocabulary whatever the corpus holds."""
    yield from sorted({canary_text(secret) for secret, _ in plan_canaries(cfg)})
    seen, any_text = SeenDigests(), False
    for (_, digest, split, *_), text in processed(cfg, inputs):
        any_text |= digest is not None
        if digest is not None and seen.add(digest) and split == "train":
            yield text
    if not any_text:
        raise empty_corpus(cfg)


def write_corpus(cfg, inputs, tok):
    """Stream every document into cfg.data_dir's shards; returns meta."""
    seen = SeenDigests()
    stats = {"duplicates_dropped": 0, "dedup": cfg.dedup, "empty_documents": 0, "scrubbed_spans": 0}
    changed, swaps, before = 0, 0, collections.Counter()  # counterfactual augmentation's record
    canaries, kept, train_characters = plan_canaries(cfg), collections.Counter(), 0
    feed = CanaryFeed(canary_copies(canaries, cfg.seed), expected_train_characters(cfg, inputs))
    share = bias_share(cfg, sum(size for *_, size in inputs))

    def is_new(digest):
        if cfg.dedup and not seen.add(digest):
            stats["duplicates_dropped"] += 1
            return False
        return True

    def write_canaries(copies):
        for name, text in copies:
            if is_new(document_digest(text)):
                out.add("train", name, tok.encode_document(text, out.dtype), len(text), None)
                kept[text] += 1
    with DatasetWriter(cfg.data_dir, tok, cfg.token_dtype, cfg.shard_tokens, cfg.bias_terms, share) as out, \
            tqdm(desc="preparing", unit=" docs", disable=None) as bar:  # no bar when not a terminal
        for document, ids in processed(cfg, inputs, tok, out.dtype, share):
            name, digest, split, characters, scrubbed, terms, terms_before, swapped = document
            bar.update()
            if digest is None:
                stats["empty_documents"] += 1
            elif is_new(digest):
                if split == "train":
                    write_canaries(feed.due(train_characters))
                    train_characters += characters
                stats["scrubbed_spans"] += scrubbed
                out.add(split, name, ids, characters, terms)
                changed, swaps = changed + bool(swapped), swaps + swapped
                if split == "train" and terms_before is not None:
                    before.update(terms_before)
        write_canaries(feed.due())
        if not any(s["documents"] for s in out.stats.values()):
            raise empty_corpus(cfg)
        if cfg.counterfactual:
            stats["counterfactual"] = counterfactual_stats(cfg, changed, swaps, before, out.term_counts["train"])
        if canaries:
            check_room(cfg, canaries, train_characters)  # (the estimate let it pass: the split came out smaller)
            stats["canaries"] = canary_record(cfg, canaries, kept)
        return out.finish({"input": cfg.input}, stats)


def expected_train_characters(cfg, inputs):
    """About how many characters the training split will hold: the inputs' bytes, less the held-out share."""
    return sum(size for *_, size in inputs) * (1 - cfg.val_fraction - cfg.test_fraction)


def empty_corpus(cfg):
    return DataError(f"--input={cfg.input}: the corpus is empty (no non-blank documents)")


def prepare(cfg):
    if cfg.data_dir.startswith(os.path.join("data", f"{cfg.dataset}_")) and cfg.input:
        raise DataError("set --data_dir for your corpus (the default names the built-in dataset)")
    refuse_existing_dataset(cfg.data_dir, cfg.overwrite)
    counterfactual_versions(cfg)  # (a bad pair list: said now, before any work)
    inputs = find_inputs(cfg)
    check_room(cfg, plan_canaries(cfg), expected_train_characters(cfg, inputs))  # before any work
    tok = build_tokenizer(cfg, training_sample(cfg, inputs))
    return write_corpus(cfg, inputs, tok)


def main():
    from config import cli_config
    prepare(cli_config())


if __name__ == "__main__":
    run_main(main)
