# GPT-2 small (124M) pretrained on FineWeb-Edu's 10B-token sample, one epoch, as llm.c and
# nanoGPT's speedruns do. Prepare the data once (its Parquet files are downloaded one by one as
# the stream reaches them; preparation runs at ~9-13 MB/s of JSONL per core on our 2-core VM,
# memory ~0.1 GB per worker process: docs/benchmarks.md), then train on GPUs:
#   python prepare/text.py --input=hf:HuggingFaceFW/fineweb-edu/sample/10BT --tokenizer=gpt2 \
#       --data_dir=data/fineweb_edu_10B --val_fraction=0.005 --test_fraction=0.005
#   torchrun --nproc_per_node=8 train.py configs/gpt2_124m_fineweb.py
# A local copy works the same: --input=path/to/parquet_folder/ (or .jsonl/.jsonl.gz files).
out_dir = "out/gpt2_124m_fineweb"
data_dir = "data/fineweb_edu_10B"
dataset = "none"          # never prepare Shakespeare here: say so if the folder is not prepared

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0

# 16 x 1024 x 32 = 524,288 tokens per step (8 GPUs: 4 micro-batches each); 19,073 steps = 10B tokens
batch_size = 16
gradient_accumulation_steps = 32
max_iters = 19073
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 715
weight_decay = 0.1
beta2 = 0.95
eval_interval = 250
eval_iters = 20
log_interval = 10
compile = True
