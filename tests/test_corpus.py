"""prepare/text.py at scale: every input format gives the same token files, workers and shard size
change nothing, the loader reads many shards as one, and bad input is one line, never half a dataset."""

import collections
import gzip
import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint
from conftest import CACHE, ROOT, make_cfg, stop_after_steps
from data import DataError, SplitTokens, TokenLoader, sha256_of
from prepare.common import clean_text, document_digest
from prepare.text import documents_of, jsonl_tasks, prepare, split_of
from test_posttrain import reference_term_counts
import train as T

WORDS = "thou art more lovely and temperate rough winds do shake the darling buds of may — naïve 日本".split()


def corpus(n=80, seed=0):
    """n documents with one exact duplicate, one blank document and Windows line endings."""
    rng = random.Random(seed)
    docs = [f"Document {i}.\r\n" + "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                                             for _ in range(rng.randint(1, 6))) for i in range(n)]
    docs[7] = docs[3]
    docs[11] = "   \n "
    return docs


def write_formats(folder, docs):
    """The same documents as a folder of .txt files, .jsonl, .jsonl.gz and .parquet (row groups of 7)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (folder / "txt").mkdir(parents=True)
    for i, d in enumerate(docs):
        (folder / "txt" / f"doc{i:03d}.txt").write_bytes(d.encode())
    lines = "".join(json.dumps({"id": i, "text": d}) + "\n" + ("\n" if i == 5 else "") for i, d in enumerate(docs))
    (folder / "docs.jsonl").write_text(lines)
    with gzip.open(folder / "docs.jsonl.gz", "wt") as f:
        f.write(lines)
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), folder / "docs.parquet", row_group_size=7)
    return {"txt": folder / "txt", "jsonl": folder / "docs.jsonl", "gz": folder / "docs.jsonl.gz",
            "parquet": folder / "docs.parquet"}


def prep(out, source, **kw):
    kw = {"tokenizer": "char", "num_proc": 1, "val_fraction": 0.2, "test_fraction": 0.2, **kw}
    return prepare(make_cfg(input=str(source), data_dir=str(out), **kw))


def token_files(d):
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d)) if f.endswith(".bin")}


def run_text(*args, env=None):
    return subprocess.run([sys.executable, "prepare/text.py", f"--cache_dir={CACHE}", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_every_format_gives_identical_token_files(tmp_path):
    inputs = write_formats(tmp_path / "in", corpus())
    metas, files = {}, {}
    for kind, source in inputs.items():
        metas[kind] = prep(tmp_path / kind, source, shard_tokens=400)
        files[kind] = token_files(tmp_path / kind)
    assert len(files["txt"]) > 3  # several shards per split
    for kind in ("jsonl", "gz", "parquet"):
        assert files[kind] == files["txt"], kind
        for key in ("duplicates_dropped", "empty_documents", "tokenizer_trained_on"):
            assert metas[kind]["stats"][key] == metas["txt"]["stats"][key], (kind, key)
    stats = metas["txt"]["stats"]
    assert stats["duplicates_dropped"] == 1 and stats["empty_documents"] == 1
    assert sum(stats[s]["documents"] for s in ("train", "val", "test")) == 78
    assert metas["jsonl"]["stats"]["train"]["names"][0].endswith("docs.jsonl:1")


def test_workers_and_shard_size_change_nothing(tmp_path):
    inputs = write_formats(tmp_path / "in", corpus(200, seed=1))
    one = prep(tmp_path / "one", inputs["jsonl"], tokenizer="gpt2", shard_tokens=10**6)
    done = run_text(f"--input={inputs['parquet']}", f"--data_dir={tmp_path / 'many'}", "--tokenizer=gpt2",
                    "--num_proc=2", "--shard_tokens=300", "--val_fraction=0.2", "--test_fraction=0.2")
    assert done.returncode == 0, done.stderr
    many = json.loads((tmp_path / "many" / "meta.json").read_text())
    for split in ("train", "val", "test"):
        assert len(one["shards"][split]) == 1 and len(many["shards"][split]) > 1
        assert np.array_equal(SplitTokens(tmp_path / "one", split)[:], SplitTokens(tmp_path / "many", split)[:])
        for shard in many["shards"][split]:  # meta.json's record of every shard is true
            path = tmp_path / "many" / shard["file"]
            assert sha256_of(path) == shard["sha256"] and os.path.getsize(path) == 32 + 2 * shard["tokens"]
        assert sum(s["tokens"] for s in many["shards"][split]) == many["stats"][split]["tokens"]
    assert not (tmp_path / "many" / ".prepare-partial").exists()


SPAWNED_PREPARE = """
import multiprocessing, sys
sys.path.insert(0, {root!r})
if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    from conftest import make_cfg
    from prepare.text import prepare
    prepare(make_cfg(input={source!r}, data_dir={out!r}, tokenizer={tokenizer!r}, num_proc=2, val_fraction=0.2,
                     test_fraction=0.2, sp_vocab_size=400))
"""


@pytest.mark.parametrize("tokenizer", ["gpt2", "sentencepiece"])
def test_workers_started_afresh_get_the_same_tokenizer(tmp_path, tokenizer):
    """Where worker processes are spawned instead of forked (macOS, Windows; Python 3.14's default
    on Linux is forkserver), the tokenizer the main process built reaches them pickled: the
    shards must be those of a single process."""
    source = write_formats(tmp_path / "in", corpus(200, seed=2))["txt"]
    prep(tmp_path / "one", source, tokenizer=tokenizer, sp_vocab_size=400)
    script = tmp_path / "spawned.py"
    script.write_text(SPAWNED_PREPARE.format(root=str(ROOT / "tests"), source=str(source),
                                             out=str(tmp_path / "spawned"), tokenizer=tokenizer))
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert token_files(tmp_path / "spawned") == token_files(tmp_path / "one")


def test_split_slices_cross_shard_boundaries(char_data, sharded_char_data):
    one, many = SplitTokens(char_data, "train"), SplitTokens(sharded_char_data, "train")
    assert len(many.parts) == 44 and len(one) == len(many)
    rng = random.Random(0)
    for a in [0, 99_990, 199_999, len(one) - 5] + [rng.randrange(len(one)) for _ in range(50)]:
        b = a + rng.choice([1, 7, 150_000])
        assert np.array_equal(one[a:b], many[a:b])
    assert np.array_equal(one.positions_of(85), many.positions_of(85))


def test_loader_gives_the_same_batches_from_one_shard_or_many(char_data, sharded_char_data):
    make = lambda d: TokenLoader(d, "train", 8, 64, 2, 1, 0, 3, torch.device("cpu"))  # noqa: E731
    a, b = make(char_data), make(sharded_char_data)
    for _ in range(20):
        xa, ya = a.next()
        xb, yb = b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_training_on_many_shards_equals_one_shard_and_resumes_exactly(char_data, sharded_char_data, tmp_path,
                                                                       monkeypatch):
    kw = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, warmup_iters=2,
              device="cpu", dtype="float32", plot=False, max_iters=8, eval_interval=3)
    T.train(make_cfg(data_dir=str(char_data), out_dir=str(tmp_path / "straight"), **kw))
    split = make_cfg(data_dir=str(sharded_char_data), out_dir=str(tmp_path / "split"), **kw)
    with stop_after_steps(monkeypatch, 4):
        assert T.train(split)["iter_num"] == 4
    T.train(make_cfg(data_dir=str(sharded_char_data), out_dir=str(tmp_path / "split"), init_from="resume", **kw))
    a = load_checkpoint(str(tmp_path / "straight" / "ckpt_last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "split" / "ckpt_last.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_aligned_windows_start_at_a_document_and_resume(tmp_path):
    inputs = write_formats(tmp_path / "in", corpus(300, seed=2))
    meta = prep(tmp_path / "d", inputs["jsonl"], shard_tokens=500, val_fraction=0.1, test_fraction=0.1)
    eot = meta["eot_id"]
    make = lambda: TokenLoader(tmp_path / "d", "train", 4, 16, 2, 1, 0, 9, torch.device("cpu"),  # noqa: E731
                                 align_eot=eot)
    loader = make()
    ids = SplitTokens(tmp_path / "d", "train")[:]
    starts = np.flatnonzero(ids == eot)
    assert loader.size == (starts < len(ids) - 17).sum() == meta["stats"]["train"]["documents"]
    for _ in range(10):
        x, _ = loader.next()
        assert (x[:, 0] == eot).all()
    state = loader.state_dict()
    rest = [loader.next()[0] for _ in range(5)]
    again = make()
    again.load_state_dict(state)
    assert all(torch.equal(r, again.next()[0]) for r in rest)


def test_hf_dataset_goes_through_the_parquet_path(tmp_path, monkeypatch):
    import huggingface_hub
    inputs = write_formats(tmp_path / "in", corpus())
    calls = []
    listing = [SimpleNamespace(path=p, size=100) for p in ("README.md", "data/other/x.parquet", "sample/a.parquet")]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree",
                        lambda self, repo, folder=None, recursive=False, repo_type=None: listing)

    def download(repo, name, repo_type=None, local_dir=None):
        calls.append((repo, name, repo_type))
        return str(inputs["parquet"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    prep(tmp_path / "hf", "hf:owner/corpus/sample", shard_tokens=400)
    prep(tmp_path / "local", inputs["parquet"], shard_tokens=400)
    assert calls == [("owner/corpus", "sample/a.parquet", "dataset")] * 2  # sampling pass, then writing pass
    assert token_files(tmp_path / "hf") == token_files(tmp_path / "local")


def test_downloads_run_ahead_of_the_file_being_prepared():
    """While the first hf: file is being prepared, the next one is already downloading (on a thread)."""
    import threading
    from prepare.text import fetched_ahead
    started = {name: threading.Event() for name in ("a", "b", "c")}

    def fetch(name):
        def download():
            started[name].set()
            return f"/cache/{name}.parquet"
        return download
    inputs = [("hf:a", fetch("a"), 1), ("local", "/here/x.jsonl", 2), ("hf:b", fetch("b"), 3), ("hf:c", fetch("c"), 4)]
    stream = fetched_ahead(inputs)
    assert next(stream) == ("hf:a", "/cache/a.parquet", 1)
    assert started["b"].wait(timeout=60)  # not waiting for its turn
    assert list(stream) == [("local", "/here/x.jsonl", 2), ("hf:b", "/cache/b.parquet", 3),
                            ("hf:c", "/cache/c.parquet", 4)]


def test_learned_tokenizers_read_a_bounded_sample(tmp_path):
    inputs = write_formats(tmp_path / "in", corpus())
    meta = prep(tmp_path / "d", inputs["jsonl"], tokenizer_sample_chars=300)
    read = meta["stats"]["tokenizer_trained_on"]
    assert read["characters"] == 300 and not read["whole_split"] and read["limit"] == 300
    assert meta["stats"]["train"]["characters"] > 1000


def test_bad_corpus_input_is_one_line_and_leaves_nothing(tmp_path):
    good = [json.dumps({"text": f"document {i}"}) for i in range(40)]
    cases = {
        "notjson.jsonl": ("\n".join(good[:2] + ["{oops"] + good) + "\n", "notjson.jsonl:3: not JSON"),
        "nofield.jsonl": ("\n".join(good + ['{"body": "x"}']) + "\n", "nofield.jsonl:41: no field 'text' (found: body)"),
        "number.jsonl": ('{"text": 5}\n', "number.jsonl:1: field 'text' is a int"),
        "latin1.jsonl": (b'{"text": "caf\xe9"}\n', "latin1.jsonl:1: not UTF-8"),
        "fake.parquet": ("not parquet", "fake.parquet: not a readable Parquet file"),
        "cut.jsonl.gz": (gzip.compress(("\n".join(good) + "\n").encode())[:60], "cut.jsonl.gz: compressed file ends early"),
        "notes.pdf": ("x", "unknown kind of file"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        out = tmp_path / f"out_{name}"
        done = run_text(f"--input={path}", f"--data_dir={out}")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (name, done.stderr)
        assert expected in lines[0], (name, lines[0])
        assert not out.exists() or os.listdir(out) == [], name  # never a half-written dataset
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "other.parquet")
    done = run_text(f"--input={tmp_path / 'other.parquet'}", f"--data_dir={tmp_path / 'o'}")
    assert done.returncode == 1 and "no column 'text' (columns: content); set --text_field" in done.stderr
    done = run_text("--input=hf:nobody/nothing", f"--data_dir={tmp_path / 'o'}", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1 and "cannot list the dataset's files" in done.stderr.strip().splitlines()[-1]


def test_a_file_gone_before_its_worker_reads_it_is_named(tmp_path):
    """Workers read their text files and JSONL lines themselves: a file that vanished (or became
    unreadable) after the input was listed is a DataError naming it, which prepare prints as one line."""
    kept = tmp_path / "docs.jsonl"
    kept.write_text(json.dumps({"text": "a document"}) + "\n")
    lines = next(jsonl_tasks(str(kept), "docs.jsonl"))
    kept.unlink()
    for task, name in ((lines, "docs.jsonl"), (("files", [("notes/a.txt", str(tmp_path / "a.txt"))]), "notes/a.txt")):
        with pytest.raises(DataError, match=f"^{name}: cannot read \\(No such file or directory\\); check the file$"):
            documents_of(task, "text")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl_lines_keep_their_numbers_however_the_file_is_cut(tmp_path, monkeypatch, suffix):
    """The main process counts each task's lines, so a worker names a document (or a bad line) by
    its line in the file; blank lines count, and the last line may lack its line break."""
    monkeypatch.setattr("prepare.text.TASK_BYTES", 50)  # cuts of 50 bytes, then to the line's end
    rows = [json.dumps({"text": f"row {i} " + "x" * (i % 37)}) for i in range(1, 120)]
    rows[40] = ""
    data = "\n".join(rows).encode()  # no line break after the last row
    path = tmp_path / f"d{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    tasks = list(jsonl_tasks(str(path), path.name))
    assert len(tasks) > 20
    docs = [doc for task in tasks for doc in documents_of(task, "text")]
    assert [name for name, _ in docs] == [f"{path.name}:{i}" for i in range(1, 120) if i != 41]
    assert all(text.startswith(f"row {name.split(':')[1]} ") for name, text in docs)


def test_an_unfinished_preparation_is_cleared_on_rerun(tmp_path):
    inputs = write_formats(tmp_path / "in", corpus())
    work = tmp_path / "d" / ".prepare-partial"
    work.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (work / "pid").write_text(dead.stdout.strip())
    (work / "train_00000.bin").write_bytes(b"half a shard")
    done = run_text(f"--input={inputs['jsonl']}", f"--data_dir={tmp_path / 'd'}", "--val_fraction=0.2",
                    "--test_fraction=0.2")
    assert done.returncode == 0, done.stderr
    assert "removing an unfinished preparation" in done.stdout and not work.exists()
    assert SplitTokens(tmp_path / "d", "train")[:].size > 0


def test_bias_terms_of_a_large_corpus_are_counted_in_a_hash_chosen_sample(tmp_path):
    inputs = write_formats(tmp_path / "in", corpus(n=400))
    spec, terms = "thou/art,may/shake", ["art", "may", "shake", "thou"]
    full = prep(tmp_path / "all", inputs["jsonl"], bias_terms=spec, bias_sample_bytes=0)["stats"]
    quarter = os.path.getsize(inputs["jsonl"]) // 4
    part = prep(tmp_path / "part", inputs["jsonl"], bias_terms=spec, bias_sample_bytes=quarter,
                num_proc=2)["stats"]
    assert full["bias_terms"]["share_of_documents"] == 1
    assert full["bias_terms"]["documents_counted"] == {s: full[s]["documents"] for s in ("train", "val", "test")}
    share = part["bias_terms"]["share_of_documents"]
    assert share == pytest.approx(0.25, rel=1e-3)
    # recount: each distinct non-blank document is in the sample when its digest's low 32 bits say so
    expected = {s: collections.Counter() for s in ("train", "val", "test")}
    sampled = collections.Counter()
    for text in dict.fromkeys(filter(None, map(clean_text, corpus(n=400)))):
        digest = document_digest(text)
        if (digest & 0xFFFFFFFF) < share * 2**32:
            split = split_of(digest, 0.2, 0.2)
            expected[split] += reference_term_counts(terms, text)
            sampled[split] += 1
    assert part["bias_terms"]["documents_counted"] == dict(sampled)
    assert 60 < sum(sampled.values()) < 140  # about a quarter of 398
    for split in expected:
        assert part["bias_terms"][split] == {t: expected[split][t] for t in terms}, split
        assert all(part["bias_terms"][split][t] <= full["bias_terms"][split][t] for t in terms)


# ----------------------------------------------------------------------------- counterfactual augmentation

DEFAULT_PAIRS = "he/she,him/her,his/her,king/queen,lord/lady,sir/madam,son/daughter"


@pytest.mark.parametrize("text,swapped,n", [
    ("He took her hand.", "She took his hand.", 2),            # her + a noun: possessive
    ("I saw her.", "I saw him.", 1),                            # her at a sentence's end: object
    ("Give her the crown, and her own.", "Give him the crown, and his own.", 2),  # her + determiner: object
    ("to her and him", "to him and her", 2),
    ("HIS KING, His Lady", "HER QUEEN, Her Lord", 4),            # the word's case is kept
    ("The King's son; _king_; kingdom, kingly", "The Queen's daughter; _queen_; kingdom, kingly", 3),  # whole words
    ("Sir, O her eyes!", "Madam, O his eyes!", 2),
    ("She", "He", 1),
])
def test_a_counterfactual_swaps_each_pair_keeping_case_and_the_her_rule(text, swapped, n):
    from prepare.common import counterfactual_swapper
    assert counterfactual_swapper(DEFAULT_PAIRS)(text) == (swapped, n)


def test_a_word_in_two_pairs_is_refused_but_her():
    from errors import ConfigError
    from prepare.common import counterfactual_swapper
    with pytest.raises(ConfigError, match="'he' is in 2 pairs"):
        counterfactual_swapper("he/she,he/it")
    counterfactual_swapper("him/her,his/her")  # her: the documented rule decides


def gendered_corpus(folder, n=40):
    folder.mkdir()
    for i in range(n):
        (folder / f"d{i:02d}.txt").write_text(f"Scene {i}. The king spoke to his son, and he said: "
                                              f"my lord, I saw her.")
    (folder / "plain.txt").write_text("No person is named in this one at all.")
    return folder


@pytest.mark.parametrize("mode", ["augment", "swap"])
def test_counterfactual_augmentation_changes_the_training_split_only(tmp_path, mode):
    source = gendered_corpus(tmp_path / "src")
    plain = prep(tmp_path / "plain", source, bias_terms=DEFAULT_PAIRS)
    meta = prep(tmp_path / "cf", source, bias_terms=DEFAULT_PAIRS, counterfactual=mode)
    stats, base = meta["stats"], plain["stats"]
    for split in ("val", "test"):  # never touched: what the model is measured on stays as it was
        assert stats[split]["documents"] == base[split]["documents"] and stats[split]["tokens"] == base[split]["tokens"]
        assert stats["bias_terms"][split] == base["bias_terms"][split]
    gendered = sum("plain" not in name for name in base["train"]["names"])  # all but plain.txt have terms
    record = stats["counterfactual"]
    assert record["documents"] == gendered and record["swaps"] == 6 * gendered
    assert record["train_terms_before"] == base["bias_terms"]["train"]
    after = stats["bias_terms"]["train"]
    assert record["train_terms_after"] == after
    if mode == "augment":  # each pair balanced: the original and its counterfactual
        assert stats["train"]["documents"] == base["train"]["documents"] + gendered
        assert after["he"] == after["she"] == gendered and after["king"] == after["queen"] == gendered
        assert after["her"] == after["him"] + after["his"] == 2 * gendered
    else:  # each pair flipped
        assert stats["train"]["documents"] == base["train"]["documents"]
        assert (after["she"], after["he"], after["queen"], after["lady"]) == (gendered, 0, gendered, gendered)
    names = [n for n in stats["train"]["names"] if n.endswith("(counterfactual)")]
    assert len(names) == gendered


def test_counterfactual_share_chooses_documents_by_hash_and_the_builtin_path_agrees(tmp_path):
    from prepare.common import write_dataset
    from tokenizer import CharTokenizer
    source = gendered_corpus(tmp_path / "src", n=60)
    none = prep(tmp_path / "none", source, bias_terms=DEFAULT_PAIRS, counterfactual="augment", counterfactual_share=0)
    assert none["stats"]["counterfactual"]["documents"] == 0
    half = prep(tmp_path / "half", source, bias_terms=DEFAULT_PAIRS, counterfactual="augment",
                counterfactual_share=0.5)["stats"]["counterfactual"]["documents"]
    assert 0.25 * 60 < half < 0.75 * 60
    # the built-in datasets' path (write_dataset) swaps the same way
    texts = [(f"d{i}", p.read_text()) for i, p in enumerate(sorted(source.iterdir()))]
    splits = {"train": texts[:-4], "val": texts[-4:-2], "test": texts[-2:]}
    cfg = make_cfg(data_dir=str(tmp_path / "builtin"), bias_terms=DEFAULT_PAIRS, counterfactual="swap")
    meta = write_dataset(splits, CharTokenizer.train("".join(t for _, t in texts)), cfg, {"input": "x"})
    assert meta["stats"]["counterfactual"]["documents"] == sum("No person" not in t for _, t in splits["train"])
    assert meta["stats"]["bias_terms"]["train"]["he"] == 0
