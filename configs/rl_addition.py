# Multi-digit addition, step 2 of 2: reinforcement learning with a verifiable reward (GRPO-style)
# from the SFT model of configs/sft_addition.py. Each step samples rl_group_size answers to each of
# batch_size problems, scores them with prepare/addition.py's reward (1 if the sum is right), and
# raises the answers that beat their group. loss.png shows the reward curve. CPU, a few minutes:
#   python finetune.py configs/rl_addition.py
#   python evaluate.py configs/rl_addition.py --eval_task=generate --temperature=0
task = "rl"
init_from = "out/sft_addition"
out_dir = "out/rl_addition"
task_dir = "data/shakespeare_addition"
reward = "prepare.addition:reward"
prompt_template = "{prompt} is "         # as in SFT: the model reads prompts the way it learned them
device = "cpu"

block_size = 128
batch_size = 16            # problems per step
rl_group_size = 8          # sampled answers per problem
temperature = 1.0          # sample the model's own distribution
max_new_tokens = 5         # at most 3 digits and end-of-text
rl_kl_coef = 0.0
max_iters = 300
learning_rate = 3e-4   # 1e-3 collapsed to reward 0 (docs/LOG.md)
min_lr = 3e-5
warmup_iters = 10
dropout = 0.0
eval_interval = 25
log_interval = 5
