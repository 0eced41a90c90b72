# The recurrent baseline at the quick start's budget: a 2-layer LSTM of width 224 has 0.84M
# parameters, the quick-start transformer 0.83M. Same data, steps and schedule; compare with
#   python evaluate.py --out_dir=out/shakespeare_lstm_cpu    (bits per character on the test plays)
out_dir = "out/shakespeare_lstm_cpu"
dataset = "shakespeare"
tokenizer = "char"
device = "cpu"

arch = "lstm"
n_layer = 2
n_embd = 224
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
