# Quick start: a small character-level model that trains on a 2-core laptop CPU in a few
# minutes and samples recognisable (if unsteady) verse.   python train.py configs/shakespeare_char_cpu.py
out_dir = "out/shakespeare_char_cpu"
dataset = "shakespeare"
tokenizer = "char"
device = "cpu"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0

batch_size = 12
max_iters = 2000
learning_rate = 3e-3  # 1e-3 reached val 1.919, 3e-3 1.769 (docs/LOG.md)
min_lr = 3e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 50
