"""
Look inside a trained model: which tokens of a text surprise it, where its attention heads
look, at which depth the next token becomes clear; for a classifier, which tokens moved the
decision.

    python explain.py --out_dir=out/shakespeare_char_cpu --text="ROMEO: But soft, what light"
    python explain.py --out_dir=RUN --text_file=speech.txt --views=surprisal,attention

Writes into out_dir/explain/ (an earlier one stays unless overwrite=True) and prints each path:
  surprisal.html, .png   every token coloured by its loss in bits, and the bits per character
  attention.png          layers x heads of attention weights (computed with the math backend, so
                         the masks, windows, GQA and RoPE are the model's own)
  logit_lens.png, .md    what each layer would predict: the final norm and the LM head applied to
                         the residual stream after every block (nostalgebraist's "logit lens")
  occlusion.html         a classifier: how much each token holds up the predicted label
  receptive_field.md     arch=cnn: how many tokens each layer's output can read

Which views a model has: a decoder all three LM views; the gated CNN surprisal, logit lens and
its receptive field; the LSTM surprisal; a classifier occlusion (and attention for a decoder's).
A view a model lacks is skipped with one line, or refused if asked for by name (views=...).
A text longer than the context: surprisal scores every token with sliding windows (each with at
least half a window before it, as evaluate.py does); attention and the logit lens read the last
block_size tokens, and say so.

Occlusion, not integrated gradients: replacing one token at a time by end-of-text and reading
the drop in the predicted label's probability is exact (no path integral to approximate, no
baseline embedding to choose) and costs one batched forward per text, cheap at a classifier's
lengths. Positive: the token supported the decision; negative: it argued against it.
"""

import exits  # noqa: F401  first: from here on a signal or a failed write ends the program with one line

import html
import math
import os
import shutil
import sys
from contextlib import contextmanager
from unittest import mock

import torch

import model as model_module
from checkpoint import load_for_inference
from compute import setup_compute
from config import cli_config
from errors import ConfigError, DataError

LM_VIEWS = ("surprisal", "attention", "logit_lens")
SHORT = 48  # texts up to this many tokens get token labels on every axis


# ----------------------------------------------------------------------------- the text

def read_text(cfg):
    if bool(cfg.text) == bool(cfg.text_file):
        raise ConfigError("give the text to explain: --text='...' or --text_file=PATH (one of them)")
    text = cfg.text
    if cfg.text_file:
        try:
            with open(cfg.text_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise DataError(f"text_file={cfg.text_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"text_file={cfg.text_file}: not UTF-8 (byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise DataError("the text to explain is empty: give at least one character")
    return text


def encode(tok, text):
    """[end-of-text] + the text's ids: every document this project trains on opens with it, so
    the first character is predicted as a document's first. A character the tokenizer maps to
    its unknown token is refused: its surprisal would be that of the unknown token."""
    ids = tok.encode(text)
    unk = getattr(tok, "unk_id", None)
    if unk is not None and unk in ids:
        unknown = sorted({c for c in text if unk in tok.encode(c)})
        raise DataError(f"the text has characters this model's tokenizer never saw: {''.join(unknown)!r}; "
                        f"remove or replace them")
    return [tok.eot_id] + ids


# ----------------------------------------------------------------------------- what the model computes

@torch.no_grad()
def surprisal(model, ids):
    """Each token's loss in nats (len(ids) - 1,): -log p(ids[t+1] | ids[..t]). A text longer
    than block_size is read in windows half a window apart; each token is scored once, in the
    first window where it has at least half a window before it (or is near the start)."""
    B, stride, n = model.config.block_size, model.config.block_size // 2, len(ids)
    device = next(model.parameters()).device
    losses, scored, start = torch.empty(n - 1), 1, 0  # scored: targets ids[1:scored] are done
    while scored < n:
        window = torch.tensor([ids[start:start + B]], device=device)
        logp = torch.log_softmax(model(window)[0][0].float(), dim=-1)  # (len, V): row i predicts start + i + 1
        targets = torch.arange(scored, min(start + B, n), device=device)
        losses[targets.cpu() - 1] = -logp[targets - start - 1, window[0, targets - start]].cpu()
        scored, start = start + B, start + stride
    return losses


@contextmanager
def recording_attention(model):
    """Inside: the model attends with the math backend and every attention_weights() result of
    the first sequence, (nh, Tq, Tk), is appended to the yielded list, layer after layer."""
    maps, weights, backend = [], model_module.attention_weights, model.config.attn_backend

    def record(q, k, mask):
        w = weights(q, k, mask)
        maps.append(w[0].float().cpu())
        return w
    model.config.attn_backend = "math"  # sdpa and flex never form the weights
    try:
        with mock.patch.object(model_module, "attention_weights", record):
            yield maps
    finally:
        model.config.attn_backend = backend


@torch.no_grad()
def attention_maps(model, ids, classifier=False):
    """(layers, heads, T, T): each layer's attention weights over ids (at most block_size); a
    classifier reads them all (its lengths)."""
    device = next(model.parameters()).device
    lengths = (torch.tensor([len(ids)], device=device),) if classifier else ()
    with recording_attention(model) as maps:
        model(torch.tensor([ids], device=device), *lengths)
    return torch.stack(maps)


def unembed(model, x):
    """The residual stream (B, T, C) -> logits (B, T, V), as the end of GPT.forward makes them."""
    logits = model.lm_head(model.transformer.ln_f(x))
    if model.config.logit_softcap > 0:
        logits = model.config.logit_softcap * torch.tanh(logits.float() / model.config.logit_softcap)
    return logits[..., :model.config.vocab_size]


@torch.no_grad()
def logit_lens(model, ids):
    """(layers, T, V) log-probabilities: the final norm and unembedding applied to the residual
    stream after each block. The last layer's are the model's own (tested)."""
    x, rope, mask = model.inputs(torch.tensor([ids], device=next(model.parameters()).device))
    x = x0 = model.transformer.drop(x)
    layers = []
    for block in model.transformer.h:
        x = block(x, x0, rope, mask, None)
        layers.append(torch.log_softmax(unembed(model, x)[0].float(), dim=-1).cpu())
    return torch.stack(layers)


@torch.no_grad()
def occlusion(model, ids, occluder, pooled_at=None):
    """A classifier's (label probabilities (n_labels,), importance (len(ids),)): importance[t] =
    p(predicted label) - p(predicted label with token t replaced by occluder). pooled_at: the
    position the classifier reads (default the last), as its `lengths` says; tokens after it
    are still fed."""
    device = next(model.parameters()).device
    n = len(ids)
    length = torch.tensor([n if pooled_at is None else pooled_at + 1], device=device)
    batch = torch.tensor([ids] * (n + 1), device=device)  # row 0 as is; row t + 1 without token t
    batch[torch.arange(1, n + 1), torch.arange(n)] = occluder
    probs = torch.softmax(model(batch, length.expand(n + 1))[0].float(), dim=-1).cpu()  # (n + 1, labels)
    label = int(probs[0].argmax())
    return probs[0], probs[0, label] - probs[1:, label]


# ----------------------------------------------------------------------------- pictures and pages

def token_labels(tok, ids):
    return [tok.decode([i]) if i != tok.eot_id else "<eot>" for i in ids]


def shown(label):
    """A token as an axis label: whitespace made visible."""
    return label.replace("\n", "↵").replace(" ", "·").replace("\t", "→") or "∅"


def colour(value, top):
    """0 -> white, top -> deep red (negative: blue), as a CSS colour."""
    share = max(-1.0, min(1.0, value / top)) if top else 0.0
    fade = int(255 * (1 - abs(share)))
    return f"rgb(255,{fade},{fade})" if share >= 0 else f"rgb({fade},{fade},255)"


def token_page(title, summary, labels, values, top, tips):
    """An HTML page of the tokens, each on a background coloured by its value, a tooltip each."""
    spans = "".join(f'<span title="{html.escape(tip)}" style="background:{colour(v, top)}">'
                    f'{html.escape(label).replace(chr(10), "↵<br>")}</span>'
                    for label, v, tip in zip(labels, values, tips))
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<body style='font-family:monospace;max-width:60em'><h3>{html.escape(title)}</h3>"
            f"<p>{html.escape(summary)}</p><p style='white-space:pre-wrap;line-height:1.6'>{spans}</p></body>")


def figure(width, height):
    """A matplotlib figure of exactly width x height pixels (at 100 dpi) when saved by save()."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.figure(figsize=(width / 100, height / 100), dpi=100)


def save(fig, path):
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=100)  # no bbox_inches="tight": the size stays the one figure() promised
    plt.close(fig)
    return f"{path} ({int(fig.get_figwidth() * 100)}x{int(fig.get_figheight() * 100)})"


def surprisal_strip(labels, bits, path, per_row=64):
    """The tokens in rows of per_row, each cell coloured by its bits (labels on short texts)."""
    rows = math.ceil(len(bits) / per_row)
    grid = torch.full((rows * per_row,), float("nan"))
    grid[:len(bits)] = bits
    fig = figure(1200, 140 + 22 * rows)
    ax = fig.add_axes([0.02, 0.08, 0.86, 0.72])
    image = ax.imshow(grid.view(rows, per_row).numpy(), cmap="Reds", aspect="auto", vmin=0)
    if len(bits) <= 4 * per_row:
        for i, label in enumerate(labels):
            ax.text(i % per_row, i // per_row, shown(label)[:3], ha="center", va="center", fontsize=6)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"surprisal in bits per token ({len(bits)} tokens, {per_row} a row)", fontsize=9)
    fig.colorbar(image, cax=fig.add_axes([0.9, 0.08, 0.02, 0.72]))
    return save(fig, path)


def attention_grid(maps, labels, path):
    """One heatmap per layer (rows) and head (columns): query position down, key across."""
    from matplotlib.colors import PowerNorm
    layers, heads, T, _ = maps.shape
    labelled = T <= 32  # token labels on the outer axes: the first column's rows, the last row's columns
    cell = 340 if labelled else 160
    fig = figure(60 + cell * heads, 40 + cell * layers)
    for layer in range(layers):
        for head in range(heads):
            ax = fig.add_subplot(layers, heads, layer * heads + head + 1)
            # a square-root scale: the first rows' weights (few keys, large) would drown the rest
            ax.imshow(maps[layer, head].numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1))
            ax.set_title(f"layer {layer} head {head}", fontsize=7)
            rows = range(T) if labelled and head == 0 else []
            columns = range(T) if labelled and layer == layers - 1 else []
            ax.set_xticks(columns, [shown(labels[t]) for t in columns], fontsize=5)
            ax.set_yticks(rows, [shown(labels[t]) for t in rows], fontsize=5)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.04, top=0.95, hspace=0.45, wspace=0.3)
    return save(fig, path)


def logit_lens_views(lens, ids, labels, tok, path_png, path_md, columns=32):
    """The probability each layer gives the true next token at each position (PNG), and each
    layer's top prediction for the last `columns` positions (Markdown table, ✓ = correct)."""
    layers, T, _ = lens.shape
    truth = torch.tensor(ids[1:])
    p_true = lens[:, :-1].gather(-1, truth.view(1, -1, 1).expand(layers, -1, 1)).squeeze(-1).exp()  # (layers, T-1)
    fig = figure(min(1600, 200 + 24 * (T - 1)), 140 + 40 * layers)
    ax = fig.add_axes([0.08, 0.25, 0.82, 0.62])
    image = ax.imshow(p_true.numpy(), cmap="Greens", aspect="auto", vmin=0, vmax=1)
    ax.set_yticks(range(layers), [f"after block {i}" for i in range(layers)], fontsize=7)
    ticks = range(T - 1) if T - 1 <= SHORT else []
    ax.set_xticks(ticks, [shown(labels[t + 1]) for t in ticks], fontsize=6)
    ax.set_title("probability of the true next token, read after each block (logit lens)", fontsize=9)
    fig.colorbar(image, cax=fig.add_axes([0.92, 0.25, 0.015, 0.62]))
    saved = save(fig, path_png)
    first = max(0, T - 1 - columns)
    top = lens[:, first:T - 1].argmax(-1)  # (layers, columns)
    head = "| after block | " + " | ".join(f"`{shown(labels[t + 1])}`" for t in range(first, T - 1)) + " |"
    rows = [head, "| --- |" + " --- |" * (T - 1 - first)]
    for layer in range(layers):
        cells = [f"{shown(tok.decode([int(i)]))}{' ✓' if int(i) == ids[first + j + 1] else ''}"
                 for j, i in enumerate(top[layer])]
        rows.append(f"| {layer} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    with open(path_md, "w", encoding="utf-8") as f:
        f.write("What each layer would predict next (columns: the true next token; ✓ = the layer's top "
                "prediction is right).\n\n" + "\n".join(rows) + "\n")
    return saved, path_md


# ----------------------------------------------------------------------------- the views

def views_of(model, classifier):
    """{view: None if the model has it, else why not}, for the views of its kind of run."""
    arch = model.config.arch
    if classifier:
        return {"occlusion": None, "attention": None if arch == "gpt" else (
            f"attention maps are drawn along a decoder's causal path and this classifier's trunk is arch={arch}; "
            f"its occlusion view explains it")}
    if arch == "bert":
        why = "an encoder (arch=bert) predicts masked tokens from both sides, not the next token"
        return {view: why for view in LM_VIEWS}
    return {"surprisal": None, "attention": None if arch == "gpt" else f"arch={arch} has no attention",
            "logit_lens": None if arch in ("gpt", "cnn") else f"arch={arch} has no residual stream to read"}


def chosen_views(cfg, model, classifier):
    """The views to draw: those asked for (each one the model must have), else all it has."""
    have = views_of(model, classifier)
    for view in cfg.views.split(",") if cfg.views else []:
        if view not in have:
            raise ConfigError(f"views={view}: a {'classifier' if classifier else 'language model'} run has "
                              f"{', '.join(have)}")
        if have[view]:
            raise ConfigError(f"views={view}: {have[view]}")
    if cfg.views:
        return cfg.views.split(",")
    for view, why in have.items():
        if why:
            print(f"{view}: skipped ({why})")
    if all(have.values()):
        raise ConfigError(f"nothing to explain: {next(iter(have.values()))}")
    return [view for view, why in have.items() if why is None]


def explain_lm(model, tok, ids, views, folder):
    written = []
    labels = token_labels(tok, ids)
    if "surprisal" in views:
        bits = surprisal(model, ids) / math.log(2)  # (len(ids) - 1,)
        chars = len(tok.decode(ids[1:]))
        summary = (f"{bits.sum().item() / chars:.3f} bits per character over {chars} characters "
                   f"({len(bits)} tokens; mean {bits.mean().item():.2f} bits per token). Hover a token for its bits.")
        tips = [f"{shown(labels[t + 1])}: {b:.2f} bits" for t, b in enumerate(bits.tolist())]
        page = token_page("surprisal", summary, labels[1:], bits.tolist(), max(8.0, bits.max().item()), tips)
        write_text(os.path.join(folder, "surprisal.html"), page)
        written += [os.path.join(folder, "surprisal.html"), surprisal_strip(labels[1:], bits,
                                                                            os.path.join(folder, "surprisal.png"))]
        print(summary.split(". ")[0])
    window = ids[-model.config.block_size:]
    if len(window) < len(ids) and {"attention", "logit_lens"} & set(views):
        print(f"attention and logit lens: the text is longer than the context; they read its last "
              f"{len(window)} tokens")
    if "attention" in views:
        written.append(attention_grid(attention_maps(model, window), labels[-len(window):],
                                      os.path.join(folder, "attention.png")))
    if "logit_lens" in views:
        written += logit_lens_views(logit_lens(model, window), window, labels[-len(window):], tok,
                                    os.path.join(folder, "logit_lens.png"), os.path.join(folder, "logit_lens.md"))
    if model.config.arch == "cnn":
        written.append(receptive_field_table(model, os.path.join(folder, "receptive_field.md")))
    return written


def receptive_field_table(model, path):
    from cnn import dilations, receptive_fields
    rows = [f"| {i} | {d} | {f} |" for i, (d, f) in enumerate(zip(dilations(model.config),
                                                                    receptive_fields(model.config)))]
    write_text(path, f"Each conv layer of this arch=cnn model (conv_kernel={model.config.conv_kernel}): its "
                     f"dilation, and how many tokens (itself included) a position can read after it.\n\n"
                     "| layer | dilation | receptive field |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n")
    return path


def explain_classifier(model, tok, ids, labels, views, folder):
    ids = ids[-model.config.block_size:]  # a long text keeps its end, as training did ('last' pooling)
    probs, importance = occlusion(model, ids, occluder=tok.eot_id)
    predicted = labels[int(probs.argmax())]
    summary = f"predicted {predicted!r}; " + ", ".join(f"{lab}: {p:.3f}" for lab, p in zip(labels, probs.tolist()))
    names = token_labels(tok, ids)
    tips = [f"{shown(n)}: p({predicted}) moves by {-v:+.3f} without it" for n, v in zip(names, importance.tolist())]
    top = max(1e-6, importance.abs().max().item())
    write_text(os.path.join(folder, "occlusion.html"),
               token_page("occlusion", summary + ". Red: the token supported the decision; blue: it argued against.",
                          names, importance.tolist(), top, tips))
    print(summary)
    written = [os.path.join(folder, "occlusion.html")]
    if "attention" in views:
        written.append(attention_grid(attention_maps(model, ids, classifier=True), names,
                                      os.path.join(folder, "attention.png")))
    return written


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def claim_folder(out_dir, overwrite):
    """out_dir/explain, made empty for this run's files; an earlier result is kept unless overwrite."""
    folder = os.path.join(out_dir, "explain")
    if os.path.isdir(folder) and os.listdir(folder):
        if not overwrite:
            raise ConfigError(f"{folder} holds an earlier explanation; move it away, or set overwrite=True "
                              f"to replace it")
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    return folder


def main(argv=None):
    cfg = cli_config(argv)
    if not os.path.isdir(cfg.out_dir):
        raise ConfigError(f"out_dir={cfg.out_dir}: no such run folder; give a folder a train.py or finetune.py "
                          f"run wrote")
    text = read_text(cfg)
    compute = setup_compute(cfg)
    model, tok, loaded = load_for_inference(cfg, compute.device)
    ids = encode(tok, text)
    views = chosen_views(cfg, model, bool(loaded.labels))
    folder = claim_folder(cfg.out_dir, cfg.overwrite)
    with compute.autocast, torch.no_grad():
        if loaded.labels:
            written = explain_classifier(model, tok, ids, loaded.labels, views, folder)
        else:
            written = explain_lm(model, tok, ids, views, folder)
    print("wrote:\n" + "\n".join(f"  {w}" for w in written))
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
