# GPT-2 small (124M) at context 1024, GPT-2's own hyperparameters. Meant for GPUs:
#   torchrun --nproc_per_node=8 train.py configs/gpt2_124m.py
# The global batch is ~0.5M tokens, 12 x 1024 x 40, however many GPUs share it: accumulation
# counts micro-batches over all processes (8 GPUs run 5 each; 1 GPU runs all 40). It must divide
# by the number of processes. The default data is Shakespeare in GPT-2 tokens, enough for
# benchmarks, far too small for pretraining: configs/gpt2_124m_fineweb.py pretrains on FineWeb-Edu.
out_dir = "out/gpt2_124m"
dataset = "shakespeare"
tokenizer = "gpt2"

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0

batch_size = 12
gradient_accumulation_steps = 40
max_iters = 600000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta2 = 0.95
eval_interval = 1000
eval_iters = 200
compile = True
