"""What would break at scale (issue 33), reproduced on CPU: the wrappers a multi-GPU run stacks
(DDP around a compiled model), the decisions that drive collectives, evaluation batches that
must match across processes, resumes that change precision or the number of processes, a
diverging run, the data order of an epoch, the cost of the chunked loss; then every parallel
mode with compile on and off against every task, under torchrun with 2 gloo processes."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import compute
import distributed as D
from checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint, unwrap
from conftest import ROOT, TINY_BASE
from data import RandomBatches, TokenLoader
from distributed import Processes
from generate import KVCache
from model import GPT, GPTConfig
from systems import chunked_cross_entropy
from tasks import heldout_batches
from test_posttrain import write_splits
from test_train import params_of, run_cfg, train_cmd
import train as T

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- wrappers and RNG


def test_unwrap_sees_through_ddp_around_a_compiled_model(tmp_path):
    """DDP(torch.compile(model)): the compiled wrapper has no __len__ to truth-test."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = D.wrap_ddp(torch.compile(model), torch.device("cpu"))
        assert unwrap(wrapped) is model
    finally:
        dist.destroy_process_group()


def test_each_process_saves_and_restores_only_its_own_gpu_rng(monkeypatch):
    """A resume on fewer GPUs must not restore states of devices it cannot see."""
    device_state = torch.arange(4, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: device_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, *a: restored.append(state))

    def every_device(*a):
        raise AssertionError("the RNG of every visible device is not this process's to save or restore")
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_device)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_device)
    state = D.rng_state()
    assert torch.equal(state["cuda"], device_state)
    D.set_rng_state(state)
    D.set_rng_state({**state, "cuda": [device_state, device_state + 1]})  # a checkpoint of the older format
    assert all(torch.equal(s, device_state) for s in restored) and len(restored) == 2


def test_rank_zero_decides_for_every_process(tmp_path):
    """from_master: what rank 0 saw, on every process, whatever the others saw."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "tests", "from_master_helper.py")],
                          cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("rank0-saw-this") == 2, done.stdout


# ----------------------------------------------------------------------------- GPU choices, checked on CPU


def test_auto_dtype_wants_bf16_tensor_cores_not_emulation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # V100 and T4 say so too
    for capability, dtype in [((7, 0), torch.float32), ((7, 5), torch.float32), ((8, 0), torch.bfloat16),
                              ((9, 0), torch.bfloat16)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert compute.pick_dtype("auto", torch.device("cuda")) == dtype


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12),
                                       ("NVIDIA H200", 989e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),
                                       ("NVIDIA B200", 2250e12), ("NVIDIA L4", 121e12)])
def test_peak_flops_reads_the_model_name_exactly(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert compute.peak_flops(torch.device("cuda")) == peak


def test_softcap_runs_in_float32_and_the_qk_norm_cache_in_the_autocast_dtype():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, logit_softcap=5.0,
                          qk_norm=True, pos="rope"))
    idx = torch.randint(11, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(idx)
        assert logits.dtype == torch.float32
        cache = KVCache(model, 2, 8)
        model(idx, cache=cache)
    assert cache.k.dtype == torch.bfloat16


def test_fsdp_keeps_the_residual_stream_in_float32(tmp_path):
    """Under bf16 autocast the blocks' inputs stay float32 (no unit casts them, and the root's
    embeddings stay float32), as under DDP + autocast."""
    from types import SimpleNamespace
    # (RMSNorm: CPU autocast, unlike CUDA's, does not upcast a LayerNorm's bf16 weight to meet a float32 input)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11, norm="rmsnorm"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        D.shard_model(model, SimpleNamespace(compile=False, fsdp_reshard_after_forward=True),
                      SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cpu")))
        seen = []
        model.transformer.h[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randint(11, (1, 4)))
        assert seen == [torch.float32]
        assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.float32  # (sharded, resharded after)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the chunked loss


def test_chunked_loss_is_linear_in_chunks_and_exact(monkeypatch):
    """Chunks are split(), whose backward concatenates once; slices would each allocate a
    gradient the size of all the logits (n chunks: n full-size tensors)."""
    import systems
    monkeypatch.setattr(systems, "CE_CHUNK_ELEMENTS", 7 * 40)  # 7 rows of 40 logits a chunk
    logits = torch.randn(3, 20, 40, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(40, (3, 20))
    targets[0, :5] = -1
    loss = chunked_cross_entropy(logits, targets)
    names = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            stack += [f for f, _ in fn.next_functions]
    assert not any("Slice" in n for n in names) and any("Split" in n for n in names), names
    loss.backward()
    reference = logits.detach().float().requires_grad_()
    torch.nn.functional.cross_entropy(reference.flatten(0, 1), targets.flatten(), ignore_index=-1).backward()
    assert torch.allclose(loss.float(), torch.nn.functional.cross_entropy(
        logits.detach().float().flatten(0, 1), targets.flatten(), ignore_index=-1), atol=1e-6)
    assert torch.allclose(logits.grad.float(), reference.grad, atol=1e-3)


# ----------------------------------------------------------------------------- evaluation batches


@pytest.mark.parametrize("rows,world,batch", [(5, 2, 2), (1, 4, 3), (8, 2, 4), (9, 3, 2)])
def test_every_process_gets_the_same_number_of_heldout_batches(rows, world, batch):
    """Under FSDP each batch's forward is a collective: a process with fewer batches hangs the rest."""
    splits = {"val": list(range(rows)), "train": list(range(100))}
    for split in ("train", "val"):
        dealt = [list(heldout_batches(splits, split, batch, Processes(r, world, torch.device("cpu"))))
                 for r in range(world)]
        assert len({len(d) for d in dealt}) == 1
        assert sorted(x for d in dealt for b in d for x in b) == list(range(rows))


# ----------------------------------------------------------------------------- an epoch


def test_an_epoch_reads_every_item_once_in_an_order_that_changes():
    loader = RandomBatches(30, 5, 2, 1, 0, 7, torch.device("cpu"))
    loader.make_batch, loader.count_tokens = (lambda picks: picks), (lambda picks: len(picks))
    epoch1 = [i for _ in range(6) for i in loader.next()]
    epoch2 = [i for _ in range(6) for i in loader.next()]
    assert sorted(epoch1) == sorted(epoch2) == list(range(30)) and epoch1 != epoch2


def test_a_token_epoch_tiles_the_split_with_non_overlapping_windows(char_data):
    T_ = 64
    loader = TokenLoader(char_data, "val", 8, T_, 1, 1, 0, 3, torch.device("cpu"))
    n = len(loader.data)
    for epoch in range(2):
        starts = sorted(loader.epoch_items(torch.Generator().manual_seed(epoch)).tolist())
        assert all(b - a == T_ for a, b in zip(starts, starts[1:]))  # one window after the other
        assert starts[0] < T_ and starts[-1] + T_ + 1 > n - T_ - 1  # fewer than T tokens left out at either end
    assert loader.epoch_items(torch.Generator().manual_seed(0))[0] != loader.epoch_items(
        torch.Generator().manual_seed(1))[0]


def test_the_position_in_an_epoch_resumes_exactly_on_another_number_of_processes():
    """Mid-epoch, and across an epoch's end: 2 processes from a 1-process state draw what 1 would."""
    one = RandomBatches(23, 3, 2, 1, 0, 5, torch.device("cpu"))
    one.make_batch, one.count_tokens = (lambda p: p), (lambda p: len(p))
    for _ in range(6):
        one.next()
    state = one.state_dict()
    ahead = [one.next() for _ in range(10)]  # runs past the end of the first epoch (23 items, 6 a step)
    two = [RandomBatches(23, 3, 1, 2, r, 5, torch.device("cpu")) for r in range(2)]
    for loader in two:
        loader.make_batch, loader.count_tokens = (lambda p: p), (lambda p: len(p))
        loader.load_state_dict(state)
    assert [two[r].next() for _ in range(5) for r in range(2)] == ahead


# ----------------------------------------------------------------------------- checkpoints


def test_the_best_checkpoint_is_serialised_once(tmp_path, monkeypatch):
    state = {"model": {"w": torch.randn(10)}, "iter_num": 3}
    saves = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: saves.append(1) or real(*a, **k))
    save_checkpoint(state, str(tmp_path / "ckpt_best.pt"))
    copy_checkpoint(str(tmp_path / "ckpt_best.pt"), str(tmp_path / "ckpt_last.pt"))
    assert len(saves) == 1
    assert (tmp_path / "ckpt_best.pt").read_bytes() == (tmp_path / "ckpt_last.pt").read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_resume_may_switch_to_float16(char_data, tmp_path):
    """dtype may change on resume; a float32 run has no loss-scaler state for float16 to load."""
    T.train(run_cfg(char_data, tmp_path, max_iters=2, eval_interval=2))
    out = T.train(run_cfg(char_data, tmp_path, init_from="resume", max_iters=4, eval_interval=2, dtype="float16"))
    assert out["iter_num"] == 4


def test_a_diverging_run_stops_with_one_line_and_keeps_finite_weights(char_data, tmp_path):
    done = subprocess.run(train_cmd(char_data, tmp_path, "--max_iters=40", "--eval_interval=2", "--warmup_iters=0",
                                    "--learning_rate=1000", "--grad_clip=0"),
                          cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at iteration"), done.stderr[-2000:]
    assert all(torch.isfinite(w).all() for w in params_of(str(tmp_path / "ckpt_last.pt")).values())
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))


# ----------------------------------------------------------------------------- every mode with every task


@pytest.fixture(scope="module")
def task_sets(tmp_path_factory):
    """Small task sets with an odd number of val rows: 2 processes with batches of 2 get unequal shares."""
    root = tmp_path_factory.mktemp("tasks")
    words = ["the king", "my lord", "sweet love", "come away", "thou art", "good night", "fair queen"]
    pairs = [{"prompt": w, "chosen": " is good", "rejected": " is goode"} for w in words]
    return {
        "sft": write_splits(root / "sft", {"train": [{"prompt": w, "completion": " yes"} for w in words],
                                          "val": [{"prompt": w, "completion": " no"} for w in words[:5]]}),
        "classify": write_splits(root / "classify", {
            "train": [{"text": w, "label": ["a", "b"][i % 2]} for i, w in enumerate(words)],
            "val": [{"text": w, "label": ["a", "b"][i % 2]} for i, w in enumerate(words[:5])]}),
        "dpo": write_splits(root / "dpo", {"train": pairs, "val": pairs[:5]}),
        "rl": write_splits(root / "rl", {split: [{"prompt": f"{a} plus {a}", "completion": str(2 * a)}
                                                 for a in range(n)] for split, n in (("train", 7), ("val", 5))}),
        "chat": write_splits(root / "chat", {split: [{"messages": [{"role": "user", "content": w},
                                                                   {"role": "assistant", "content": " yes"}]}
                                                     for w in words[:n]] for split, n in (("train", 7), ("val", 5))}),
        "bias": write_splits(root / "bias", {"test": [{"a": "The king is wise.", "b": "The queen is wise."},
                                                      {"a": "He is brave.", "b": "She is brave."}]}) / "test.jsonl",
    }


def torchrun(script, n, *args):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    return subprocess.run([*launcher, script, *args], cwd=ROOT, capture_output=True, text=True, env=ENV,
                          timeout=600)


MODES = [("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pretrain", "pretrain-cnn", "sft", "classify", "dpo", "rl", "chat"])
@pytest.mark.parametrize("parallel,compiled", MODES, ids=[f"{p}-{'compile' if c else 'eager'}" for p, c in MODES])
def test_every_parallel_mode_trains_every_task(base_run, char_data, task_sets, tmp_path, parallel, compiled, task):
    """A few steps through two evaluations and saves, under torchrun with 2 processes; what is
    refused by design says so in one line. Pretraining (the gated CNN too) and SFT also score the
    bias probe at each evaluation (bias_file), whose forwards every process runs."""
    common = [f"--parallel={parallel}", f"--compile={compiled}", "--max_iters=4", "--eval_interval=2",
              "--gradient_accumulation_steps=2", f"--out_dir={tmp_path / 'run'}"]
    probed = task in ("pretrain", "pretrain-cnn", "sft")
    if probed:
        common.append(f"--bias_file={task_sets['bias']}")
    if task.startswith("pretrain"):
        arch = ["--arch=cnn", "--conv_kernel=3"] if task == "pretrain-cnn" else []
        done = torchrun("train.py", 2, *train_cmd(char_data, tmp_path / "run")[2:], *arch, *common)
    else:
        kw = {**TINY_BASE, "init_from": base_run, "task": task, "task_dir": task_sets[task], "dropout": 0.0,
              "learning_rate": 1e-3}
        if task == "rl":
            kw.update(reward="prepare.addition:reward", max_new_tokens=3, temperature=1.0, rl_group_size=2)
        done = torchrun("finetune.py", 2, *[f"--{k}={v}" for k, v in kw.items()], *common)
    if parallel == "fsdp" and task in ("dpo", "rl"):
        assert done.returncode != 0
        assert f"error: task={task} runs with parallel=ddp" in done.stderr
        return
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["kind"] == "eval"] == [2, 4]
    assert all(("bias_gap" in r) == probed for r in rows if r["kind"] == "eval")
    ckpt = "ckpt_last.dcp" if parallel == "fsdp" else "ckpt_last.pt"
    assert (tmp_path / "run" / ckpt).exists()
    assert load_checkpoint(str(tmp_path / "run" / ckpt))["iter_num"] == 4


@pytest.mark.slow
def test_a_ddp_run_resumes_on_fewer_processes(char_data, tmp_path):
    """2 processes for 4 steps, then 1 process to 8 == 1 process for 8 (accumulation 2, no dropout)."""
    steady = ["--dropout=0.0", "--gradient_accumulation_steps=2", "--warmup_iters=0", "--lr_schedule=constant",
              "--eval_interval=4"]
    done = torchrun("train.py", 2, *train_cmd(char_data, tmp_path / "two")[2:], *steady, "--max_iters=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(load_checkpoint(str(tmp_path / "two" / "ckpt_last.pt"))["rng"]) == 2
    for out, extra in [(tmp_path / "two", ["--init_from=resume"]), (tmp_path / "one", [])]:
        done = subprocess.run(train_cmd(char_data, out, *steady, "--max_iters=8", *extra), cwd=ROOT,
                              capture_output=True, text=True, env=ENV)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = params_of(str(tmp_path / "two" / "ckpt_last.pt")), params_of(str(tmp_path / "one" / "ckpt_last.pt"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k



@pytest.mark.slow
def test_a_mix_of_datasets_on_two_processes_equals_accumulation_on_one(char_data, tmp_path):
    """data_dir=A,B with data_weights: 2 processes for 4 steps == 1 process with accumulation 2."""
    mix = [f"--data_dir={char_data},{char_data}", "--data_weights=0.7,0.3", "--dropout=0.0", "--warmup_iters=0",
           "--gradient_accumulation_steps=2", "--lr_schedule=constant", "--eval_interval=4", "--max_iters=4"]
    done = torchrun("train.py", 2, *train_cmd(char_data, tmp_path / "two")[2:], *mix)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(train_cmd(char_data, tmp_path / "one", *mix), cwd=ROOT, capture_output=True, text=True,
                          env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = params_of(str(tmp_path / "two" / "ckpt_last.pt")), params_of(str(tmp_path / "one" / "ckpt_last.pt"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_fsdp_reduces_every_micro_batch():
    """Holding FSDP's gradient sync back until the last micro-batch kept every block's unsharded
    gradient in memory in between: gradient_sync no longer turns it off (DDP's no_sync stays)."""
    calls = []

    class FakeFSDP(torch.nn.Module):
        def set_requires_gradient_sync(self, enabled):
            calls.append(enabled)
    with D.gradient_sync(FakeFSDP(), enabled=False):
        pass
    assert False not in calls


def test_the_garbage_collector_runs_only_at_evaluations_during_training(char_data, tmp_path, monkeypatch):
    """One process's collector pause stalls every process under DDP/FSDP: automatic collection is
    off inside the loop, and on again after it."""
    import gc
    import tasks
    seen = []
    real = tasks.LMTask.loss

    def loss(self, model, batch):
        seen.append(gc.isenabled())
        return real(self, model, batch)
    monkeypatch.setattr(tasks.LMTask, "loss", loss)
    T.train(run_cfg(char_data, tmp_path, max_iters=2, eval_interval=2))
    assert seen == [False, False] and gc.isenabled()
