# Shakespeare with GPT-2's BPE (50257 tokens): a small word-piece model trained from scratch.
# python train.py configs/shakespeare_gpt2.py   (add --device=cpu --max_iters=500 on a laptop)
out_dir = "out/shakespeare_gpt2"
dataset = "shakespeare"
tokenizer = "gpt2"

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2

batch_size = 32
max_iters = 3000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 100
eval_interval = 250
eval_iters = 50
