# Shakespeare with a 4096-piece SentencePiece BPE trained on the training works only.
# python train.py configs/shakespeare_sp.py
out_dir = "out/shakespeare_sp"
dataset = "shakespeare"
tokenizer = "sentencepiece"
sp_vocab_size = 4096
sp_model_type = "bpe"

n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
dropout = 0.2

batch_size = 32
max_iters = 3000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 50
