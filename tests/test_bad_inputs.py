"""Bad input, one case per row: every script must stop with exit code 1 and one `error:` line that
names the thing at fault, never a traceback, and must leave every file that was there untouched.

Each case is (script and arguments, words the error line must contain). `{data}` is a prepared
char dataset, `{run}` a finished run folder (both copied fresh for each case), `{tmp}` an empty
folder. Before and after each case every file under those folders is hashed."""

import hashlib
import json
import os
import select
import shutil
import subprocess
import sys

import pytest

from conftest import CACHE, ROOT
from test_train import TINY

SMALL = [f"--{k}={v}" for k, v in TINY.items()]

FT_SFT = ["finetune.py", "--init_from={run}", "--task=sft", "--task_dir={tmp}/t", "--block_size=32",
          "--out_dir={tmp}/ft"]
FT_CHAT = ["finetune.py", "--init_from={run}", "--task=chat", "--task_dir={tmp}/t", "--block_size=32",
           "--out_dir={tmp}/ft"]
FT_CLASSIFY = ["finetune.py", "--init_from={run}", "--task=classify", "--task_dir={tmp}/t", "--block_size=32",
               "--out_dir={tmp}/ft"]

CASES = [
    # ---- config: names, types and ranges, checked before any work
    (["train.py", "--batch_sise=4"], ["batch_sise", "batch_size"]),
    (["train.py", "--batch_size=four"], ["batch_size", "int"]),
    (["train.py", "--batch_size=0"], ["batch_size", "[1, inf)"]),
    (["train.py", "--block_size=-8"], ["block_size", "[1, inf)"]),
    (["train.py", "--eval_iters=0"], ["eval_iters", "[1, inf)"]),
    (["train.py", "--eval_interval=0"], ["eval_interval", "[1, inf)"]),
    (["train.py", "--log_interval=0"], ["log_interval", "[1, inf)"]),
    (["train.py", "--gradient_accumulation_steps=0"], ["gradient_accumulation_steps", "[1, inf)"]),
    (["train.py", "--learning_rate=-1e-3"], ["learning_rate", "[0, inf)"]),
    (["train.py", "--beta1=1.0"], ["beta1", "[0, 1)"]),
    (["train.py", "--beta2=-0.1"], ["beta2", "[0, 1)"]),
    (["train.py", "--dropout=1.5"], ["dropout", "[0, 1)"]),
    (["train.py", "--attn_window=-1"], ["attn_window", "[0, inf)"]),
    (["train.py", "--pad_vocab_to=0"], ["pad_vocab_to", "[1, inf)"]),
    (["train.py", "--out_dir="], ["out_dir", "empty"]),
    (["train.py", "--mtp_weights=1,x"], ["mtp_weights"]),
    (["train.py", "--device=gpu"], ["device", "gpu"]),
    (["train.py", "--weight_decay=-0.1"], ["weight_decay", "[0, inf)"]),
    (["train.py", "--warmup_iters=-5"], ["warmup_iters", "[0, inf)"]),
    (["train.py", "--max_iters=0"], ["max_iters", "[1, inf)"]),
    (["train.py", "--optimizer=sgd"], ["optimizer", "adamw"]),
    (["train.py", "--n_layer=0"], ["n_layer", "[1, inf)"]),
    (["train.py", "--seed=-1"], ["seed", "[0, 1e18]"]),
    (["train.py", "--seed=100000000000000000000"], ["seed", "[0, 1e18]"]),
    (["train.py", "--grad_clip=-1"], ["grad_clip", "[0, inf)"]),
    (["train.py", "--decay_frac=1.5"], ["decay_frac", "[0, 1]"]),
    (["train.py", "--muon_momentum=1"], ["muon_momentum", "[0, 1)"]),
    (["train.py", "{tmp}/missing.py"], ["missing.py"]),
    (["train.py", "--lr=1e-3"], ["'lr'"]),
    (["sample.py", "--temperature=-1"], ["temperature", "[0, inf)"]),
    (["sample.py", "--top_p=0"], ["top_p", "(0, 1]"]),
    (["sample.py", "--top_p=1.5"], ["top_p", "(0, 1]"]),
    (["sample.py", "--top_k=-3"], ["top_k", "[0, inf)"]),
    (["sample.py", "--num_samples=0"], ["num_samples", "[1, inf)"]),
    (["sample.py", "--max_new_tokens=0"], ["max_new_tokens", "[1, inf)"]),
    (["evaluate.py", "--eval_stride=-1"], ["eval_stride", "[0, inf)"]),
    (["evaluate.py", "--eval_split=dev"], ["eval_split", "dev"]),
    (["finetune.py", "--lora_rank=-1"], ["lora_rank", "[0, inf)"]),
    (["finetune.py", "--lora_dropout=1"], ["lora_dropout", "[0, 1)"]),
    (["finetune.py", "--lr_layer_decay=0"], ["lr_layer_decay", "(0, inf)"]),
    (["finetune.py", "--task=ppo"], ["task", "ppo"]),
    (["finetune.py", "--dpo_beta=0"], ["dpo_beta", "(0, inf)"]),
    (["finetune.py", "--rl_group_size=1"], ["rl_group_size", "[2, inf)"]),
    (["finetune.py", "--reward=my_rewards"], ["reward", "module:function"]),
    (["prepare/text.py", "--bias_terms=he,she"], ["bias_terms", "a/b"]),
    (["prepare/text.py", "--val_fraction=1.0"], ["val_fraction", "[0, 1)"]),
    (["prepare/text.py", "--num_proc=-2"], ["num_proc", "[0, inf)"]),
    (["prepare/text.py", "--shard_tokens=0"], ["shard_tokens", "[1, inf)"]),
    (["bench.py", "--batch_size=0"], ["batch_size", "[1, inf)"]),
    # ---- nothing the user made is replaced unasked
    (["train.py", *SMALL], ["already holds a run", "init_from=resume", "overwrite=True"]),
    (["finetune.py", "--init_from={run}", *SMALL], ["already holds a run"]),
    (["sample.py", "--export_hf={run}"], ["export_hf", "not empty", "overwrite=True"]),
    (["sample.py", "--export_ckpt={run}/config.json"], ["export_ckpt", "already exists"]),
    (["prepare/shakespeare.py", "--tokenizer=char"], ["already holds a prepared dataset", "overwrite=True"]),
    (["prepare/text.py", "--input={tmp}/a.txt"], ["already holds a prepared dataset"], "text_file"),
    (["train.py", *SMALL, "--out_dir={tmp}/new"], ["no meta.json", "left as it is"], "no_meta"),
    # ---- broken files and missing things: one line each
    (["sample.py", "--out_dir={tmp}"], ["no checkpoint"]),
    (["sample.py", "--start=FILE:{tmp}/missing.txt"], ["missing.txt"]),
    (["sample.py", "--start=FILE:{tmp}/latin1.txt"], ["latin1.txt", "UTF-8"], "latin1_prompt"),
    (["sample.py"], ["ckpt_best.pt", "not a checkpoint of this project"], "garbage_checkpoint"),
    (["train.py", *SMALL, "--out_dir={tmp}/new", "--init_from={tmp}/nothing"], ["init_from", "no such run folder"]),
    (["sample.py", "--init_from=hf:{tmp}"], ["init_from=hf:"]),
    (["evaluate.py", "--eval_task=generate", "--task_file={tmp}/missing.jsonl"], ["missing.jsonl"]),
    (["train.py", *SMALL, "--out_dir={tmp}/new"], ["train_00000.bin", "truncated"], "truncated_tokens"),
    (["train.py", *SMALL, "--out_dir={tmp}/new"], ["meta.json"], "meta_not_json"),
    (["train.py", *SMALL, "--out_dir={tmp}/a.txt"], ["out_dir", "not a folder"], "text_file"),
    # ---- a resume trains the run that was saved
    (["train.py", *SMALL, "--init_from=resume", "--n_layer=3"], ["n_layer=2 (not 3)", "start a new out_dir"]),
    (["train.py", *SMALL, "--init_from=resume", "--batch_size=8", "--learning_rate=1e-2"],
     ["batch_size=4 (not 8)", "learning_rate=0.003 (not 0.01)"]),
    (["train.py", *SMALL, "--init_from=resume", "--optimizer=muon"], ["optimizer='adamw' (not 'muon')"]),
    (["finetune.py", "--init_from=resume", "--task=sft"], ["task='lm' (not 'sft')"]),
    # ---- more missing or broken inputs
    (["prepare/text.py", "--data_dir={tmp}/new"], ["no input given"]),
    (["prepare/text.py", "--input={tmp}/nothing", "--data_dir={tmp}/new"], ["nothing", "no such file or folder"]),
    (["prepare/text.py", "--input={tmp}/bad.jsonl", "--data_dir={tmp}/new"], ["bad.jsonl:2", "not JSON"], "bad_jsonl"),
    (["finetune.py", *SMALL, "--init_from={run}", "--out_dir={tmp}/ft", "--task=sft", "--task_dir={tmp}"],
     ["train.jsonl"], "bad_jsonl"),
    (["evaluate.py", "--out_dir={tmp}"], ["no checkpoint"]),
    # ---- checked when the data is opened, before the first step
    (["train.py", *SMALL, "--out_dir={tmp}/new"], ["val_00000.bin", "missing"], "missing_val"),
    (["train.py", *SMALL, "--out_dir={tmp}/new"], ["train_00000.bin", "outside the", "vocabulary"], "out_of_vocab"),
    (["evaluate.py", "--eval_split=val"], ["val_00000.bin", "outside the", "vocabulary"], "out_of_vocab"),
    # ---- Hugging Face folders that are not whole GPT-2 checkpoints
    (["sample.py", "--init_from=hf:{tmp}/hf"], ["2 missing", "h.0.attn.c_attn.weight"], "hf_missing_weights"),
    (["sample.py", "--init_from=hf:{tmp}/hf"], ["1 unexpected", "h.7.mlp.c_fc.weight"], "hf_unexpected_weight"),
    (["sample.py", "--init_from=hf:{tmp}/hf"], ["wpe.weight", "shape"], "hf_wrong_shape"),
    (["sample.py", "--init_from=hf:{tmp}/hf"], ["model.safetensors", "unreadable"], "hf_corrupt_safetensors"),
    (["sample.py", "--init_from=hf:{tmp}/hf"], ["config.json", "lacks 'n_layer'"], "hf_config_lacks_key"),
    # ---- task sets, and where a run cannot be written
    (["prepare/genre.py", "--task_dir={tmp}"], ["already holds a prepared dataset", "train.jsonl", "task_dir"],
     "bad_jsonl"),
    (["prepare/folio.py", "--task_dir={tmp}"], ["already holds a prepared dataset", "overwrite=True"], "bad_jsonl"),
    (["train.py", *SMALL, "--out_dir={tmp}/a.txt/run"], ["a.txt/run", "Not a directory"], "text_file"),
    # ---- bench.py opens the data as training does
    (["bench.py", *SMALL, "--dataset=none", "--data_dir={tmp}/new"], ["not prepared"]),
    (["bench.py", *SMALL], ["train_00000.bin", "truncated"], "truncated_tokens"),
    (["bench.py", *SMALL], ["val_00000.bin", "missing"], "missing_val"),
    # ---- the other architectures
    (["train.py", "--arch=transformer"], ["arch", "transformer"]),
    (["train.py", "--mask_prob=1.0"], ["mask_prob", "(0, 1)"]),
    (["train.py", *SMALL, "--out_dir={tmp}/new", "--arch=lstm", "--pos=rope"], ["arch='lstm'", "pos='rope'"]),
    (["train.py", *SMALL, "--out_dir={tmp}/new", "--arch=lstm", "--activation_checkpointing=True"],
     ["activation_checkpointing", "arch='lstm'"]),
    (["train.py", *SMALL, "--out_dir={tmp}/new", "--mtp_heads=2", "--norm_position=post"],
     ["mtp_heads", "norm_position=post"]),
    # ---- settings a fine-tuning task cannot use (issue 32's close reading)
    (["finetune.py", *SMALL, "--init_from={run}", "--out_dir={tmp}/ft", "--task=classify", "--classify_pool=first"],
     ["classify_pool=first", "decoder"]),
    (["finetune.py", *SMALL, "--init_from={run}", "--out_dir={tmp}/ft", "--task=dpo", "--dropout=0.1"],
     ["task=dpo", "dropout=0"]),
    # ---- values that passed the checks and then crashed (issue 37, item 6)
    (["train.py", "{tmp}/latin1_config.py"], ["latin1_config.py", "not UTF-8"], "latin1_config"),
    (["train.py", "{tmp}/exiting_config.py"], ["exiting_config.py", "calls sys.exit()"], "exiting_config"),
    (["train.py", "--device=mps", "--out_dir={tmp}/new"], ["device=mps", "no Apple GPU"]),
    (["train.py", *SMALL, "--pad_vocab_to=100000000000", "--out_dir={tmp}/new"],
     ["out of memory", "GiB", "pad_vocab_to"]),
    (["train.py", "--attn_backend=flex", "--dropout=0", "--out_dir={tmp}/new"], ["attn_backend=flex", "CPU"]),
    (["finetune.py", "--init_from={run}", "--freeze=(", "--block_size=32", "--out_dir={tmp}/ft"],
     ["freeze", "not a regular expression"]),
    (["sample.py", "--init_from=hf:{tmp}/hf", "--gpt2_bpe_path={tmp}/missing.tiktoken"],
     ["gpt2_bpe_path", "no such file"], "hf_gpt2"),
    (["sample.py", "--init_from=hf:{tmp}/hf", "--gpt2_bpe_path={tmp}/short.tiktoken"],
     ["short.tiktoken", "BPE ranks"], "hf_gpt2"),
    (["evaluate.py", "--eval_split=val"], ["eval.json", "not this project's results file"], "foreign_eval_json"),
    (["sample.py", "--max_new_tokens=2"], ["ckpt_best.pt", "not a checkpoint of this project"], "foreign_dict_pt"),
    (["train.py", *SMALL, "--out_dir={tmp}/new"], ["char tokenizer", "84 tokens", "86", "cut or edited"],
     "cut_char_table"),
    (["sample.py", "--max_new_tokens=2"], ["weights do not fit its own model_args"], "mismatched_pt"),
    # ---- task files (issue 37, item 5): each set up from TASK_ROWS below
    (FT_SFT, ["train.jsonl", "not UTF-8"], "latin1_rows"),
    (FT_SFT, ["train.jsonl:2", "a JSON object", "str"], "bare_string_row"),
    (FT_SFT, ["train.jsonl:1", "field 'completion' must be a str", "null"], "null_completion"),
    (FT_SFT + ["--prompt_template=Q: {{question}}"], ["prompt_template", "{prompt}"], "sft_rows"),  # ({{: format)
    (FT_SFT + ["--prompt_template={{prompt}} {{x}}"], ["prompt_template", "no other field", "x"], "sft_rows"),
    (FT_CLASSIFY, ["train.jsonl:1", "field 'label' must be a str or int"], "list_label"),
    (FT_CHAT, ["train.jsonl:1", "missing field 'messages'"], "no_messages"),
    (FT_CHAT, ["train.jsonl: record 1", "role 'narrator'", "system, user, assistant"], "unknown_role"),
    (FT_CHAT, ["train.jsonl: record 1", "ends on a user turn", "assistant turn"], "ends_on_user"),
    (FT_CHAT, ["train.jsonl:1", "field 'messages' must be a list"], "messages_not_list"),
    (["chat.py", "--prompt=hi"], ["was not fine-tuned for conversation", "--task=chat"]),
    (["prepare/text.py", "--input={tmp}/a.txt", "--data_dir={tmp}/d", "--tokenizer_from={tmp}/nope"],
     ["tokenizer_from=", "nope", "no prepared dataset there"], "text_file"),
    (FT_CLASSIFY, ["train.jsonl", "labels mix int and str"], "mixed_labels"),
    (FT_CLASSIFY, ["train.jsonl:1", "field 'text' must be a str", "42"], "number_text"),
    (FT_CLASSIFY, ["train.jsonl", "at least two labels"], "one_label"),
    (["evaluate.py", "--eval_task=generate", "--task_file={tmp}/t/val.jsonl"], ["'references' must list"],
     "empty_references"),
    (["evaluate.py", "--eval_task=choice", "--task_file={tmp}/t/val.jsonl"], ["field 'answer' must be a int", "true"],
     "bool_answer"),
    (["evaluate.py", "--eval_task=choice", "--task_file={tmp}/t/val.jsonl"], ["field 'choices' must be a list"],
     "string_choices"),
    (["evaluate.py", "--eval_task=choice", "--task_file={tmp}/t/val.jsonl"], ["at least two texts"], "one_choice"),
    (["evaluate.py", "--eval_task=harness", "--harness_tasks=no_such_task"],
     ["no lm-evaluation-harness task", "no_such"]),
    (["evaluate.py", "--eval_task=harness", "--harness_tasks=x", "--harness_include={tmp}/nope"],
     ["harness_include", "no such folder"]),
    (["sample.py", "--init_from=hf:{tmp}/hf"], ["vocab.txt"], "bert_folder_without_vocab"),
    (["sample.py", "--init_from=hf:{tmp}/hf"], ["config.json", "lacks 'layer_norm_eps'"], "bert_config_lacks_key"),
    (["train.py", "--counterfactual=augment"], ["counterfactual=augment", "prepared with none", "another"]),
    (["prepare/text.py", "--input={tmp}", "--data_dir={tmp}/d", "--counterfactual=augment",
      "--bias_terms=he/she,he/it"], ["bias_terms", "'he' is in 2 pairs"]),
    # ---- canaries (privacy.py)
    (["prepare/text.py", "--input={tmp}/a.txt", "--data_dir={tmp}/d", "--canaries=1"],
     ["canaries=1", "of the training split", "fewer canaries"], "text_file"),
    (["prepare/shakespeare.py", "--data_dir={tmp}/d", "--canaries=1000", "--canary_repeats=100"],
     ["canaries=1000 x canary_repeats=100", "at most 10%"]),
    (["prepare/text.py", "--input={tmp}/a.txt", "--data_dir={tmp}/d", "--canaries=1", "--canary_repeats=2,2"],
     ["canary_repeats=2,2", "each repeat count once"], "text_file"),
    (["train.py", "--canaries=2"], ["canaries=2", "prepared with canaries=0", "another"]),
    (["train.py", "--dedup=False"], ["dedup=False", "dedup=True", "another"]),
    (["evaluate.py", "--eval_task=exposure"], ["has no canaries", "--canaries=N"]),
    # ---- replay: data_dir=NEW,OLD with data_weights
    (["train.py", "--data_dir={data},{tmp}/other"], ["other was prepared with another tokenizer",
                                                     "--tokenizer_from="], "other_tokenizer"),
    (["train.py", "--data_dir={data},{data}", "--data_weights=0.5"], ["data_weights=0.5 gives 1 weights for 2"]),
    (["train.py", "--data_dir={data},{data}", "--data_weights=0,0"], ["data_weights=0,0", "positive"]),
    (["train.py", "--data_weights=0.5,x"], ["data_weights", "0.5,x"]),
    # ---- explain.py (writes nothing, out_dir/explain/ included, when its input is bad)
    (["explain.py", "--out_dir={tmp}/no_run", "--text=x"], ["no_run", "no such run folder"]),
    (["explain.py", "--text=aЖ€"], ["characters this model's tokenizer never saw", "Ж€"]),
    (["explain.py", "--text= "], ["the text to explain is empty"]),
    (["explain.py"], ["give the text to explain", "--text_file"]),
    (["explain.py", "--text_file={tmp}/latin1.txt"], ["latin1.txt", "not UTF-8"], "latin1_prompt"),
    (["explain.py", "--text=x", "--views=occlusion"], ["views=occlusion", "a language model run has surprisal"]),
    (["explain.py", "--text=x", "--views=saliency"], ["views", "saliency"]),
]


def text_file(fill):
    (fill["tmp"] / "a.txt").write_text("Some text of mine.\n")


def no_meta(fill):
    (fill["data"] / "meta.json").unlink()


def other_tokenizer(fill):
    """A copy of the data whose meta.json names a character vocabulary one shorter."""
    import json
    shutil.copytree(fill["data"], fill["tmp"] / "other")
    meta = json.loads((fill["tmp"] / "other" / "meta.json").read_text())
    meta["tokenizer"]["chars"] = meta["tokenizer"]["chars"][:-1]
    meta["tokenizer"]["vocab_size"] -= 1
    meta["vocab_size"] -= 1
    (fill["tmp"] / "other" / "meta.json").write_text(json.dumps(meta))


def latin1_prompt(fill):
    (fill["tmp"] / "latin1.txt").write_bytes("café".encode("latin-1"))


def garbage_checkpoint(fill):
    (fill["run"] / "ckpt_best.pt").write_bytes(b"not a checkpoint at all")


def truncated_tokens(fill):
    path = fill["data"] / "train_00000.bin"
    path.write_bytes(path.read_bytes()[:-3])


def meta_not_json(fill):
    (fill["data"] / "meta.json").write_text("{")


def bad_jsonl(fill):
    for name in ("bad.jsonl", "train.jsonl"):
        (fill["tmp"] / name).write_text('{"text": "fine"}\nnot json at all\n')


def missing_val(fill):
    (fill["data"] / "val_00000.bin").unlink()


def out_of_vocab(fill):
    """The last id of each split's shard set to 65535, far past the char vocabulary, with
    meta.json's digests to match (a dataset prepared wrong, not damaged after: the id check)."""
    import json
    from data import sha256_of
    meta = json.loads((fill["data"] / "meta.json").read_text())
    for split, name in (("train", "train_00000.bin"), ("val", "val_00000.bin")):
        path = fill["data"] / name
        path.write_bytes(path.read_bytes()[:-2] + b"\xff\xff")
        meta["shards"][split][0]["sha256"] = sha256_of(str(path))
    (fill["data"] / "meta.json").write_text(json.dumps(meta))


def hf_folder(fill, edit_weights=None, edit_config=None, preset="gpt2"):
    """A small GPT-2 (or BERT) folder written by our exporter, then damaged by edit_weights /
    edit_config."""
    import json

    from safetensors.torch import load_file, save_file

    from config import PRESETS
    from hf import export_hf
    from checkpoint import build_model
    from model import GPTConfig
    folder = fill["tmp"] / "hf"
    export_hf(build_model(GPTConfig(**PRESETS[preset], vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)),
              str(folder))
    if edit_weights:
        weights = load_file(folder / "model.safetensors")
        edit_weights(weights)
        save_file(weights, folder / "model.safetensors")
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))


def latin1_config(fill):
    (fill["tmp"] / "latin1_config.py").write_bytes("# caf\xe9\nbatch_size = 4\n".encode("latin-1"))


def exiting_config(fill):
    (fill["tmp"] / "exiting_config.py").write_text("import sys\nsys.exit()\n")


def rows_in(fill, train, val=None):
    """A task set in tmp/t: train.jsonl's lines as given (bytes, or text), val.jsonl likewise or a copy."""
    folder = fill["tmp"] / "t"
    folder.mkdir()
    for name, lines in (("train", train), ("val", val if val is not None else train)):
        data = lines if isinstance(lines, bytes) else "".join(line + "\n" for line in lines).encode()
        (folder / f"{name}.jsonl").write_bytes(data)


SFT_ROW = '{"prompt": "thou art", "completion": "you are"}'
TASK_ROWS = {
    "latin1_rows": ('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"), [SFT_ROW]),
    "bare_string_row": ([SFT_ROW, '"just a string"'], [SFT_ROW]),
    "null_completion": (['{"prompt": "a", "completion": null}'], [SFT_ROW]),
    "sft_rows": ([SFT_ROW], None),
    "list_label": (['{"text": "a", "label": ["x"]}', '{"text": "b", "label": "y"}'], None),
    "mixed_labels": (['{"text": "a", "label": 1}', '{"text": "b", "label": "y"}'], None),
    "number_text": (['{"text": 42, "label": "x"}', '{"text": "b", "label": "y"}'], None),
    "one_label": (['{"text": "a", "label": "x"}', '{"text": "b", "label": "x"}'], None),
    "empty_references": (['{"prompt": "a", "references": []}'], None),
    "bool_answer": (['{"context": "a", "choices": ["b", "c"], "answer": true}'], None),
    "string_choices": (['{"context": "a", "choices": "abc", "answer": 1}'], None),
    "one_choice": (['{"context": "a", "choices": ["b"], "answer": 0}'], None),
    "no_messages": ([SFT_ROW], None),
    "unknown_role": (['{"messages": [{"role": "narrator", "content": "a"}, {"role": "assistant", "content": "b"}]}'],
                     None),
    "ends_on_user": (['{"messages": [{"role": "user", "content": "a"}]}'], None),
    "messages_not_list": (['{"messages": "hello"}'], None),
}


def task_rows_setup(kind):
    def setup(fill):
        rows_in(fill, *TASK_ROWS[kind])
    setup.__name__ = kind
    return setup


def foreign_dict_pt(fill):
    import torch
    torch.save({"state": {"w": torch.zeros(2)}}, fill["run"] / "ckpt_best.pt")


def cut_char_table(fill):
    import json
    meta = json.loads((fill["data"] / "meta.json").read_text())
    meta["tokenizer"]["chars"] = meta["tokenizer"]["chars"][:-2]
    (fill["data"] / "meta.json").write_text(json.dumps(meta))


def mismatched_pt(fill):
    import torch
    ckpt = torch.load(fill["run"] / "ckpt_best.pt", weights_only=True)
    ckpt["model_args"]["n_embd"] *= 2
    torch.save(ckpt, fill["run"] / "ckpt_best.pt")


def foreign_eval_json(fill):
    (fill["run"] / "eval.json").write_text("[1, 2, 3]")


def hf_gpt2(fill):
    hf_folder(fill)
    (fill["tmp"] / "short.tiktoken").write_text("IQ== 0\n")  # one rank of GPT-2's 50,256


def hf_missing_weights(fill):
    hf_folder(fill, lambda w: [w.pop(f"transformer.h.0.attn.c_attn.{p}") for p in ("weight", "bias")])


def hf_unexpected_weight(fill):
    def add(weights):
        weights["transformer.h.7.mlp.c_fc.weight"] = weights["transformer.h.0.mlp.c_fc.weight"].clone()
    hf_folder(fill, add)


def hf_wrong_shape(fill):
    hf_folder(fill, lambda w: w.update({"transformer.wpe.weight": w["transformer.wpe.weight"][:8].contiguous()}))


def bert_folder_without_vocab(fill):
    hf_folder(fill, preset="bert")  # exported without a tokenizer: no vocab.txt


def bert_config_lacks_key(fill):
    hf_folder(fill, edit_config=lambda c: c.pop("layer_norm_eps"), preset="bert")


def hf_corrupt_safetensors(fill):
    hf_folder(fill)
    path = fill["tmp"] / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def hf_config_lacks_key(fill):
    hf_folder(fill, edit_config=lambda c: c.pop("n_layer"))


SETUPS = {f.__name__: f for f in (text_file, no_meta, other_tokenizer, latin1_prompt, garbage_checkpoint,
                                  truncated_tokens, meta_not_json, bad_jsonl, missing_val, out_of_vocab,
                                  hf_missing_weights, hf_unexpected_weight, hf_wrong_shape, hf_corrupt_safetensors,
                                  hf_config_lacks_key,
                                  bert_folder_without_vocab, bert_config_lacks_key, latin1_config, exiting_config,
                                  hf_gpt2, foreign_eval_json, foreign_dict_pt, mismatched_pt, cut_char_table,
                                  *map(task_rows_setup, TASK_ROWS))}


def hashes(*folders):
    out = {}
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"):  # (who holds it)
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished_run(char_data, tmp_path_factory):
    import train as T
    from test_train import run_cfg
    out = tmp_path_factory.mktemp("finished_run")
    T.train(run_cfg(char_data, out, max_iters=2, eval_interval=2))
    return out


@pytest.fixture(scope="module")
def forkrun():
    """argv -> (exit code, stderr) of `python argv...`, each run in a fork of one process that
    imported torch once (tests/forkrun.py): the cases cost seconds in all instead of minutes.
    FORKRUN=0 runs each in a fresh interpreter instead."""
    if os.environ.get("FORKRUN") == "0":
        def fresh(argv):
            done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
            return done.returncode, done.stderr
        yield fresh
        return
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkrun.py")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def run(argv):
        server.stdin.write(json.dumps({"argv": argv}) + "\n")
        server.stdin.flush()
        if not select.select([server.stdout], [], [], 300)[0]:
            pytest.fail(f"{argv} did not end within 300 s")
        done = json.loads(server.stdout.readline())
        return done["code"], done["stderr"]
    yield run
    server.stdin.close()
    server.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[" ".join(c[0][:1] + [a for a in c[0][1:] if a not in SMALL]) +
                                              (f" ({c[2]})" if len(c) > 2 else "") for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, char_data, finished_run, tmp_path, forkrun):
    argv, words, setup = case[0], case[1], SETUPS[case[2]] if len(case) > 2 else None
    data, run, tmp = tmp_path / "data", tmp_path / "run", tmp_path / "tmp"
    shutil.copytree(char_data, data)
    shutil.copytree(finished_run, run)
    tmp.mkdir()
    fill = {"data": data, "run": run, "tmp": tmp}
    if setup:
        setup(fill)
    argv = [a.format(**fill) for a in argv]
    defaults = [f"--data_dir={data}", f"--out_dir={run}", f"--cache_dir={CACHE}", "--device=cpu"]
    keys = {a.split("=")[0] for a in argv[1:]}
    script_defaults = [d for d in defaults if d.split("=")[0] not in keys]
    if argv[0] == "prepare/text.py":
        script_defaults = [d for d in script_defaults if not d.startswith("--out_dir")]
    before = hashes(data, run, tmp)
    code, stderr = forkrun([*argv[:1], *script_defaults, *argv[1:]])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 1, (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(errors) == 1, stderr[-2000:]
    assert all(w in errors[0] for w in words), errors[0]
    assert hashes(data, run, tmp) == before


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only file system (a tmpfs mounted ro): chmod would not stop root, who runs CI."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()[:100]}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_read_only_out_dir_is_one_line(char_data, read_only_folder):
    argv = ["train.py", *SMALL, f"--data_dir={char_data}", f"--out_dir={read_only_folder}/run", f"--cache_dir={CACHE}"]
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(errors) == 1 and f"{read_only_folder}/run" in errors[0] and "Read-only" in errors[0], errors


# ----------------------------------------------------------------------------- runs that must not overlap or drift


def train_cli(char_data, out, *args):
    from test_train import train_cmd
    return subprocess.run(train_cmd(char_data, out, *args), cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_second_writer_is_refused_with_the_holder_named(char_data, tmp_path):
    """One process holds out_dir (as a run's workers that outlived their torchrun would); a second
    train.py into it stops with one line naming the holder, and writes nothing there."""
    out = tmp_path / "run"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from files import lock_folder; "
            f"lock_folder({str(out)!r}, 'x'); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # waits for the lock, not for a clock
        done = train_cli(char_data, out, "--max_iters=2", "--eval_interval=2")
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 1 and len(errors) == 1, done.stderr[-2000:]
        assert f"is in use by pid {holder.pid}" in errors[0], errors
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.stdin.close()
        holder.wait()
    assert train_cli(char_data, out, "--max_iters=2", "--eval_interval=2").returncode == 0  # released with its holder


@pytest.mark.slow
def test_resume_alone_continues_the_run_as_it_was_set_up(char_data, tmp_path):
    """--out_dir=RUN --init_from=resume, nothing else: the run's own max_iters, min_lr and
    patience, not the defaults (5000 steps, 6e-5, no early stopping); a finished run trains nothing."""
    out = tmp_path / "run"
    first = train_cli(char_data, out, "--max_iters=4", "--eval_interval=2", "--min_lr=1e-5", "--patience=3")
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt_before = (out / "ckpt_last.pt").read_bytes()
    again = subprocess.run([sys.executable, "train.py", f"--out_dir={out}", "--init_from=resume"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already at iteration 4 of max_iters=4" in again.stdout
    assert (out / "ckpt_last.pt").read_bytes() == ckpt_before
    saved = json.loads((out / "config.json").read_text())
    assert (saved["max_iters"], saved["min_lr"], saved["patience"]) == (4, 1e-5, 3)
    longer = subprocess.run([sys.executable, "train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=6"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert longer.returncode == 0, longer.stderr[-2000:]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["max_iters"], saved["min_lr"], saved["eval_interval"]) == (6, 1e-5, 2)


@pytest.mark.slow
def test_init_from_another_run_starts_a_new_run_from_its_weights(char_data, finished_run, tmp_path):
    """train.py --init_from=RUN --out_dir=NEW: RUN's weights, but iteration 0 and a new optimizer
    (it used to inherit RUN's iteration, train nothing and exit 0)."""
    done = train_cli(char_data, tmp_path / "new", f"--init_from={finished_run}", "--max_iters=3", "--eval_interval=3")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "new" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["kind"] == "train"] == [1, 2, 3]


@pytest.mark.slow
def test_a_folder_a_new_run_would_overwrite_is_refused(char_data, tmp_path):
    """A Hugging Face export, an earlier run's metrics: a new run into it stops and changes nothing."""
    for name, content in [("config.json", '{"model_type": "gpt2"}'), ("metrics.jsonl", '{"kind": "train"}\n')]:
        out = tmp_path / name
        out.mkdir()
        (out / name).write_text(content)
        done = train_cli(char_data, out, "--max_iters=2", "--eval_interval=2")
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 1 and len(errors) == 1, done.stderr[-2000:]
        assert f"holds files a new run would replace ({name})" in errors[0]
        assert sorted(p.name for p in out.iterdir()) == [name] and (out / name).read_text() == content


@pytest.mark.slow
def test_a_run_whose_first_ckpt_last_was_lost_resumes_from_ckpt_best(char_data, tmp_path):
    """A full disk at the first save can leave ckpt_best and no ckpt_last: init_from=resume (what
    the error advised) continues from ckpt_best, and a fresh start there is refused."""
    out = tmp_path / "run"
    assert train_cli(char_data, out, "--max_iters=2", "--eval_interval=2").returncode == 0
    (out / "ckpt_last.pt").unlink()
    best = (out / "ckpt_best.pt").read_bytes()
    fresh = train_cli(char_data, out, "--max_iters=2", "--eval_interval=2")
    assert fresh.returncode == 1 and "already holds a run (ckpt_best.pt)" in fresh.stderr
    assert (out / "ckpt_best.pt").read_bytes() == best
    resumed = train_cli(char_data, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_preparing_into_a_nanogpt_style_data_folder_is_refused(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train.bin", "val.bin"):
        (folder / name).write_bytes(b"\0" * 64)
    done = subprocess.run([sys.executable, "prepare/shakespeare.py", f"--data_dir={folder}", f"--cache_dir={CACHE}",
                           "--tokenizer=char"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-2000:]
    assert "holds token files that preparing would replace (train.bin, val.bin)" in errors[0]
    assert sorted(p.name for p in folder.iterdir()) == ["train.bin", "val.bin"]


@pytest.mark.slow
def test_a_redirected_run_logs_plain_lines_a_short_config_and_where_its_results_are(char_data, tmp_path):
    done = train_cli(char_data, tmp_path / "run", "--max_iters=3", "--eval_interval=3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "it/s" not in done.stderr and "\r" not in done.stderr  # no progress-bar redraws in a log
    assert [line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("iter ")] == \
        ["iter 1", "iter 2", "iter 3"]  # the plain periodic lines (log_interval=1)
    config = done.stdout.split("config (")[1].split("model:")[0].splitlines()[1:]
    assert 0 < len(config) < 30 and "  beta1 = 0.9" not in config  # defaults are in config.json only
    assert json.loads((tmp_path / "run" / "config.json").read_text())["beta1"] == 0.9
    assert done.stdout.strip().splitlines()[-1] == \
        f"done: {tmp_path / 'run'}/ holds ckpt_best.pt, ckpt_last.pt, metrics.jsonl"


@pytest.mark.slow
def test_warnings_are_one_line(finished_run):
    done = subprocess.run([sys.executable, "sample.py", f"--out_dir={finished_run}", "--start=" + "a" * 200,
                           "--max_new_tokens=2", "--num_samples=1", "--device=cpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: prompt longer than block_size-1" in done.stderr
    assert "UserWarning" not in done.stderr and "warnings.warn" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["config key", "data file"])
def test_under_torchrun_a_bad_input_is_said_once(bad, char_data, tmp_path):
    """Every process finds the same fault; one line says it (rank 0 for a key, each machine's
    first process for a file), not one per process."""
    from test_train import train_cmd
    data, said = char_data, "error: --learning_rat: unknown config key"
    if bad == "data file":
        data = tmp_path / "data"
        shutil.copytree(char_data, data)
        (data / "meta.json").write_text("{oops")
        said = "meta.json: not valid JSON"
    args = train_cmd(data, tmp_path / "run", "--learning_rat=1" if bad == "config key" else "--device=cpu")[1:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *args, "--gradient_accumulation_steps=2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert done.stderr.count(said) == 1 and done.stderr.count("error:") == 1, done.stderr[-2000:]


@pytest.mark.slow
def test_a_metrics_row_this_project_did_not_write_stops_a_resume(finished_run, tmp_path):
    """A resume rewrites metrics.jsonl up to its checkpoint: a foreign row is one line, not a
    KeyError, and not silently dropped."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + "[1, 2]\n" + "".join(lines[2:]))
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "train.py", f"--out_dir={run}", "--init_from=resume", "--max_iters=4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "metrics.jsonl:3: not a row of this project's metrics log" in errors[0]
    assert path.read_bytes() == before


@pytest.mark.slow
def test_a_second_preparation_of_one_data_dir_is_refused(tmp_path):
    """Two preparations into one data_dir (on two machines sharing it, say) would mix their shards."""
    data = tmp_path / "data"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from files import lock_folder; "
            f"lock_folder({str(data / '.prepare-partial')!r}, 'x'); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run([sys.executable, "prepare/shakespeare.py", f"--data_dir={data}", f"--cache_dir={CACHE}",
                               "--tokenizer=char"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 1 and len(errors) == 1, done.stderr[-2000:]
        assert f"in use by pid {holder.pid}" in errors[0]
        assert sorted(p.name for p in data.iterdir()) == [".prepare-partial"]
    finally:
        holder.stdin.close()
        holder.wait()
