# First Folio spelling -> modern spelling by supervised fine-tuning (loss on the modern text only).
# The bar: the copy baseline (output = input) scores BLEU ~40 on the test plays.
#   python train.py configs/shakespeare_char.py && python finetune.py configs/finetune_folio.py
#   python evaluate.py configs/finetune_folio.py --eval_task=generate --temperature=0
# CPU (about 10 + 25 minutes on 2 cores): a quick-start-sized modern model with a 128-character
# context, then fine-tuning with Muon; only speeches whose prompt fits the context take part
# (skip_long), in training and in evaluation alike:
#   python train.py configs/shakespeare_modern_cpu.py --block_size=128 --muon_lr=0.02 \
#       --out_dir=out/shakespeare_char_cpu128
#   python finetune.py configs/finetune_folio.py --init_from=out/shakespeare_char_cpu128 --block_size=128 \
#       --device=cpu --batch_size=32 --optimizer=muon --muon_lr=0.01 --muon_weight_decay=0.1 \
#       --learning_rate=1e-3 --min_lr=1e-4 --dropout=0.0 --eval_interval=200 --out_dir=out/finetune_folio_cpu128
#   python evaluate.py configs/finetune_folio.py --out_dir=out/finetune_folio_cpu128 --block_size=128 \
#       --device=cpu --eval_task=generate --temperature=0 --batch_size=32
task = "sft"
init_from = "out/shakespeare_char"
out_dir = "out/finetune_folio"
task_dir = "data/shakespeare_folio"   # prepared automatically (prepare/folio.py)
dataset = "shakespeare"
tokenizer = "char"
prompt_template = "{prompt}\n>\n"     # short: every character of context counts in a char model
skip_long = True

block_size = 256
batch_size = 32
max_iters = 2000
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 50
weight_decay = 0.1
dropout = 0.1

eval_interval = 100
eval_iters = 10
patience = 5               # early stopping on validation loss of the completions
