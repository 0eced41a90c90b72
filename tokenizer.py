"""
Three tokenizers (and BERT's, for imported BERT folders) behind one small interface:
encode(str) -> list[int], decode(list[int]) -> str, vocab_size, eot_id (the end-of-text id
that separates documents), meta() -> a JSON-able dict from which from_meta() rebuilds the same
tokenizer without the source data, and encode_document(), a document as a token file holds it
(encode_documents(), a batch of them).

Every tokenizer also has a mask token for encoders (arch='bert'): mask_id, the id right after
its text vocabulary, so data prepared for a decoder trains an encoder as it is (an encoder's
embedding table has that one extra row: model_vocab_size). Text never encodes to it, except
the literal <|mask|> through encode_with_masks() (sample.py fills those in). After it come the
four chat turn markers (TURN_TOKENS, turn_ids; conversation.py renders conversations with them),
which text never encodes to at all, so no message can forge a turn.

- char: one id per character seen in the training split, then two specials: <|endoftext|> and
  <|unk|>. A character never seen in training (say an accent that only the test split has) is
  encoded as <|unk|> and decoded as U+FFFD '\ufffd', so such text does not round-trip.
- gpt2: GPT-2's byte-level BPE through tiktoken, ids identical to GPT-2's. The BPE ranks come
  from, in order: a user-supplied file (gpt2_bpe_path), the copy in cache_dir fetched by an
  earlier run, tiktoken's own download/cache, or the copy shipped inside the openai-whisper sdist
  on PyPI (fetched once, sha256-checked, cached in cache_dir).
- sentencepiece: BPE or unigram trained on the training split, with byte fallback so any text is
  encodable; the trained model is stored inside meta.json (base64 of its protobuf).

build_tokenizer() makes the one named by the config (training char and sentencepiece on the
training documents); write_gpt2_tokenizer_files() rebuilds transformers' vocab.json and
merges.txt from tiktoken's ranks for a Hugging Face export.
"""

import base64
import io
import json
import math
import os

import numpy as np

from data import DataError, fetch_sdist_member
from errors import ConfigError

EOT = "<|endoftext|>"
UNK = "<|unk|>"
MASK = "<|mask|>"
TURN_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # reserved after the mask token
# GPT-2's pre-tokenisation pattern (tiktoken's r50k/gpt2 split regex)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT_ID = 50256
# gpt2.tiktoken inside the openai-whisper sdist: byte-identical to tiktoken's gpt2 ranks
WHISPER_SDIST = ("openai-whisper", "20250625")
GPT2_RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


GPT2_META = {"kind": "gpt2", "vocab_size": GPT2_EOT_ID + 1, "eot_id": GPT2_EOT_ID, "ranks_sha256": GPT2_RANKS_SHA256}


class Tokenizer:
    """What the three share: a document as written to a token file, and the mask token."""

    @property
    def mask_id(self):
        return self.vocab_size

    def encode_with_masks(self, text):
        """encode(), with each literal <|mask|> in text as mask_id."""
        ids = []
        for i, part in enumerate(text.split(MASK)):
            ids += ([self.mask_id] if i else []) + self.encode(part)
        return ids

    @property
    def turn_ids(self):
        """{marker: id} of the chat turn markers (conversation.py), right after the mask token
        (after the vocabulary, where the mask token is inside it: BERT's)."""
        first = max(self.vocab_size, self.mask_id + 1)
        return {marker: first + i for i, marker in enumerate(TURN_TOKENS)}

    def shown_specials(self):
        """{id: text} of the special ids decode_text() cannot show itself: the mask token and
        the chat turn markers."""
        return {self.mask_id: MASK, **{i: marker for marker, i in self.turn_ids.items()}}

    def decode(self, ids):
        """Text of ids: runs of ordinary ids through decode_text(), special ids by name."""
        specials, parts, run = self.shown_specials(), [], []
        for i in ids:
            if i in specials:
                parts += [self.decode_text(run), specials[i]]
                run = []
            else:
                run.append(i)
        return "".join(parts + [self.decode_text(run)])

    def encode_document(self, text, dtype):
        """<|endoftext|> then the tokens of text, as a numpy array of dtype."""
        ids = self.encode_array(text)
        out = np.empty(len(ids) + 1, dtype)
        out[0], out[1:] = self.eot_id, ids
        return out

    def encode_array(self, text):
        return np.asarray(self.encode(text), dtype=np.uint32)

    def encode_documents(self, texts, dtype):
        """encode_document() of each text, packed in one array (fewer, larger objects to pass
        between processes)."""
        docs = [self.encode_document(text, dtype) for text in texts]
        return PackedDocuments(np.concatenate(docs) if docs else np.zeros(0, dtype), [len(d) for d in docs])


class PackedDocuments:
    """Documents' token ids in one array: packed[i] is document i's (a view, no copy)."""

    def __init__(self, ids, lengths):
        self.ids = ids
        self.bounds = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))  # where each one starts

    def __len__(self):
        return len(self.bounds) - 1

    def __getitem__(self, i):
        return self.ids[self.bounds[i]:self.bounds[i + 1]]


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = len(self.chars)
        self.unk_id = len(self.chars) + 1
        self.vocab_size = len(self.chars) + 2

    @classmethod
    def train(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        return [self.stoi.get(c, self.unk_id) for c in text]

    def decode_text(self, ids):
        specials = {self.eot_id: EOT, self.unk_id: "\ufffd"}
        return "".join(specials[i] if i in specials else self.chars[i] for i in ids)

    def meta(self):
        return {"kind": "char", "vocab_size": self.vocab_size, "eot_id": self.eot_id, "chars": self.chars}


class GPT2Tokenizer(Tokenizer):
    kind = "gpt2"

    def __init__(self, bpe_path="", cache_dir="data/cache"):
        self.enc = load_gpt2_encoding(bpe_path, cache_dir)
        self.vocab_size = self.enc.n_vocab  # 50257
        self.eot_id = GPT2_EOT_ID

    def encode(self, text):
        # documents are plain text: a literal "<|endoftext|>" inside one is not the special token
        return self.enc.encode_ordinary(text)

    def encode_array(self, text):
        # tiktoken >= 0.8 writes the array directly: no Python list of ints (a tenth of the
        # time when preparing a large corpus)
        if hasattr(self.enc, "encode_to_numpy"):
            return self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return super().encode_array(text)

    def encode_documents(self, texts, dtype):
        # One tiktoken call for a whole batch, the documents joined by <|endoftext|> as the special
        # token: tiktoken encodes the text between two special tokens on its own, so the ids are
        # those of a call per document, without the per-call overhead (one array). A
        # literal <|endoftext|> inside a document is text, not a boundary: such a batch is encoded
        # document by document.
        if not texts or any(EOT in text for text in texts) or not hasattr(self.enc, "encode_to_numpy"):
            return super().encode_documents(texts, dtype)
        ids = self.enc.encode_to_numpy(EOT + EOT.join(texts), allowed_special={EOT}, disallowed_special=())
        starts = np.flatnonzero(ids == self.eot_id)  # ordinary text never encodes to eot_id
        return PackedDocuments(ids.astype(dtype), np.diff(starts, append=len(ids)))

    def decode_text(self, ids):
        return self.enc.decode(ids)

    def meta(self):
        return dict(GPT2_META)


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_proto):
        import sentencepiece as spm
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eot_id = self.sp.eos_id()

    @classmethod
    def train(cls, lines, vocab_size=4096, model_type="bpe"):
        """Train on an iterable of text lines (the training split only), each at most
        SP_MAX_LINE_BYTES of UTF-8 (see sentencepiece_lines)."""
        import sentencepiece as spm
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, max_sentence_length=SP_MAX_LINE_BYTES,
            vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True,                 # any byte is encodable: no <unk> ever
            normalization_rule_name="identity",  # keep text exactly as given (we NFC it ourselves)
            add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n"],         # lines are fed one by one; newline is a piece
            unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
            character_coverage=1.0, num_threads=1,  # one thread: same model bytes every run
            train_extremely_large_corpus=False, minloglevel=2,
        )
        return cls(model.getvalue())

    def encode(self, text):
        return self.sp.encode(text)

    def shown_specials(self):
        # sentencepiece drops control ids when decoding; show end-of-text like the others do
        return {**super().shown_specials(), self.eot_id: EOT}

    def decode_text(self, ids):
        return self.sp.decode(ids)

    def meta(self):
        return {"kind": "sentencepiece", "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "model_b64": base64.b64encode(self.proto).decode("ascii")}


class WordPieceTokenizer(Tokenizer):
    """BERT's tokenizer, for BERT folders imported with init_from=hf:PATH: split text into words
    and punctuation (lower-cased and accents stripped for uncased models), then each word into
    the longest pieces of vocab.txt from the left, continuations marked ##. [CLS], which opens
    every BERT input, plays end-of-text's part (it opens each document here); [MASK] is the
    mask token. The vocabulary lives in meta(), so checkpoints carry it."""
    kind = "wordpiece"

    def __init__(self, vocab, lowercase=True):
        self.vocab, self.lowercase = list(vocab), lowercase
        self.ids = {piece: i for i, piece in enumerate(self.vocab)}
        missing = [t for t in ("[CLS]", "[MASK]", "[UNK]") if t not in self.ids]
        if missing:
            raise ValueError(f"a BERT vocabulary needs {', '.join(missing)}")
        self.vocab_size, self.eot_id, self.unk_id = len(self.vocab), self.ids["[CLS]"], self.ids["[UNK]"]

    @property
    def mask_id(self):
        return self.ids["[MASK]"]

    @classmethod
    def from_folder(cls, path):
        vocab_path = os.path.join(path, "vocab.txt")
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(f"{path}: no vocab.txt, the BERT tokenizer's vocabulary")
        with open(vocab_path, encoding="utf-8") as f:
            vocab = [line.rstrip("\n") for line in f]
        settings_path = os.path.join(path, "tokenizer_config.json")
        settings = {}
        if os.path.isfile(settings_path):
            with open(settings_path) as f:
                settings = json.load(f)
        return cls(vocab, settings.get("do_lower_case", True))

    def words(self, text):
        """BERT's basic tokenizer: whitespace and punctuation split, control characters dropped."""
        import unicodedata
        if self.lowercase:
            text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
        words, word = [], []
        for c in text:
            cat = unicodedata.category(c)
            if (cat in ("Cc", "Cf") and c not in "\t\n\r") or c in "\x00\ufffd":
                continue
            if c in " \t\n\r" or cat == "Zs" or cat.startswith("P") or (c.isascii() and not c.isalnum()):
                words += ["".join(word)] if word else []
                word = []
                if not (c in " \t\n\r" or cat == "Zs"):
                    words.append(c)  # punctuation is a word of its own
            else:
                word.append(c)
        return words + (["".join(word)] if word else [])

    def encode(self, text):
        ids = []
        for word in self.words(text):
            pieces, start = [], 0
            while start < len(word) and len(word) <= 100:
                end = len(word)
                while end > start and (("##" if start else "") + word[start:end]) not in self.ids:
                    end -= 1
                if end == start:
                    break
                pieces.append(self.ids[("##" if start else "") + word[start:end]])
                start = end
            ids += pieces if start == len(word) and pieces else [self.unk_id]
        return ids

    def decode_text(self, ids):
        return " ".join(self.vocab[i] for i in ids).replace(" ##", "")

    def meta(self):
        return {"kind": "wordpiece", "vocab_size": self.vocab_size, "eot_id": self.eot_id, "mask_id": self.mask_id,
                "lowercase": self.lowercase, "vocab": self.vocab}


def write_wordpiece_files(meta, out_dir):
    """vocab.txt + tokenizer_config.json, for transformers' BertTokenizer."""
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(piece + "\n" for piece in meta["vocab"]))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": meta["lowercase"]}, f)


# sentencepiece's trainer silently skips every line longer than max_sentence_length bytes: a
# corpus with one long paragraph or speech per line would train on nothing at all
SP_MAX_LINE_BYTES = 4192


def sentencepiece_lines(texts, max_bytes=SP_MAX_LINE_BYTES):
    """The lines of texts, each ending in a newline, with any line longer than max_bytes of UTF-8
    cut into pieces that fit (at the last space of a piece where there is one)."""
    for text in texts:
        for line in text.split("\n"):
            line += "\n"
            while len(line.encode("utf-8")) > max_bytes:
                piece = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")  # whole characters
                space = piece.rfind(" ")
                piece = piece[:space + 1] if space > 0 else piece
                yield piece
                line = line[len(piece):]
            yield line


def build_tokenizer(cfg, train_texts):
    """The tokenizer named by cfg.tokenizer. char and sentencepiece learn from the first
    cfg.tokenizer_sample_chars characters of train_texts (an iterable of the training split's
    documents, read lazily) and record in .trained_on how much they read. With tokenizer_from,
    that dataset's tokenizer as it is (characters it never saw become its unknown token)."""
    if cfg.tokenizer_from:
        from data import load_meta  # (data imports this module)
        if not os.path.isfile(os.path.join(cfg.tokenizer_from, "meta.json")):
            raise DataError(f"tokenizer_from={cfg.tokenizer_from}: no prepared dataset there (no meta.json); name a "
                            f"data_dir that a prepare script wrote")
        return from_meta(load_meta(cfg.tokenizer_from)["tokenizer"], cfg.gpt2_bpe_path, cfg.cache_dir)
    if cfg.tokenizer == "gpt2":
        return GPT2Tokenizer(cfg.gpt2_bpe_path, cfg.cache_dir)
    texts, trained_on = take_sample(train_texts, cfg.tokenizer_sample_chars)
    if not texts:
        raise DataError("the train split has no documents to learn the tokenizer from; give more documents")
    if cfg.tokenizer == "char":
        tok = CharTokenizer.train("".join(texts))
        tok.trained_on = trained_on
        return tok
    counted = {"lines": 0}

    def counting(lines):
        for line in lines:
            counted["lines"] += 1
            yield line
    try:
        tok = SentencePieceTokenizer.train(counting(sentencepiece_lines(texts)), cfg.sp_vocab_size,
                                           cfg.sp_model_type)
    except RuntimeError as e:  # e.g. a vocabulary larger than the text allows
        raise DataError(f"sentencepiece could not train on the training split: {e}") from None
    tok.trained_on = {**trained_on, **counted}
    return tok


def take_sample(texts, limit):
    """The first `limit` characters of texts (the last document cut to fit), and a record of them."""
    sample, chars, whole = [], 0, True
    for text in texts:
        if chars >= limit:
            whole = False
            break
        sample.append(text[:limit - chars])
        chars += len(sample[-1])
        whole = len(sample[-1]) == len(text)
    return sample, {"documents": len(sample), "characters": chars, "whole_split": whole, "limit": limit}


def mask_id_of(meta):
    """The mask token's id for a tokenizer's meta(): right after its text vocabulary."""
    return meta.get("mask_id", meta["vocab_size"])


def model_vocab_size(meta, arch):
    """The rows a model's embedding table needs for a tokenizer (its meta()): an encoder's has
    one more, for the mask token."""
    return max(meta["vocab_size"], mask_id_of(meta) + 1) if arch == "bert" else meta["vocab_size"]


def from_meta(meta, bpe_path="", cache_dir="data/cache"):
    """Rebuild a tokenizer from the dict its meta() wrote (meta.json['tokenizer']). A table that
    does not make the vocabulary it records (a cut or edited list) is a DataError here, not a
    crash when the first sample decodes an id past its end."""
    kind = meta["kind"]
    if kind == "char":
        tok = CharTokenizer(meta["chars"])
    elif kind == "gpt2":
        tok = GPT2Tokenizer(bpe_path, cache_dir)
    elif kind == "sentencepiece":
        tok = SentencePieceTokenizer(base64.b64decode(meta["model_b64"]))
    elif kind == "wordpiece":
        tok = WordPieceTokenizer(meta["vocab"], meta["lowercase"])
    else:
        raise DataError(f"unknown tokenizer kind {kind!r} in meta.json")
    if tok.vocab_size != meta["vocab_size"]:
        raise DataError(f"the {kind} tokenizer's table makes {tok.vocab_size} tokens where its meta says "
                        f"{meta['vocab_size']}: the table was cut or edited; prepare the data again")
    return tok


def load_gpt2_encoding(bpe_path="", cache_dir="data/cache"):
    """GPT-2's tiktoken Encoding, from the first source that works (see the module docstring)."""
    import tiktoken
    if bpe_path:
        if not os.path.isfile(bpe_path):
            raise ConfigError(f"gpt2_bpe_path={bpe_path}: no such file; point it at a gpt2.tiktoken ranks file, "
                              f"or leave it empty")
        return _gpt2_from_ranks_file(bpe_path)
    cached = os.path.join(cache_dir, "gpt2.tiktoken")
    if os.path.isfile(cached):  # fetched before (sha256-checked then): no network round trip
        return _gpt2_from_ranks_file(cached)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # offline: tiktoken could not download its files
        pass
    fetch_sdist_member(*WHISPER_SDIST, GPT2_RANKS_MEMBER, GPT2_RANKS_SHA256, cached, cache_dir)
    return _gpt2_from_ranks_file(cached)


def _gpt2_from_ranks_file(path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(path)
    if len(ranks) != GPT2_EOT_ID:
        raise DataError(f"{path}: has {len(ranks)} BPE ranks, GPT-2 has {GPT2_EOT_ID}; not GPT-2's ranks file (or a "
                        f"truncated one)")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: GPT2_EOT_ID}, explicit_n_vocab=GPT2_EOT_ID + 1)


# ----------------------------------------------------------------------------- GPT-2 files for transformers

def write_gpt2_tokenizer_files(out_dir):
    """vocab.json + merges.txt (transformers' GPT2Tokenizer format) from tiktoken's ranks."""
    enc = load_gpt2_encoding()
    ranks = enc._mergeable_ranks  # bytes -> rank; tiktoken keeps the table here
    byte_char = gpt2_byte_to_unicode()

    def as_text(token):
        return "".join(byte_char[b] for b in token)
    vocab = {as_text(tok): rank for tok, rank in ranks.items()}
    vocab[EOT] = GPT2_EOT_ID
    merges = [" ".join(as_text(p) for p in split_by_ranks(tok, ranks))
              for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]) if len(tok) > 1]
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
                   "model_max_length": 1024}, f)


def split_by_ranks(token, ranks):
    """The two pieces BPE merged last to make `token`: replay BPE on its bytes using only merges
    ranked below the token's own rank."""
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], math.inf))
        if ranks.get(parts[best] + parts[best + 1], math.inf) >= limit:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def gpt2_byte_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters:
    printable latin-1 bytes map to themselves, the rest to code points from 256 upward."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
