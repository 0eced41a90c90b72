"""
GPT-2 and BERT weights in and out of this project's GPT, in Hugging Face transformers' format.

    from_hf(path)        a GPT holding a transformers GPT-2 folder's weights (or a GPT-2 name,
                         downloaded from the hub when it is reachable), or an encoder holding a
                         BertForMaskedLM folder's (hf_tokenizer_meta: the tokenizer to go with it)
    export_hf(model, d)  write a GPT2LMHeadModel or BertForMaskedLM folder (safetensors +
                         config.json, and the tokenizer files: GPT-2 BPE, BERT's vocab.txt);
                         other architectures get our own format

Exactness is tested against transformers itself: logits to 1e-4, export and reload, greedy
generation. The differences in layout: transformers' GPT-2 stores its matmul weights as Conv1D
(in, out), transposed against nn.Linear; BERT keeps query, key and value apart, where our
c_attn holds the three stacked.
"""

import json
import os
import shutil
from dataclasses import asdict, fields

import torch

from config import PRESETS
from encoder import BertGPT
from errors import CheckpointError
from model import GPT, GPTConfig
from tokenizer import (EOT as EOT_TEXT, GPT2_META, WordPieceTokenizer, from_meta, write_gpt2_tokenizer_files,
                       write_wordpiece_files)

HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}  # n_layer, n_head, n_embd


def gpt2_config(name):
    """The config of one of the four published GPT-2 sizes."""
    n_layer, n_head, n_embd = GPT2_SIZES[name]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def load_hf_state_dict(path):
    """Read a Hugging Face checkpoint folder's weights without running code from it."""
    st, binf = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if not os.path.isfile(st) and not os.path.isfile(binf):
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file
            return load_file(st)
        return torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, or not a weights file at all
        raise ValueError(f"{st if os.path.isfile(st) else binf}: unreadable ({type(e).__name__}); download it "
                         f"again") from None


def check_hf_weights(path, hf_weights, shapes):
    """Every weight our model needs ({name: shape} in the folder's naming), and nothing else,
    with that shape; else one error (loading a folder that lacks weights would leave them
    random without a word)."""
    missing, unexpected = sorted(shapes.keys() - hf_weights.keys()), sorted(hf_weights.keys() - shapes.keys())
    if missing or unexpected:
        listed = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                  for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise ValueError(f"{path}: weights do not match its config.json: {'; '.join(listed)}")
    for k, v in hf_weights.items():
        shape = shapes[k]
        if tuple(v.shape) != tuple(shape):
            raise ValueError(f"{path}: weight {k} has shape {tuple(v.shape)}, but its config.json implies "
                             f"{tuple(shape)}")


def from_hf(path, **overrides):
    """A GPT holding the weights of a Hugging Face GPT-2 folder (config.json + weights), or of a
    GPT-2 name (gpt2, gpt2-medium, ...) downloaded from the hub when it is reachable.
    overrides: GPTConfig keys that do not change the function (dropout, attention backend)."""
    if not os.path.isdir(path):
        path = download_hf(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json; init_from=hf:PATH needs a Hugging Face GPT-2 or BERT "
                                f"folder")
    with open(cfg_path) as f:
        hf = json.load(f)
    if hf.get("model_type") == "bert":
        return bert_from_hf(path, hf, overrides)
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{cfg_path}: model_type {hf.get('model_type')!r}; only GPT-2 and BERT checkpoints import")
    if hf.get("activation_function", "gelu_new") != "gelu_new" or hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise ValueError(f"{cfg_path}: activation/epsilon differ from GPT-2's; cannot import exactly")
    try:
        config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], **overrides)
    except KeyError as e:
        raise ValueError(f"{cfg_path}: lacks {e.args[0]!r}, which a GPT-2 config.json has") from None
    model = GPT(config)
    # older transformers save causal-mask buffers; the head is tied to wte
    sd = {k.removeprefix("transformer."): v for k, v in load_hf_state_dict(path).items()
          if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    ours = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    shapes = {k: v.shape[::-1] if k.endswith(HF_TRANSPOSED) else v.shape for k, v in ours.items()}
    shapes["wte.weight"] = (config.vocab_size, config.n_embd)  # (ours has padding rows past the vocabulary)
    check_hf_weights(path, sd, shapes)
    with torch.no_grad():
        for k, v in sd.items():
            target = ours[k]
            if k.endswith(HF_TRANSPOSED):
                v = v.t()
            if k == "wte.weight":  # our table has padding rows past the true vocabulary
                target[: v.shape[0]].copy_(v)
                target[v.shape[0]:].zero_()
            else:
                target.copy_(v)
    return model


# ----------------------------------------------------------------------------- BERT

# our name inside transformer.h.{i}  <-  transformers' inside bert.encoder.layer.{i}
BERT_LAYER = {"attn.c_proj": "attention.output.dense", "ln_1": "attention.output.LayerNorm",
              "mlp.c_fc": "intermediate.dense", "mlp.c_proj": "output.dense", "ln_2": "output.LayerNorm"}
BERT_TOP = {"transformer.wte": "bert.embeddings.word_embeddings",
            "transformer.wpe": "bert.embeddings.position_embeddings",
            "transformer.wtt": "bert.embeddings.token_type_embeddings", "transformer.ln_e": "bert.embeddings.LayerNorm",
            "mlm_transform.dense": "cls.predictions.transform.dense",
            "mlm_transform.norm": "cls.predictions.transform.LayerNorm"}
# in a BertForPreTraining folder (bert-base-uncased's): the pooler and next-sentence head, which a
# masked LM does not use; the decoder is tied to the word embeddings and cls.predictions.bias
BERT_UNUSED = ("bert.pooler.", "cls.seq_relationship.", "cls.predictions.decoder.", "bert.embeddings.position_ids")


def bert_layout(config):
    """[(transformers' name, our name, rows of ours it fills)] for every weight of a
    BertForMaskedLM of config's shape. Rows: query, key and value are thirds of c_attn; the
    vocabulary's rows are the first vocab_size of our padded table."""
    C, vocab = config.n_embd, slice(0, config.vocab_size)
    layout = [(f"{hf}.{w}", f"{ours}.{w}", vocab if ours == "transformer.wte" else None)
              for ours, hf in BERT_TOP.items() for w in (("weight",) if "LayerNorm" not in hf and "dense" not in hf
                                                         else ("weight", "bias"))]
    for i in range(config.n_layer):
        hf, ours = f"bert.encoder.layer.{i}.", f"transformer.h.{i}."
        for j, part in enumerate(("query", "key", "value")):
            layout += [(f"{hf}attention.self.{part}.{w}", f"{ours}attn.c_attn.{w}", slice(j * C, (j + 1) * C))
                       for w in ("weight", "bias")]
        layout += [(f"{hf}{theirs}.{w}", f"{ours}{mine}.{w}", None) for mine, theirs in BERT_LAYER.items()
                   for w in ("weight", "bias")]
    return layout + [("cls.predictions.bias", "lm_head.bias", vocab)]


def bert_from_hf(path, hf, overrides):
    """An encoder (arch='bert', BERT's architecture) holding a BertForMaskedLM folder's weights."""
    cfg_path = os.path.join(path, "config.json")
    exact = (hf.get("hidden_act", "gelu") == "gelu" and hf.get("position_embedding_type", "absolute") == "absolute"
             and hf.get("tie_word_embeddings", True) and hf.get("intermediate_size") == 4 * hf.get("hidden_size", 0))
    if not exact:
        raise ValueError(f"{cfg_path}: hidden_act, position_embedding_type, intermediate_size or untied embeddings "
                         f"differ from BERT's (gelu, absolute, 4 x hidden_size, tied); cannot import exactly")
    try:
        config = GPTConfig(**{**PRESETS["bert"], "vocab_size": hf["vocab_size"],
                              "block_size": hf["max_position_embeddings"], "n_layer": hf["num_hidden_layers"],
                              "n_head": hf["num_attention_heads"], "n_embd": hf["hidden_size"],
                              "norm_eps": hf["layer_norm_eps"], "type_vocab_size": hf["type_vocab_size"]},
                           **overrides)
    except KeyError as e:
        raise ValueError(f"{cfg_path}: lacks {e.args[0]!r}, which a BERT config.json has") from None
    model = BertGPT(config)
    sd = {k: v for k, v in load_hf_state_dict(path).items() if not k.startswith(BERT_UNUSED)}
    ours = model.state_dict()
    layout = bert_layout(config)
    check_hf_weights(path, sd, {hf_name: ours[name][rows].shape if rows else ours[name].shape
                                for hf_name, name, rows in layout})
    with torch.no_grad():
        for hf_name, name, rows in layout:
            (ours[name][rows] if rows else ours[name]).copy_(sd[hf_name])
    return model


def write_bert_folder(model, out_dir, tokenizer_meta):
    """A BertForMaskedLM folder of an encoder with BERT's architecture (export_hf's part)."""
    from safetensors.torch import save_file
    config, sd = model.config, model.state_dict()
    weights = {hf_name: (sd[name][rows] if rows else sd[name]).detach().cpu().contiguous()
               for hf_name, name, rows in bert_layout(config)}
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    hf_config = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": config.vocab_size,
                 "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
                 "num_attention_heads": config.n_head, "intermediate_size": 4 * config.n_embd, "hidden_act": "gelu",
                 "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout,
                 "max_position_embeddings": config.block_size, "type_vocab_size": config.type_vocab_size,
                 "initializer_range": 0.02, "layer_norm_eps": config.norm_eps, "position_embedding_type": "absolute",
                 "pad_token_id": 0, "tie_word_embeddings": True}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_meta and tokenizer_meta.get("kind") == "wordpiece":
        write_wordpiece_files(tokenizer_meta, out_dir)
    return ": loads with transformers.BertForMaskedLM.from_pretrained"


def hf_tokenizer_meta(path):
    """The tokenizer (its meta()) of a Hugging Face folder or GPT-2 name: GPT-2's BPE, or for
    a BERT folder the WordPiece vocabulary in its vocab.txt."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return dict(GPT2_META)
    with open(cfg_path) as f:
        if json.load(f).get("model_type") != "bert":
            return dict(GPT2_META)
    return WordPieceTokenizer.from_folder(path).meta()


def download_hf(name):
    if name not in GPT2_SIZES:
        raise FileNotFoundError(f"{name}: not a folder, nor a GPT-2 name ({', '.join(GPT2_SIZES)})")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:
        raise FileNotFoundError(f"cannot download {name} from the Hugging Face hub ({type(e).__name__}); "
                                f"download it elsewhere and use init_from=hf:PATH") from None


# what may differ from an exported architecture: the shape, and what does not change the function
# (dropout, the attention backend, vocabulary padding, zero_init_proj, which only sets the initialisation)
FUNCTION_NEUTRAL = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "attn_backend",
                    "pad_vocab_to", "zero_init_proj")


def incompatibilities(config, preset, **carried):
    """What in config the transformers class of a preset (config.PRESETS: gpt2 -> GPT2LMHeadModel,
    bert -> BertForMaskedLM) cannot represent; empty = exportable. carried: the values that
    class's config.json holds for keys beyond the shape."""
    reference = GPTConfig(**{**PRESETS[preset], **{name: getattr(config, name) for name in FUNCTION_NEUTRAL},
                             **carried})
    return [f"{f.name}={getattr(config, f.name)!r}" for f in fields(config)
            if getattr(config, f.name) != getattr(reference, f.name)]


def export_problems(config):
    """incompatibilities() with the transformers class config's architecture would export to."""
    if config.arch == "bert":  # BERT's config.json holds its epsilon and any number (>= 1) of token types
        return incompatibilities(config, "bert", norm_eps=config.norm_eps,
                                 type_vocab_size=config.type_vocab_size or PRESETS["bert"]["type_vocab_size"])
    return incompatibilities(config, "gpt2")


# conversation.py's template in transformers' terms (apply_chat_template), for an exported chat model
HF_CHAT_TEMPLATE = ("{{ eos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def write_chat_tokenizer_config(out_dir, tokenizer_meta):
    """tokenizer_config.json for a GPT-2 BPE chat model: the mask token and the turn markers as
    special tokens at our ids, and the chat template, so apply_chat_template gives our tokens."""
    specials = from_meta(tokenizer_meta).shown_specials()  # GPT-2's: the mask token and the turn markers
    config = {"tokenizer_class": "GPT2Tokenizer", "eos_token": EOT_TEXT, "bos_token": EOT_TEXT,
              "unk_token": EOT_TEXT, "chat_template": HF_CHAT_TEMPLATE,
              "added_tokens_decoder": {str(i): {"content": text, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False}
                                       for i, text in specials.items()}}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export_hf(model, out_dir, tokenizer_meta=None, chat_template=None):
    """Write a GPT-2-compatible model as a transformers GPT2LMHeadModel folder (safetensors +
    config.json, and tokenizer files for GPT-2 BPE). Other models get safetensors + our config,
    with a message saying that transformers' GPT-2 class cannot load them.

    The folder is written as out_dir.tmp, then moved into place: in one rename when out_dir is
    missing or empty, else file by file (each file whole; files the export does not write stay).
    So an interrupted export never leaves a folder that looks finished."""
    from safetensors import SafetensorError  # (safetensors reports a failed write as its own error)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted export's leftovers
    try:
        what = write_hf_folder(model, tmp, tokenizer_meta, chat_template)
    except (OSError, SafetensorError) as e:  # a full disk: no half-written folder left behind, one line
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e).split(": ")[-1]
        raise CheckpointError(f"could not write the export to {out_dir} ({reason}); nothing was written there: "
                              f"free space, then export again") from None
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    if os.path.isdir(out_dir):
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        os.rmdir(tmp)
    else:
        os.replace(tmp, out_dir)
    return f"wrote {out_dir}{what}"


def write_hf_folder(model, out_dir, tokenizer_meta, chat_template=None):
    """export_hf's files in out_dir; returns what the folder is, for the message."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    config = model.config
    problems = export_problems(config)
    if config.arch == "bert" and not problems:
        return write_bert_folder(model, out_dir, tokenizer_meta)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if problems:
        save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight" or not config.tie_embeddings},
                  os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "gpt_config.json"), "w") as f:
            json.dump(asdict(config), f, indent=2)
        return (f" in this project's format: transformers' {'BERT' if config.arch == 'bert' else 'GPT-2'} class "
                f"cannot load this model because it uses {', '.join(problems)}")
    hf = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            continue  # tied: transformers re-ties it to wte on load
        name = k.removeprefix("transformer.")
        if name == "wte.weight":
            v = v[: config.vocab_size]
        if name.endswith(HF_TRANSPOSED):
            v = v.t()
        hf[f"transformer.{name}"] = v.contiguous()
    save_file(hf, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    eot = (tokenizer_meta or {}).get("eot_id", 50256)
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
                 "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
                 "n_layer": config.n_layer, "n_head": config.n_head, "activation_function": "gelu_new",
                 "layer_norm_epsilon": 1e-5, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
                 "attn_pdrop": config.dropout, "initializer_range": 0.02, "bos_token_id": eot, "eos_token_id": eot,
                 "tie_word_embeddings": True}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_meta and tokenizer_meta.get("kind") == "gpt2":
        write_gpt2_tokenizer_files(out_dir)
        if chat_template:
            write_chat_tokenizer_config(out_dir, tokenizer_meta)
            return ": loads with transformers.GPT2LMHeadModel.from_pretrained (its tokenizer has the chat template)"
    return ": loads with transformers.GPT2LMHeadModel.from_pretrained"
