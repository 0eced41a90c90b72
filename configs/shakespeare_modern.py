# The same budget as shakespeare_char.py with a current architecture: RoPE, RMSNorm, QK-norm,
# ReLU² MLP, no biases, untied output head, logit softcap, warmup-stable-decay schedule.
# python train.py configs/shakespeare_modern.py
out_dir = "out/shakespeare_modern"
dataset = "shakespeare"
tokenizer = "char"

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2
bias = False
norm = "rmsnorm"
pos = "rope"
mlp = "relu2"
qk_norm = True
tie_embeddings = False
logit_softcap = 30.0

batch_size = 64
max_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
lr_schedule = "wsd"
decay_frac = 0.3
warmup_iters = 100
eval_interval = 250
eval_iters = 200
