# Character-level Shakespeare at GPU size: 6 layers x 6 heads x 384 wide, context 256
# (nanoGPT's shakespeare_char shape).   python train.py configs/shakespeare_char.py
out_dir = "out/shakespeare_char"
dataset = "shakespeare"
tokenizer = "char"

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2

batch_size = 64
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99  # small batches of tokens: a shorter second-moment memory helps
warmup_iters = 100
eval_interval = 250
eval_iters = 200
log_interval = 10
