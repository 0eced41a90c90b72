# Multi-digit addition as text, step 1 of 2: supervised fine-tuning on worked answers, which
# gets a small Shakespeare model part of the way (then configs/rl_addition.py). CPU, under a minute:
#   python train.py configs/shakespeare_char_cpu.py --block_size=128 --out_dir=out/base128
#   python finetune.py configs/sft_addition.py
#   python evaluate.py configs/sft_addition.py --eval_task=generate --temperature=0 --reward=prepare.addition:reward
task = "sft"
init_from = "out/base128"
out_dir = "out/sft_addition"
task_dir = "data/shakespeare_addition"   # prepared automatically (prepare/addition.py)
prompt_template = "{prompt} is "         # "63 plus 94 is 157"
device = "cpu"

block_size = 128
batch_size = 32
max_iters = 800
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 20
dropout = 0.0
eval_interval = 200
eval_iters = 10
log_interval = 10
