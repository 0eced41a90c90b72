# Genre classification (comedy / history / tragedy) of 20-line passages, test plays unseen.
# A classification head on the pretrained trunk, with the seed-001 techniques switched on.
#   python train.py configs/shakespeare_char.py && python finetune.py configs/finetune_genre.py
# CPU (minutes): start from the quick-start model instead; its context is 64 characters:
#   python finetune.py configs/finetune_genre.py --init_from=out/shakespeare_char_cpu --block_size=64 \
#       --device=cpu --batch_size=32 --max_iters=600 --out_dir=out/finetune_genre_cpu
# No-transfer baseline: the same run from fresh weights: --init_from=scratch (plus the base's shape keys).
task = "classify"
init_from = "out/shakespeare_char"
out_dir = "out/finetune_genre"
task_dir = "data/shakespeare_genre"   # prepared automatically (prepare/genre.py)
dataset = "shakespeare"
tokenizer = "char"

block_size = 256
classify_pool = "mean"
batch_size = 32
max_iters = 1000
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 50
weight_decay = 0.1
dropout = 0.1
lr_layer_decay = 0.8       # lower blocks move less: they hold the general language knowledge
unfreeze_every = 100       # ULMFiT: head + last block first, one more block every 100 steps

eval_interval = 50
eval_iters = 10
best_metric = "val_macro_f1"
patience = 6               # early stopping on validation macro-F1
