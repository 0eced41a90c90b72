# The quick start as an encoder: the same blocks without the causal mask, pretrained as a masked
# language model (15% of characters hidden; RoBERTa's dynamic masking), then fine-tuned to classify.
#   python train.py configs/shakespeare_bert_cpu.py
#   python sample.py --out_dir=out/shakespeare_bert_cpu --start="To be, or not to b<|mask|>"
#   python finetune.py configs/finetune_genre.py --init_from=out/shakespeare_bert_cpu --block_size=64 \
#       --classify_pool=first --device=cpu --batch_size=32 --max_iters=600 --out_dir=out/genre_bert_cpu
# (BERT's exact architecture, with post-norm and token types: preset = "bert")
out_dir = "out/shakespeare_bert_cpu"
dataset = "shakespeare"
tokenizer = "char"
device = "cpu"

arch = "bert"
mask_prob = 0.15
n_layer = 4
n_head = 4
n_embd = 128
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
