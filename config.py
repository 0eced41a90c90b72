"""
The one config namespace shared by every script.

Every key any script reads is declared once below with its type, default and a one-line meaning.
A run's config is built in three layers, later layers winning:

    defaults (this file)  ->  config files (plain Python `key = value`)  ->  --key=value overrides

Config files and overrides are applied in the order they appear on the command line, so
`python train.py configs/a.py --lr=1e-3 configs/b.py` lets b.py override the learning rate again.
An unknown key is an error that suggests the closest known key; a value of the wrong type is an
error that names the key, the expected type and what was given. Each key also records which
scripts read it, so `python X.py --help` lists the keys X reads (then only the names of the rest).

Read it as: KEYS (the table), then load_config() (how argv becomes a Config).
"""

import ast
import difflib
import os
import re
import sys
from dataclasses import dataclass

from errors import ConfigError


@dataclass(frozen=True)
class Key:
    name: str
    default: object
    help: str
    choices: tuple = ()
    scripts: tuple = ()  # the scripts that read it: train, finetune, evaluate, sample, bench, prepare
    allowed: str = ""    # numbers: an interval such as "[0, 1)"; text: a regular expression to match whole

    @property
    def type(self):
        return type(self.default)

    def admits(self, value):
        """Whether value lies in the allowed interval (numbers) or matches the pattern (text)."""
        if not self.allowed:
            return True
        if isinstance(value, str):
            return re.fullmatch(self.allowed, value) is not None
        low, high = (float(x) for x in self.allowed[1:-1].split(","))
        above = value > low if self.allowed[0] == "(" else value >= low
        below = value < high if self.allowed[-1] == ")" else value <= high
        return above and below


# who reads what: the groups of scripts the table below names
EVERY = ("prepare", "train", "finetune", "evaluate", "sample", "bench", "explain", "chat")
PREPARE = ("prepare",)
MAKES_DATA = ("prepare", "train", "finetune", "bench")  # train & co. prepare the built-in data when missing
FRESH_MODEL = ("train", "finetune", "bench")           # a fresh model's shape (a loaded one brings its own)
LOADS_MODEL = ("train", "finetune", "evaluate", "sample", "bench", "explain", "chat")
TRAINS = ("train", "finetune")
STEPS = ("train", "finetune", "bench")                 # one optimizer step
FINETUNE = ("finetune",)
EVALUATE = ("evaluate",)
SAMPLE = ("sample",)
DECODES = ("evaluate", "sample", "chat")
CHAT = ("chat",)
EXPLAIN = ("explain",)


def _k(name, default, help, choices=(), scripts=EVERY, allowed=""):
    return Key(name, default, help, tuple(choices), tuple(scripts), allowed)


KEYS = [
    # ---- data & tokenizers (prepare/*.py, and every script that reads token files) ----
    _k("data_dir", "", "folder with meta.json and the train/val/test token shards; empty = data/{dataset}_{tokenizer}"
       "; train.py and finetune.py task=lm also mix several, comma-separated (NEW,OLD: replay), by data_weights",
       scripts=("prepare", "train", "finetune", "evaluate", "bench")),
    _k("data_weights", "", "the share of training windows from each data_dir folder, comma-separated (0.8,0.2); "
       "empty = equal", scripts=TRAINS, allowed=r"(\d+\.?\d*|\.\d+)(,(\d+\.?\d*|\.\d+))*|"),
    _k("tokenizer_from", "", "a prepared data folder whose tokenizer to reuse instead of building one (new data "
       "for a model trained on that folder, or to mix with it)", scripts=PREPARE),
    _k("dataset", "shakespeare", "what train.py prepares when data_dir is empty: 'shakespeare' or 'none'",
       ["shakespeare", "none"], MAKES_DATA),
    _k("tokenizer", "char", "tokenizer used when preparing data", ["char", "gpt2", "sentencepiece"], MAKES_DATA),
    _k("sp_vocab_size", 4096, "sentencepiece vocabulary size to train", scripts=MAKES_DATA, allowed="[1, inf)"),
    _k("sp_model_type", "bpe", "sentencepiece algorithm", ["bpe", "unigram"], MAKES_DATA),
    _k("gpt2_bpe_path", "", "a local gpt2.tiktoken ranks file; wins over every other source"),
    _k("cache_dir", "data/cache", "where downloaded source archives are kept for offline reruns"),
    _k("input", "", "prepare/text.py: comma-separated .txt/.md files (one document each), .jsonl[.gz] and "
       ".parquet files (one document per row), folders of these, or hf:OWNER/DATASET[/FOLDER]", scripts=PREPARE),
    _k("text_field", "text", "prepare/text.py: the JSONL field or Parquet column that holds each document",
       scripts=PREPARE),
    _k("num_proc", 0, "prepare/text.py: worker processes that clean and tokenize; 0 = one per core",
       scripts=PREPARE, allowed="[0, inf)"),
    _k("shard_tokens", 100_000_000, "tokens per token file (shard) of a split; the last one holds the rest",
       scripts=MAKES_DATA, allowed="[1, inf)"),
    _k("tokenizer_sample_chars", 20_000_000, "char and sentencepiece tokenizers learn from at most this many "
       "characters of the training split (its first documents)", scripts=MAKES_DATA, allowed="[1, inf)"),
    _k("val_fraction", 0.05, "prepare/text.py: fraction of documents held out for validation", scripts=PREPARE,
       allowed="[0, 1)"),
    _k("test_fraction", 0.05, "prepare/text.py: fraction of documents held out for the test split", scripts=PREPARE,
       allowed="[0, 1)"),
    _k("bias_terms", "he/she,him/her,his/her,man/woman,men/women,king/queen,lord/lady,sir/madam,father/mother,"
       "son/daughter,brother/sister,husband/wife,boy/girl,duke/duchess,master/mistress",
       "counterfactual word pairs a/b whose occurrences prepare counts per split into meta.json's stats (what "
       "evaluate.py eval_task=bias swaps); empty = no counts", scripts=MAKES_DATA,
       allowed=r"([A-Za-z']+/[A-Za-z']+(,[A-Za-z']+/[A-Za-z']+)*)?"),
    _k("bias_file", "", "counterfactual pairs {a, b} (JSONL, as evaluate.py eval_task=bias reads) scored at every "
       "evaluation of train.py and finetune.py: the mean log p(a) - log p(b) and its 95% interval go into "
       "metrics.jsonl and loss.png; data/shakespeare_bias/test.jsonl is the shipped set; empty = off", scripts=TRAINS),
    _k("counterfactual", "", "bias mitigation in the training split (Lu et al. 2020's counterfactual data "
       "augmentation): augment adds a copy of each chosen document with every bias_terms pair swapped (He -> She, "
       "her -> his or him by prepare/common.py's rule); swap replaces the document with it; empty = off",
       ["", "augment", "swap"], MAKES_DATA),
    _k("counterfactual_share", 1.0, "the share of training documents that get a counterfactual, chosen by hash",
       scripts=MAKES_DATA, allowed="[0, 1]"),
    _k("canaries", 0, "privacy check (privacy.py): N random secrets per canary_repeats count written into the "
       "training split only, recorded in meta.json, for evaluate.py eval_task=exposure; 0 = none",
       scripts=MAKES_DATA, allowed="[0, 10000]"),
    _k("canary_repeats", "1", "how many copies of each canary, comma-separated: N canaries for each count",
       scripts=MAKES_DATA, allowed=r"[1-9]\d*(,[1-9]\d*)*"),
    _k("dedup", True, "drop exact-duplicate documents (after canaries are inserted: one copy of each stays)",
       scripts=MAKES_DATA),
    _k("bias_sample_bytes", 50_000_000, "prepare counts bias_terms in every document of a corpus up to this "
       "size, in a share of a larger one chosen by hash (about this many bytes' worth); 0 = every document",
       scripts=MAKES_DATA, allowed="[0, inf)"),
    _k("scrub_pii", False, "replace e-mail addresses, phone numbers and URLs with placeholders", scripts=PREPARE),
    _k("task_dir", "", "folder of a task set's train/val/test.jsonl; empty = data/shakespeare_{task}",
       scripts=("prepare", "finetune", "evaluate")),
    _k("token_dtype", "auto", "dtype of token files; auto = uint16 when the vocabulary fits",
       ["auto", "uint16", "uint32"], MAKES_DATA),
    # ---- model (model.GPTConfig) ----
    _k("preset", "", "set the architecture keys at once: gpt2 (the classic), modern, or bert (BERT's encoder) "
       "(see PRESETS); applied where it appears, so later keys still override", ["", "gpt2", "modern", "bert"],
       FRESH_MODEL),
    _k("arch", "gpt", "gpt: a causal decoder (next-token prediction); bert: the same blocks as a bidirectional "
       "encoder, pretrained as a masked language model; lstm: a recurrent baseline (n_layer LSTM layers of "
       "width n_embd); cnn: a gated convolutional network (n_layer causal convolution blocks, cnn.py)",
       ["gpt", "bert", "lstm", "cnn"], FRESH_MODEL),
    _k("mask_prob", 0.15, "bert: fraction of tokens the masked-LM loss predicts (of those, 80% are shown as the "
       "mask token, 10% as a random token, 10% unchanged)", scripts=("train", "finetune", "bench", "evaluate"),
       allowed="(0, 1)"),
    _k("n_layer", 6, "transformer blocks", scripts=FRESH_MODEL, allowed="[1, inf)"),
    _k("n_head", 6, "attention (query) heads", scripts=FRESH_MODEL, allowed="[1, inf)"),
    _k("n_kv_head", 0, "key/value heads for GQA/MQA; 0 = n_head (plain multi-head)", scripts=FRESH_MODEL,
       allowed="[0, inf)"),
    _k("n_embd", 384, "residual stream width", scripts=FRESH_MODEL, allowed="[1, inf)"),
    _k("block_size", 256, "context length in tokens (fine-tuning: at most the base model's)", scripts=FRESH_MODEL,
       allowed="[1, inf)"),
    _k("dropout", 0.0, "dropout on embeddings, attention and residual branches", scripts=FRESH_MODEL, allowed="[0, 1)"),
    _k("bias", True, "biases in linear layers and LayerNorm (GPT-2 has them)", scripts=FRESH_MODEL),
    _k("norm", "layernorm", "normalisation layer", ["layernorm", "rmsnorm"], FRESH_MODEL),
    _k("norm_position", "pre", "pre: x + f(norm(x)) and a final norm (GPT-2); post: norm(x + f(x)) and a norm "
       "after the embeddings (BERT)", ["pre", "post"], FRESH_MODEL),
    _k("norm_eps", 1e-5, "epsilon of every normalisation layer (BERT: 1e-12)", scripts=FRESH_MODEL,
       allowed="(0, 1)"),
    _k("type_vocab_size", 0, "token-type (segment) embeddings, BERT's; 0 = none", scripts=FRESH_MODEL,
       allowed="[0, inf)"),
    _k("pos", "learned", "position encoding", ["learned", "rope"], FRESH_MODEL),
    _k("rope_theta", 10000.0, "RoPE base frequency", scripts=FRESH_MODEL, allowed="(0, inf)"),
    _k("mlp", "gelu", "MLP type (gelu: GPT-2's tanh approximation; gelu_exact: BERT's)",
       ["gelu", "gelu_exact", "swiglu", "relu2"], FRESH_MODEL),
    _k("qk_norm", False, "RMS-normalise queries and keys per head before attention", scripts=FRESH_MODEL),
    _k("tie_embeddings", True, "share the token embedding with the output head", scripts=FRESH_MODEL),
    _k("logit_softcap", 0.0, "cap logits with c*tanh(x/c); 0 = off", scripts=FRESH_MODEL, allowed="[0, inf)"),
    _k("mtp_heads", 1, "multi-token prediction: heads for tokens t+1..t+n, each one block on the shared "
       "trunk; 1 = off", scripts=FRESH_MODEL, allowed="[1, inf)"),
    _k("mtp_weights", "", "comma-separated loss weight per multi-token head; empty = equal weights",
       scripts=FRESH_MODEL, allowed=r"(\d+\.?\d*|\.\d+)(,(\d+\.?\d*|\.\d+))*|"),
    _k("zero_init_proj", False, "initialise the projections into the residual stream (attn and MLP c_proj) "
       "to zero", scripts=FRESH_MODEL),
    _k("pad_vocab_to", 64, "pad the embedding rows to a multiple of this (speed); 1 = no padding",
       scripts=LOADS_MODEL, allowed="[1, inf)"),
    _k("attn_backend", "sdpa", "attention implementation", ["math", "sdpa", "flex"], LOADS_MODEL),
    _k("attn_window", 0, "sliding-window attention span in tokens; 0 = full causal", scripts=FRESH_MODEL,
       allowed="[0, inf)"),
    _k("x0_mix", False, "each block reads a learned blend a*x + b*x0 of the residual stream and the token "
       "embeddings (a=1, b=0 at init)", scripts=FRESH_MODEL),
    _k("conv_kernel", 4, "arch=cnn: taps of each causal convolution (a layer reads conv_kernel positions, "
       "dilation apart)", scripts=FRESH_MODEL, allowed="[2, inf)"),
    _k("conv_dilation", 2, "arch=cnn: each layer's dilation is this times the previous one's until the receptive "
       "field covers block_size, then 1 again; 1 = no dilation", scripts=FRESH_MODEL, allowed="[1, inf)"),
    _k("align_to_documents", False, "every training window starts at a document's end-of-text token instead "
       "of anywhere (evaluation windows stay random)", scripts=STEPS),
    _k("doc_mask", False, "tokens never attend across an end-of-text boundary in packed sequences", scripts=STEPS),
    # ---- training (train.py, shared by finetune.py) ----
    _k("out_dir", "out", "run folder: checkpoints, metrics.jsonl, loss.png, config.json; evaluate.py and "
       "sample.py read its checkpoint", scripts=("train", "finetune", "evaluate", "sample", "explain", "chat"),
       allowed=r"\S.*"),
    _k("init_from", "scratch", "scratch | resume (out_dir's ckpt_last) | auto (train.py: resume when out_dir has a "
       "checkpoint, else scratch; for restarts) | hf:PATH | gpt2[-medium|-large|-xl] | a run folder or checkpoint",
       scripts=("train", "finetune", "evaluate", "sample")),
    _k("seed", 1337, "random seed for init, data order, dropout, sampling and canaries", scripts=LOADS_MODEL + PREPARE,
       allowed="[0, 1e18]"),
    _k("device", "auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps", scripts=LOADS_MODEL,
       allowed=r"auto|cpu|mps|cuda(:\d+)?"),
    _k("dtype", "auto", "compute dtype (autocast); auto = bfloat16 on GPUs that support it, else float32",
       ["auto", "float32", "bfloat16", "float16"], LOADS_MODEL),
    _k("compile", False, "torch.compile the model (bench.py measures both)", scripts=TRAINS),
    _k("overwrite", False, "replace what is already there instead of stopping: a run in out_dir (train, finetune), "
       "a prepared dataset in data_dir or task set in task_dir (prepare), a non-empty --export_hf folder (sample), "
       "an earlier out_dir/explain/ (explain)", scripts=("prepare", "train", "finetune", "sample", "explain")),
    _k("parallel", "ddp", "how processes under torchrun share the model: ddp (a full copy each) or fsdp (FSDP2: "
       "weights, gradients and optimizer state sharded; checkpoints sharded as ckpt_*.dcp folders)",
       ["ddp", "fsdp"], TRAINS),
    _k("fsdp_reshard_after_forward", True, "fsdp: free each block's gathered weights after its forward and "
       "gather them again for backward (less memory, more communication)", scripts=TRAINS),
    _k("activation_checkpointing", False, "keep only each block's input in forward and recompute the block in "
       "backward: activation memory of one block instead of all, ~1/3 more compute", scripts=STEPS),
    _k("batch_size", 12, "sequences per micro-batch per process (evaluate.py: per scoring batch)",
       scripts=("train", "finetune", "bench", "evaluate"), allowed="[1, inf)"),
    _k("gradient_accumulation_steps", 1, "micro-batches per optimizer step in all, shared by the processes: "
       "the global batch does not change with their number (must divide by it)", scripts=STEPS, allowed="[1, inf)"),
    _k("max_iters", 5000, "optimizer steps (ignored when epochs > 0)", scripts=TRAINS, allowed="[1, inf)"),
    _k("epochs", 0.0, "passes over the training tokens; > 0 sets max_iters from it", scripts=TRAINS,
       allowed="[0, inf)"),
    _k("optimizer", "adamw", "adamw, or muon: Muon for the hidden matrices (the blocks' 2-D weights), AdamW for "
       "the rest", ["adamw", "muon"], STEPS),
    _k("muon_lr", 0.02, "Muon's peak learning rate (the schedule scales it like learning_rate)", scripts=STEPS,
       allowed="[0, inf)"),
    _k("muon_momentum", 0.95, "Muon's Nesterov momentum", scripts=STEPS, allowed="[0, 1)"),
    _k("muon_weight_decay", 0.0, "Muon's decoupled weight decay: each step multiplies its matrices by "
       "1 - muon_lr_t * muon_weight_decay", scripts=STEPS, allowed="[0, inf)"),
    _k("ns_steps", 5, "Newton-Schulz iterations per Muon step", scripts=STEPS, allowed="[1, inf)"),
    _k("learning_rate", 6e-4, "peak learning rate (AdamW)", scripts=STEPS, allowed="[0, inf)"),
    _k("min_lr", 6e-5, "learning rate at the end of the decay", scripts=TRAINS, allowed="[0, inf)"),
    _k("lr_schedule", "cosine", "warmup then cosine decay, or warmup-stable-decay", ["cosine", "wsd", "constant"],
       TRAINS),
    _k("warmup_iters", 100, "linear warmup steps", scripts=TRAINS, allowed="[0, inf)"),
    _k("decay_frac", 0.2, "wsd: fraction of max_iters spent in the final linear decay", scripts=TRAINS,
       allowed="[0, 1]"),
    _k("weight_decay", 0.1, "AdamW's decoupled weight decay of 2-D weights: each step multiplies them by "
       "1 - lr_t * weight_decay (Muon's matrices: muon_weight_decay)", scripts=STEPS, allowed="[0, inf)"),
    _k("beta1", 0.9, "AdamW beta1", scripts=STEPS, allowed="[0, 1)"),
    _k("beta2", 0.95, "AdamW beta2", scripts=STEPS, allowed="[0, 1)"),
    _k("grad_clip", 1.0, "clip the global gradient norm to this; 0 = off", scripts=STEPS, allowed="[0, inf)"),
    _k("eval_interval", 250, "steps between evaluations and checkpoints", scripts=TRAINS, allowed="[1, inf)"),
    _k("eval_iters", 20, "batches averaged for each train/val loss estimate", scripts=TRAINS, allowed="[1, inf)"),
    _k("log_interval", 10, "steps between loss log lines (and, under torchrun, checks for a stop signal)",
       scripts=TRAINS, allowed="[1, inf)"),
    _k("overfit_patience", 3, "warn when val loss rose this many evals in a row while train loss fell",
       scripts=TRAINS, allowed="[0, inf)"),
    _k("wandb_log", False, "log to Weights & Biases (offline unless WANDB_MODE is set)", scripts=TRAINS),
    _k("wandb_project", "gpt", "wandb project name", scripts=TRAINS),
    _k("wandb_run_name", "run", "wandb run name", scripts=TRAINS),
    _k("plot", True, "refresh out_dir/loss.png at each evaluation", scripts=TRAINS),
    _k("best_metric", "val_loss", "metric that picks ckpt_best.pt and drives early stopping (val_loss and "
       "val_headN: lower is better; a task metric such as val_macro_f1: higher is better)", scripts=TRAINS),
    _k("patience", 0, "early stopping: evaluations without improvement before stopping; 0 = off", scripts=TRAINS,
       allowed="[0, inf)"),
    _k("min_delta", 0.0, "early stopping: how far best_metric must move past its value at the last reset to "
       "reset the count",
       scripts=TRAINS, allowed="[0, inf)"),
    # ---- fine-tuning (finetune.py) ----
    _k("task", "lm", "lm: continued pretraining on data_dir; sft: prompt -> completion JSONL with loss on the "
       "completion only; classify: a classification head on text -> label JSONL; dpo: preference pairs "
       "{prompt, chosen, rejected}; rl: policy gradient on sampled completions of {prompt} rows scored by reward; "
       "chat: {messages: [{role, content}]} conversations with loss on the assistant turns (conversation.py)",
       ["lm", "sft", "classify", "dpo", "rl", "chat"], FINETUNE),
    _k("dpo_beta", 0.1, "dpo: how far from the reference model the preferences may pull (larger: a stronger "
       "pull toward the reference)", scripts=FINETUNE, allowed="(0, inf)"),
    _k("dpo_sft_weight", 0.0, "dpo: weight of the chosen completions' own next-token loss added to the DPO loss "
       "(RPO, Pang et al. 2024), which keeps their likelihood from falling with the rejected ones'; 0 = plain DPO",
       scripts=FINETUNE, allowed="[0, inf)"),
    _k("reward", "", "rl: the reward function as module:function, called function(prompt, completion) -> float, "
       "the module found on the Python path (e.g. prepare.addition:reward); evaluate.py generate: the mean reward "
       "of its outputs", scripts=FINETUNE + EVALUATE,
       allowed=r"([A-Za-z_][\w.]*:[A-Za-z_]\w*)?"),
    _k("rl_group_size", 8, "rl: completions sampled per prompt; each is scored against its group's mean reward",
       scripts=FINETUNE, allowed="[2, inf)"),
    _k("rl_kl_coef", 0.0, "rl: weight of a KL penalty that keeps the policy near the reference (the starting "
       "weights); 0 = none", scripts=FINETUNE, allowed="[0, inf)"),
    _k("lr_layer_decay", 1.0, "layer-wise LR: block i gets lr * decay^(n_layer - i), embeddings the lowest; "
       "1 = off", scripts=FINETUNE, allowed="(0, inf)"),
    _k("unfreeze_every", 0, "gradual unfreezing: head + last block first, one more block from the top every N "
       "steps, embeddings last; 0 = everything trains from the start", scripts=FINETUNE, allowed="[0, inf)"),
    _k("freeze", "", "comma-separated regular expressions of parameter names to keep frozen (e.g. 'wte,wpe')",
       scripts=FINETUNE),
    _k("lora_rank", 0, "LoRA adapters of this rank on lora_targets (base weights frozen); 0 = off",
       scripts=FINETUNE, allowed="[0, inf)"),
    _k("lora_alpha", 16.0, "LoRA scale numerator: the update is (alpha / rank) * B @ A", scripts=FINETUNE,
       allowed="(0, inf)"),
    _k("lora_dropout", 0.0, "dropout on the LoRA branch's input", scripts=FINETUNE, allowed="[0, 1)"),
    _k("lora_targets", "c_attn,c_proj,c_fc", "comma-separated names of the linear layers that get adapters",
       scripts=FINETUNE),
    _k("classify_pool", "last", "classify: the hidden state the head reads: the last real token's, the mean, "
       "or first: BERT's pooler (dense + tanh) on the first token, which sees every other in an encoder",
       ["last", "mean", "first"], FINETUNE),
    _k("skip_long", False, "sft (and evaluate.py generate): skip (and count) examples whose prompt does not fit "
       "block_size instead of stopping with an error", scripts=("finetune", "evaluate")),
    _k("keep_mtp_heads", True, "a multi-token base model keeps its extra heads (they train on the task too); "
       "False drops them and fine-tunes the plain next-token model (classify, dpo and rl always drop them)",
       scripts=FINETUNE),
    _k("sft_packing", False, "sft: pack several examples per row (needs doc_mask to keep them apart) "
       "instead of one padded example per row", scripts=FINETUNE),
    # ---- evaluation (evaluate.py) ----
    _k("eval_task", "lm", "lm: perplexity on a token split; generate: BLEU/chrF; classify: F1; choice: multiple "
       "choice; bias: log-probability gaps of counterfactual pairs {a, b}; exposure: how well the model knows "
       "the data's canaries (privacy.py); harness: lm-evaluation-harness tasks",
       ["lm", "generate", "classify", "choice", "bias", "exposure", "harness"], EVALUATE),
    _k("exposure_samples", 10_000, "exposure: random candidate secrets each canary is ranked against (10^6 or more: "
       "all of them, exactly)", scripts=EVALUATE, allowed="[1, inf)"),
    _k("harness_tasks", "", "harness: comma-separated lm-evaluation-harness task names", scripts=EVALUATE),
    _k("harness_include", "", "harness: a folder of your own YAML task definitions (offline, local data)",
       scripts=EVALUATE),
    _k("eval_split", "test", "which split to evaluate", ["train", "val", "test"], EVALUATE),
    _k("eval_stride", 0, "lm: sliding-window stride in tokens; each token keeps block_size-stride context; "
       "0 = block_size//2", scripts=EVALUATE, allowed="[0, inf)"),
    _k("task_file", "", "a JSONL task file; empty = task_dir/{eval_split}.jsonl", scripts=EVALUATE),
    _k("max_examples", 0, "use only the first N examples of a task file; 0 = all", scripts=("finetune", "evaluate"),
       allowed="[0, inf)"),
    _k("prompt_template", "{prompt}\n### Response:\n", "how a prompt is shown to the model (sft, generate)",
       scripts=("finetune", "evaluate")),
    _k("classify_template", "{text}\nLabel:",
       "zero-shot classify: context before each label's verbalisation ' {label}'", scripts=EVALUATE),
    # ---- sampling (sample.py) ----
    _k("checkpoint", "best", "which checkpoint in out_dir to load", ["best", "last"], DECODES + EXPLAIN),
    _k("start", "\n", "prompt text, or FILE:path to read it from a file", scripts=SAMPLE),
    _k("num_samples", 3, "samples to draw", scripts=SAMPLE, allowed="[1, inf)"),
    _k("max_new_tokens", 500, "tokens to generate per sample (evaluate.py: at most, per answer; finetune.py "
       "task=rl: per completion)", scripts=DECODES + FINETUNE, allowed="[1, inf)"),
    _k("temperature", 0.8, "sampling temperature; 0 = greedy (task=rl samples its completions at it, and needs "
       "it > 0)", scripts=DECODES + FINETUNE, allowed="[0, inf)"),
    _k("top_k", 200, "keep the k most likely tokens; 0 = off", scripts=DECODES, allowed="[0, inf)"),
    _k("top_p", 1.0, "nucleus sampling threshold; 1.0 = off", scripts=DECODES, allowed="(0, 1]"),
    _k("stop", "", "stop a sample when this string appears (end-of-text always stops)", scripts=SAMPLE),
    _k("speculative", False, "greedy self-speculative decoding with the multi-token heads (needs mtp_heads > 1, "
       "temperature=0); reports acceptance and speed against plain decoding", scripts=SAMPLE),
    _k("kv_cache", True, "decode with the KV cache (False recomputes the whole sequence each token)",
       scripts=SAMPLE),
    _k("system", "", "chat.py: the system message that opens the conversation; empty = none", scripts=CHAT),
    _k("prompt", "", "chat.py: one message to answer, then exit (a piped stdin is read the same way); empty = "
       "talk in the terminal", scripts=CHAT),
    _k("serve", False, "chat.py: serve the chat as a web page instead of talking in the terminal", scripts=CHAT),
    _k("host", "127.0.0.1", "chat.py serve: the address to listen on (0.0.0.0: every network interface)",
       scripts=CHAT),
    _k("port", 8000, "chat.py serve: the port; 0 = any free one (the line printed at start names it)",
       scripts=CHAT, allowed="[0, 65535]"),
    _k("export_hf", "", "write the model as a Hugging Face folder here instead of sampling", scripts=SAMPLE),
    _k("export_ckpt", "", "write out_dir's checkpoint (sharded or not) as one .pt file here instead of sampling",
       scripts=SAMPLE),
    # ---- looking inside a model (explain.py) ----
    _k("text", "", "the text explain.py explains (or text_file)", scripts=EXPLAIN),
    _k("text_file", "", "a UTF-8 file holding the text explain.py explains", scripts=EXPLAIN),
    _k("views", "", "comma-separated views to draw: surprisal, attention, logit_lens (language models), "
       "occlusion (classifiers); empty = every view the model has", scripts=EXPLAIN,
       allowed=r"((surprisal|attention|logit_lens|occlusion)(,(surprisal|attention|logit_lens|occlusion))*)?"),
]
KEY_BY_NAME = {k.name: k for k in KEYS}

# Architecture bundles for the preset key. gpt2 is GPT-2 as published (and this file's defaults).
# modern is what recent speedrun-style models use: rotary positions, RMSNorm without biases,
# normalised queries and keys, a ReLU² MLP, an untied output head, residual projections that
# start at zero (every block begins as the identity) and a logit softcap. bert is BERT's
# encoder (Devlin et al. 2019): post-norm LayerNorm at eps 1e-12, exact GELU, two token types.
_CLASSIC = dict(arch="gpt", norm="layernorm", norm_position="pre", norm_eps=1e-5, type_vocab_size=0, pos="learned",
                mlp="gelu", qk_norm=False, bias=True, tie_embeddings=True, zero_init_proj=False, logit_softcap=0.0)
PRESETS = {
    "gpt2": _CLASSIC,
    "modern": dict(_CLASSIC, norm="rmsnorm", pos="rope", mlp="relu2", qk_norm=True, bias=False, tie_embeddings=False,
                   zero_init_proj=True, logit_softcap=15.0),
    "bert": dict(_CLASSIC, arch="bert", norm_position="post", norm_eps=1e-12, type_vocab_size=2, mlp="gelu_exact"),
}
assert len(KEY_BY_NAME) == len(KEYS), "duplicate config key"


# What a resumed run may set differently from the run it continues: how long it goes on (the end of
# the learning-rate schedule with it), how it evaluates and reports, and where and how it runs.
MAY_CHANGE_ON_RESUME = ("max_iters", "epochs", "min_lr", "eval_interval", "eval_iters", "log_interval", "patience",
                        "min_delta", "overfit_patience", "plot", "wandb_log", "wandb_project", "wandb_run_name",
                        "device", "dtype", "compile", "parallel", "fsdp_reshard_after_forward",
                        "activation_checkpointing", "init_from", "out_dir", "overwrite", "cache_dir", "gpt2_bpe_path")


# What the resuming command itself decides, never taken from the run: that it resumes, and where.
RESUME_SAYS = ("init_from", "out_dir", "overwrite")


class Config:
    """Attribute access to the resolved keys: cfg.batch_size. `chosen` holds the keys set by a
    config file, an override or a script (not left at their defaults): what a resume compares."""

    def __init__(self, values=None):
        self.__dict__.update({k.name: k.default for k in KEYS})
        self.chosen = set()
        for name, value in (values or {}).items():
            self.set(name, value)

    def set(self, name, value, origin="config"):
        self.__dict__[name] = check_value(name, value, origin)
        self.chosen.add(name)
        if name == "preset" and value:
            self.__dict__.update(PRESETS[value])
            self.chosen.update(PRESETS[value])

    def to_dict(self):
        return {k: v for k, v in self.__dict__.items() if k in KEY_BY_NAME}

    def __repr__(self):
        return "\n".join(f"  {k} = {v!r}" for k, v in self.to_dict().items())

    def continue_run(self, saved, run, fixed=None):
        """Resuming `run`, whose config was `saved`: every key this command does not name takes
        the run's value, those that may change on resume (MAY_CHANGE_ON_RESUME) included; a key
        it names with another value stops with one line naming each, unless it may change. So a
        resume trains the run that was saved, and goes on only where the command says. fixed:
        values the run holds elsewhere (the model's shape): checked against the command, not taken."""
        conflicts, fixed = [], fixed or {}
        for name, value in {**saved, **fixed}.items():
            key = KEY_BY_NAME.get(name)
            if key is None or name in RESUME_SAYS or not {"train", "finetune"} & set(key.scripts):
                continue
            if name not in self.chosen:
                if name not in fixed:
                    self.__dict__[name] = value
            elif name not in MAY_CHANGE_ON_RESUME and self.__dict__[name] != value:
                conflicts.append(f"{name}={value!r} (not {self.__dict__[name]!r})")
        if conflicts:
            raise ConfigError(f"{run} was trained with {', '.join(conflicts)}; a resumed run keeps its settings "
                              f"(only {', '.join(MAY_CHANGE_ON_RESUME[:6])}, ... may change): drop those keys, "
                              f"or start a new out_dir")


def unknown_key_error(name, origin):
    close = difflib.get_close_matches(name, KEY_BY_NAME, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list the keys"
    return ConfigError(f"{origin}: unknown config key '{name}'{hint}")


def check_value(name, value, origin="config"):
    """Return value if it fits key `name` (ints are accepted for floats), else raise ConfigError."""
    if name not in KEY_BY_NAME:
        raise unknown_key_error(name, origin)
    key = KEY_BY_NAME[name]
    if key.type is float and type(value) is int:
        value = float(value)
    if type(value) is not key.type:
        raise ConfigError(f"{origin}: key '{name}' expects {key.type.__name__}, "
                          f"got {type(value).__name__} {value!r}")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{origin}: key '{name}' must be one of {list(key.choices)}, got {value!r}")
    if not key.admits(value):
        if value == "":
            raise ConfigError(f"{origin}: key '{name}' must not be empty")
        allowed = f"in {key.allowed}" if key.type is not str else f"of the form: {key.help}"
        raise ConfigError(f"{origin}: key '{name}' must be {allowed}, got {value!r}")
    return value


def parse_override(text, name):
    """'--key=value' text -> a Python value of the key's type. Strings need no quotes."""
    key = KEY_BY_NAME.get(name)
    if key is None:
        raise unknown_key_error(name, f"--{name}")
    if key.type is str:
        return text
    if key.type is bool:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{name}: key '{name}' expects bool (True/False), got {text!r}")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--{name}: key '{name}' expects {key.type.__name__}, got {text!r}") from None


def read_config_file(path):
    """Execute a plain-Python config file; return its public top-level names."""
    try:
        source = open(path, encoding="utf-8").read()
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 (byte {e.start}); save it as UTF-8") from None
    scope = {}
    try:
        exec(compile(source, path, "exec"), scope)
    except SystemExit:  # (it would end the program with exit code 0 and no word)
        raise ConfigError(f"config file {path} calls sys.exit(); a config file only sets keys") from None
    except Exception as e:
        raise ConfigError(f"config file {path}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items()
            if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}


def script_name(path):
    """'train' for train.py, 'prepare' for any prepare/*.py."""
    if os.path.basename(os.path.dirname(os.path.abspath(path))) == "prepare":
        return "prepare"
    return os.path.splitext(os.path.basename(path))[0]


def help_text(script_path):
    """The keys this script reads, each with its default and meaning; then the other keys' names
    (valid everywhere, since a config file may be shared between scripts, but unused here)."""
    script = script_name(script_path)
    lines = [f"usage: python {script_path} [config.py ...] [--key=value ...]", "",
             f"keys {script}.py reads (default: meaning):"]
    for k in KEYS:
        if script in k.scripts:
            choices = f" {{{'|'.join(map(str, k.choices))}}}" if k.choices else ""
            lines.append(f"  --{k.name}={k.default!r}{choices}\n      {k.help}")
    others = [k.name for k in KEYS if script not in k.scripts]
    if others:
        lines += ["", f"other scripts' keys (accepted, unused by {script}.py): {', '.join(others)}"]
    return "\n".join(lines)


def load_config(argv=None, overrides=None):
    """Build a Config from argv (config files and --key=value, applied in order).

    `overrides` (a dict) is applied last; tests and other scripts use it instead of argv.
    """
    argv = sys.argv[1:] if argv is None else argv
    cfg = Config()
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(sys.argv[0]))
            sys.exit(0)
        if arg.startswith("--"):
            name, eq, text = arg[2:].partition("=")
            if not eq and isinstance(getattr(KEY_BY_NAME.get(name), "default", None), bool):
                eq, text = "=", "True"  # a switch: --serve means --serve=True
            if not eq:
                raise ConfigError(f"{arg}: write overrides as --key=value")
            cfg.set(name, parse_override(text, name), origin=arg)
        else:
            for name, value in read_config_file(arg).items():
                cfg.set(name, value, origin=f"config file {arg}")
    for name, value in (overrides or {}).items():
        cfg.set(name, value)
    if not cfg.data_dir:
        cfg.data_dir = os.path.join("data", f"{cfg.dataset}_{cfg.tokenizer}")
    return cfg


def cli_config(argv=None):
    """load_config for a script's __main__: a ConfigError ends the program with one line."""
    try:
        return load_config(argv)
    except ConfigError as e:  # (under torchrun rank 0 says it for every process: the same command)
        from exits import first_process
        if first_process():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

