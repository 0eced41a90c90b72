"""What only CUDA can show (issue 33), in under a minute on one GPU; gpu_figures.sh's first
section runs it. Not a pytest file (CI has no GPU): run `python tests/gpu_smoke.py`. Each check
prints one line, PASS or FAIL with the numbers; the exit code counts the failures.

  1. RNG        each process saves and restores its own device's state (a resume on fewer GPUs)
  2. dtypes     under bf16 autocast: float32 residual stream, float32 softcapped logits, a bf16
                KV cache with qk_norm, bf16 attention inputs
  3. flex       FlexAttention against SDPA: outputs and gradients, with a document mask, GQA
                and qk_norm (FlexAttention's backward has no CPU kernel, so CI cannot check it)
  4. loss       the chunked cross-entropy's backward against one float32 call, 1k to 8k rows:
                time and peak memory (the figures for docs/benchmarks.md)
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distributed import rng_state, set_rng_state  # noqa: E402
from generate import KVCache  # noqa: E402
from model import GPT, GPTConfig, document_ids  # noqa: E402
from systems import chunked_cross_entropy  # noqa: E402

failures = []


def report(name, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def check_rng():
    state = rng_state()
    a = torch.rand(3, device="cuda")
    set_rng_state(state)
    b = torch.rand(3, device="cuda")
    report("rng", isinstance(state["cuda"], torch.Tensor) and torch.equal(a, b),
           f"one device's state saved ({torch.cuda.device_count()} visible), restored draws equal")


def check_dtypes():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, vocab_size=100,
                       logit_softcap=15.0, qk_norm=True, pos="rope", norm="rmsnorm")
    model = GPT(config).cuda()
    seen = {}

    def note(name):  # a forward pre-hook that records its input's dtype (and returns None: inputs unchanged)
        return lambda module, args: seen.setdefault(name, args[0].dtype) and None
    model.transformer.h[1].register_forward_pre_hook(note("block input"))
    model.transformer.h[0].attn.c_proj.register_forward_pre_hook(note("attention output"))
    idx = torch.randint(100, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = model(idx)
        cache = KVCache(model, 2, 32)
        model(idx, cache=cache)
    got = {**seen, "logits": logits.dtype, "kv cache": cache.k.dtype}
    want = {"block input": torch.float32, "attention output": torch.bfloat16, "logits": torch.float32,
            "kv cache": torch.bfloat16}
    report("bf16 dtypes", got == want, ", ".join(f"{k} {v}" for k, v in got.items()))


def check_flex():
    torch.manual_seed(0)
    base = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128, vocab_size=100, qk_norm=True,
                pos="rope", dropout=0.0)
    sdpa = GPT(GPTConfig(**base, attn_backend="sdpa")).cuda()
    flex = GPT(GPTConfig(**base, attn_backend="flex")).cuda()
    flex.load_state_dict(sdpa.state_dict())
    idx = torch.randint(1, 100, (4, 128), device="cuda")
    idx[:, ::37] = 0  # documents start at every end-of-text (id 0)
    y = torch.roll(idx, -1, 1)
    results = []
    for model in (sdpa, flex):
        logits, loss = model(idx, y, doc_ids=document_ids(idx, 0))
        loss.backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    worst_grad = max((g1[n] - g2[n]).abs().max().item() for n in g1)
    worst_logit = (l1 - l2).abs().max().item()
    report("flex vs sdpa", worst_logit < 1e-3 and worst_grad < 1e-3,
           f"float32, doc mask + GQA + qk_norm: max logit diff {worst_logit:.2e}, max grad diff {worst_grad:.2e}")


def check_loss_cost():
    V = 50304
    for rows in (1024, 2048, 4096, 8192):
        logits = torch.randn(rows, V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(V, (rows,), device="cuda")
        timings = {}
        for name, fn in (("chunked", lambda: chunked_cross_entropy(logits[None], targets[None])),
                         ("one float32 call", lambda: F.cross_entropy(logits.float(), targets))):
            fn().backward()  # warm up
            logits.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            fn().backward()
            torch.cuda.synchronize()
            timings[name] = (time.perf_counter() - t0) * 1e3, (torch.cuda.max_memory_allocated() - base) / 2**20
            logits.grad = None
        print("  loss at", rows, "rows:", "; ".join(f"{k} {ms:.1f} ms, peak +{mb:.0f} MiB"
                                                 for k, (ms, mb) in timings.items()), flush=True)
    report("chunked loss", True, "figures above")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_smoke.py needs a CUDA GPU")
    print("torch", torch.__version__, "|", torch.cuda.get_device_name(), flush=True)
    for check in (check_rng, check_dtypes, check_flex, check_loss_cost):
        try:
            check()
        except Exception as e:  # one failed check must not hide the others
            report(check.__name__, False, f"{type(e).__name__}: {e}")
    sys.exit(len(failures))
