"""
Sample from a trained model, or from GPT-2 weights.

    python sample.py --out_dir=out/shakespeare_char_cpu --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --init_from=hf:path/to/gpt2 --start=FILE:prompt.txt --temperature=0
    python sample.py --out_dir=out/run --export_hf=exported/    # write a Hugging Face folder instead
    python sample.py --out_dir=out/fsdp_run --export_ckpt=model.pt   # an FSDP run's shards as one file
    python sample.py --out_dir=out/mtp --speculative=True --temperature=0   # multi-token heads draft
    python sample.py --out_dir=out/bert --start="To be, or not to <|mask|>"  # an encoder fills in masks

The model comes from out_dir's checkpoint (ckpt_best, or ckpt_last with checkpoint=last; a .pt
file, or the .dcp folder of shards an FSDP run writes, gathered on load),
or from init_from=hf:PATH / a GPT-2 name. Text is decoded with the run's own tokenizer (rebuilt
from the checkpoint's data_dir meta.json); GPT-2 weights use GPT-2 BPE.
"""

import exits  # noqa: F401  first: from here on a signal or a failed write ends the program with one line

import os
import sys
import time

import torch

from checkpoint import checkpoint_path, export_checkpoint, load_for_inference
from compute import setup_compute
from config import cli_config
from generate import fit_context, generate, sample_next, speculative_generate
from hf import export_hf


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise SystemExit(f"error: --start=FILE:{path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: --start=FILE:{path}: not UTF-8 (byte {e.start}); convert the file to "
                             f"UTF-8") from None
    return start


@torch.no_grad()
def fill_masks(model, tok, text, cfg):
    """An encoder does not continue text: it fills in every <|mask|> of the prompt at once, each
    with its likeliest token (temperature=0) or one sampled like generated text. Prints
    num_samples fillings."""
    ids = fit_context(tok.encode_with_masks(text), model.config.block_size)
    if tok.mask_id not in ids:
        raise SystemExit("error: an encoder (arch=bert) fills in masked tokens: put <|mask|> in --start, e.g. "
                         "--start='To be, or not to <|mask|>'")
    x = torch.tensor([[tok.eot_id] + ids], device=next(model.parameters()).device)  # documents open with it
    masked = x[0] == tok.mask_id
    logits = model(x)[0][0, masked].float()  # (masks, V)
    for i in range(cfg.num_samples):
        filled = x[0].clone()
        filled[masked] = sample_next(logits, cfg.temperature, cfg.top_k, cfg.top_p)
        print(tok.decode(filled[1:].tolist()))
        print("-" * 40 if i + 1 < cfg.num_samples else "")


def compare_speculative(model, tok, prompt, cfg, autocast):
    """Greedy decoding twice, plain (KV cache) and self-speculative; the texts must agree."""
    if model.config.mtp_heads < 2 or cfg.temperature != 0:
        raise SystemExit("error: --speculative=True needs a model trained with mtp_heads > 1 and --temperature=0")
    timings = {}
    for name in ("plain", "speculative"):
        t0 = time.time()
        with autocast:
            if name == "plain":
                out = generate(model, [prompt], cfg.max_new_tokens, 0, stop_ids={tok.eot_id})[0]
            else:
                (out,), accepted, proposed = speculative_generate(model, [prompt], cfg.max_new_tokens, {tok.eot_id})
        timings[name] = (out, time.time() - t0)
    (plain, t_plain), (spec, t_spec) = timings["plain"], timings["speculative"]
    print(tok.decode(prompt + spec))
    if spec != plain:  # a defect of this code, not of the user's input: say so in one line
        raise SystemExit(f"error: speculative decoding differed from greedy decoding after {len(plain)} tokens "
                         f"(a bug: please report it with this model and prompt)")
    print(f"plain: {len(plain) / t_plain:.1f} tokens/s; speculative: {len(spec) / t_spec:.1f} tokens/s "
          f"({t_plain / t_spec:.2f}x); drafts accepted {accepted}/{proposed} "
          f"({accepted / max(1, proposed):.0%}) with {model.config.mtp_heads} heads", file=sys.stderr)


def main():
    cfg = cli_config()
    if cfg.export_hf and os.path.isdir(cfg.export_hf) and os.listdir(cfg.export_hf) and not cfg.overwrite:
        raise SystemExit(f"error: export_hf={cfg.export_hf} is not empty; choose a new folder, or set overwrite=True "
                         f"to replace what is there")
    if cfg.export_ckpt:
        print(export_checkpoint(checkpoint_path(cfg.out_dir, cfg.checkpoint), cfg.export_ckpt))
        return
    torch.manual_seed(cfg.seed)
    compute = setup_compute(cfg)
    model, tok, loaded = load_for_inference(cfg, compute.device)
    if loaded.labels:
        raise SystemExit(f"error: {loaded.source} is a classifier (labels {loaded.labels}); "
                         f"it does not generate text. Use evaluate.py --eval_task=classify")
    if cfg.export_hf:
        chat = ((loaded.checkpoint or {}).get("finetune") or {}).get("chat_template")
        print(export_hf(model, cfg.export_hf, loaded.tokenizer, chat))
        return
    if model.config.arch == "bert":
        return fill_masks(model, tok, read_prompt(cfg.start), cfg)
    prompt = tok.encode(read_prompt(cfg.start)) or [tok.eot_id]  # an empty prompt starts a new document
    stop_text = cfg.stop
    should_stop = (lambda ids: stop_text in tok.decode(ids)) if stop_text else None
    if cfg.speculative:
        return compare_speculative(model, tok, prompt, cfg, compute.autocast)
    generated, seconds = 0, 0.0
    for i in range(cfg.num_samples):
        t0 = time.time()
        with compute.autocast:
            out = generate(model, [prompt], cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                           stop_ids={tok.eot_id}, should_stop=should_stop, use_cache=cfg.kv_cache)[0]
        seconds += time.time() - t0
        generated += len(out)
        text = tok.decode(prompt + out)
        if stop_text and stop_text in text[len(tok.decode(prompt)):]:
            cut = text.index(stop_text, len(tok.decode(prompt)))
            text = text[:cut + len(stop_text)]
        print(text)
        print("-" * 40 if i + 1 < cfg.num_samples else "")
    print(f"{generated} tokens in {seconds:.2f}s: {generated / max(seconds, 1e-9):.1f} tokens/s "
          f"({'KV cache' if cfg.kv_cache else 'no cache'}, {compute.device.type})", file=sys.stderr)


if __name__ == "__main__":
    main()
