# The convolutional baseline at the quick start's budget: 5 gated conv blocks of width 136 with
# 4 taps have 0.85M parameters (the quick-start transformer 0.83M, the LSTM 0.84M); dilations
# 1, 2, 4, 8, 16 let the last position read 94 tokens, more than block_size. Same data, steps and
# schedule; compare with
#   python evaluate.py --out_dir=out/shakespeare_cnn_cpu    (bits per character on the test plays)
out_dir = "out/shakespeare_cnn_cpu"
dataset = "shakespeare"
tokenizer = "char"
device = "cpu"

arch = "cnn"
n_layer = 5
n_embd = 136
conv_kernel = 4
conv_dilation = 2
block_size = 64
dropout = 0.0

batch_size = 12
max_iters = 2000
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 50
