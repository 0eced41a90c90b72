# Conversation fine-tuning on CPU: the quick-start model with a 256-character context, then
# task=chat on the plays' dialogue and the addition questions (prepare/chat.py, made on first use).
#   python train.py configs/shakespeare_char_cpu.py --block_size=256 --out_dir=out/shakespeare_char_cpu256
#   python finetune.py configs/chat_cpu.py
#   python chat.py --out_dir=out/chat_cpu            # or --serve for the web page
task = "chat"
init_from = "out/shakespeare_char_cpu256"
out_dir = "out/chat_cpu"
task_dir = "data/shakespeare_chat"
device = "cpu"

block_size = 256
batch_size = 16
max_iters = 800
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
eval_interval = 200
eval_iters = 20
