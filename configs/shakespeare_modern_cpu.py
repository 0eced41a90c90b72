# The quick-start budget (4 layers x 128, batch 12 x 64, 2000 steps on a 2-core CPU) with the
# modern block, a SwiGLU MLP, x0 mixing and Muon: val 1.541 against the classic quick start's
# 1.759 (whole val split), with fewer parameters (812k vs 818k). Aimed at val 1.87 instead, a
# short schedule (momentum 0.9 and a higher AdamW lr suit a few hundred steps) gets there in
# 0.24-0.31 of the classic's time (docs/benchmarks.md):
#   python train.py configs/shakespeare_modern_cpu.py
#   python train.py configs/shakespeare_modern_cpu.py --max_iters=275 --warmup_iters=50 --eval_interval=50 \
#       --muon_lr=0.01 --muon_momentum=0.9 --learning_rate=6e-3
out_dir = "out/shakespeare_modern_cpu"
dataset = "shakespeare"
tokenizer = "char"
device = "cpu"
preset = "modern"
optimizer = "muon"
mlp = "swiglu"          # ReLU2 (the preset's): val 1.567 (20-batch estimates, docs/LOG.md)
x0_mix = True           # blocks blend in the token embeddings: val 1.537 vs 1.544 without (3 seeds)

n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0

batch_size = 12
max_iters = 2000
learning_rate = 3e-3   # AdamW: embeddings, head, norms
muon_lr = 0.005        # 0.02 reached 1.595, 0.01 1.576, 0.005 1.567, 0.0025 1.568 (docs/LOG.md)
muon_weight_decay = 0.1  # each step x (1 - muon_lr_t * 0.1): what the figures above were measured with
min_lr = 3e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 20
log_interval = 50
