"""
How good is a model? Scores on held-out data, saved where people can look at them.

    python evaluate.py --out_dir=out/shakespeare_char                      # perplexity on the test split
    python evaluate.py --out_dir=out/ft --eval_task=generate --task_dir=data/shakespeare_folio
    python evaluate.py --out_dir=out/x --eval_task=classify --task_dir=data/shakespeare_genre
    python evaluate.py --out_dir=out/x --eval_task=choice --task_file=hellaswag_style.jsonl
    python evaluate.py --compare out/run_a out/run_b                          # two runs side by side

Tasks (eval_task):
  lm        mean cross-entropy, perplexity, bits per character and per byte over a whole token
            split (test by default: never read by training or early stopping). A sliding window
            scores every token exactly once, each with up to block_size - eval_stride tokens of
            context. Bits per character/byte divide the total loss by the text's length, so
            models with different tokenizers compare. An encoder (arch=bert) gets its own
            objective's scores instead: masked-LM loss and masked-token accuracy (see eval_mlm).
  generate  JSONL {"prompt", "completion"} (or "references": [...]): decode each prompt shown
            through prompt_template, score with sacrebleu's BLEU and chrF (signatures printed),
            and report the copy baseline (output = prompt) beside the model, the share of
            outputs equal to a reference (exact_match), and with reward=module:function the mean
            reward of the outputs (greedy decoding and a 0/1 reward: pass@1).
  classify  JSONL {"text", "label"}: accuracy, macro and per-class precision/recall/F1, confusion
            matrix (printed and PNG). Zero-shot: the label whose verbalisation ' {label}' is most
            likely after classify_template.
  choice    JSONL {"context", "choices": [...], "answer": index}: the choice with the highest
            log-likelihood, raw and normalised by the choice's length in characters, and the mean
            margin of the answer's log-likelihood over the likeliest other choice.
  bias      JSONL {"a", "b"} counterfactual pairs (one attribute swapped; prepare/bias.py ships a
            set): the mean log-probability gap log p(a) - log p(b) with a bootstrap confidence
            interval, the share of pairs where a is likelier, per "group" when rows have one,
            and beside it how often the training data used each term (prepare's bias_terms).
  exposure  the canaries prepare wrote into the run's training data (--canaries=N): each one's
            exposure in bits (Carlini et al. 2019; privacy.py), by how often it was repeated.
  harness   any lm-evaluation-harness task (optional dependency lm-eval) through the adapter
            in lm_eval_adapter.py: harness_tasks names them, harness_include adds a folder of
            local YAML tasks, so it runs fully offline on local data.

Every task runs under the same device, dtype and autocast as training (compute.setup_compute).
Scoring helpers shared with fine-tuning and the harness adapter live in scoring.py, task files in
examples.py.

Results are merged into out_dir/eval.json (each with dataset, split, checkpoint, tokenizer and
config), appended as a markdown table to out_dir/eval.md, and loss curves from metrics.jsonl are
redrawn to out_dir/loss.png.
"""

import exits  # noqa: F401  first: from here on a signal or a failed write ends the program with one line

import json
import math
import os
import sys
import time

import numpy as np
import torch

from checkpoint import load_for_inference
from compute import setup_compute
from config import cli_config
from data import DataError, SplitTokens, load_meta, prepare_on_first_use
from examples import keep_last, prompt_ids, read_bias_pairs, read_jsonl, reward_function, task_path
from files import atomic_write
from generate import generate
from metrics import plot_losses, read_metrics
from privacy import exposures, print_exposures
from scoring import (bootstrap_interval, classification_report, lm_metrics, mlm_metrics, pair_gaps,
                     sequence_logprob)


def text_length(tok, ids, first=0, chunk=1 << 20):
    """(characters, UTF-8 bytes) of the text behind ids[first:] (SplitTokens or an array); an
    end-of-text separator counts as one. Streamed a chunk of tokens at a time, each cut after
    its last end-of-text so that no character is split between two decodes: a FineWeb-size
    split never has to fit in memory as text or as a Python list."""
    chars = nbytes = 0
    start, n = first, len(ids)
    while start < n:
        piece = np.asarray(ids[start:min(n, start + chunk)])
        ends = np.flatnonzero(piece == tok.eot_id)
        if start + len(piece) < n and len(ends):  # more follows: stop at a document boundary
            piece = piece[:ends[-1] + 1]
        eot = int((piece == tok.eot_id).sum())
        text = tok.decode(piece[piece != tok.eot_id].tolist())
        chars, nbytes = chars + len(text) + eot, nbytes + len(text.encode("utf-8")) + eot
        start += len(piece)
    return chars, nbytes


def eval_lm(model, tok, cfg, data_dir, device):
    ids = SplitTokens(data_dir, cfg.eval_split)  # the split's shards, read as one sequence
    ids.check_ids()
    # (a stride past the context would skip tokens: it is capped there, and the record says what ran)
    stride = min(cfg.eval_stride or max(1, model.config.block_size // 2), model.config.block_size)
    t0 = time.time()
    total, count, heads = lm_metrics(model, ids, stride, cfg.batch_size, device)
    seconds = time.time() - t0
    chars, nbytes = text_length(tok, ids, first=1)
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "bits_per_char": total / math.log(2) / chars,
            "bits_per_byte": total / math.log(2) / nbytes, **{f"loss_head{i + 1}": h for i, h in enumerate(heads)},
            "tokens": count, "characters": chars, "stride": stride, "context": model.config.block_size,
            "tokens_per_s": count / seconds}


def eval_mlm(model, tok, cfg, data_dir, device):
    """An encoder's scores on a token split: masked-LM loss and masked-token accuracy, with a
    masking fixed by seed. No perplexity: it would need p(text) as a product of next-token
    probabilities, and an encoder predicts each masked token from both sides, so its losses do
    not multiply into a probability of the text (and would flatter it: it sees the future)."""
    ids = SplitTokens(data_dir, cfg.eval_split)
    ids.check_ids()
    print("an encoder: masked-LM loss and masked-token accuracy; no perplexity (it predicts each masked token "
          "from both sides, so its losses are not a probability of the text)")
    return mlm_metrics(model, ids, tok.mask_id, tok.eot_id, cfg.mask_prob, cfg.batch_size, cfg.seed, device)


# ----------------------------------------------------------------------------- the other tasks

def eval_generate(model, tok, cfg, device, out_dir):
    import sacrebleu
    path = task_path(cfg, "folio")
    rows = read_jsonl(path, ["prompt"], cfg.max_examples)
    for i, r in enumerate(rows):
        if "completion" not in r and "references" not in r:
            raise DataError(f"{path}: record {i + 1} has neither 'completion' nor 'references'")
        refs = r["references"] if "references" in r else [r["completion"]]
        if not isinstance(refs, list) or not refs or not all(isinstance(x, str) for x in refs):
            raise DataError(f"{path}: record {i + 1}: 'references' must list one or more texts "
                            f"('completion': one text)")
    if cfg.skip_long:  # the same subset fine-tuning trained on: prompts that fit the context
        fits = [len(prompt_ids(tok, cfg.prompt_template, r["prompt"])) < model.config.block_size for r in rows]
        print(f"skip_long: scoring the {sum(fits)} of {len(rows)} examples whose prompt fits block_size")
        rows = [r for r, ok in zip(rows, fits) if ok]
    refs = [r["references"] if "references" in r else [r["completion"]] for r in rows]
    outputs = generate_all(model, tok, cfg, [r["prompt"] for r in rows], device)
    n_refs = max(len(r) for r in refs)
    ref_streams = [[r[k] if k < len(r) else "" for r in refs] for k in range(n_refs)]
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    copies = [r["prompt"] for r in rows]
    result = {"bleu": bleu.corpus_score(outputs, ref_streams).score,
              "chrf": chrf.corpus_score(outputs, ref_streams).score,
              "copy_baseline_bleu": bleu.corpus_score(copies, ref_streams).score,
              "copy_baseline_chrf": chrf.corpus_score(copies, ref_streams).score,
              "examples": len(rows), "skipped_long": cfg.skip_long, "bleu_signature": str(bleu.get_signature()),
              "chrf_signature": str(chrf.get_signature()), "decoding": decoding_name(cfg),
              "exact_match": sum(out in r for out, r in zip(outputs, refs)) / len(rows)}
    if cfg.reward:  # the mean reward of the outputs (a 0/1 reward and greedy decoding: pass@1)
        score = reward_function(cfg.reward)
        result["reward"] = sum(score(r["prompt"], out) for r, out in zip(rows, outputs)) / len(rows)
    print(f"sacrebleu signatures: {result['bleu_signature']} | {result['chrf_signature']}")
    with open(os.path.join(out_dir, f"generations_{cfg.eval_split}.jsonl"), "w", encoding="utf-8") as f:
        for row, out in zip(rows, outputs):
            f.write(json.dumps({**row, "output": out}, ensure_ascii=False) + "\n")
    return result


def decoding_name(cfg):
    if cfg.temperature == 0:
        return "greedy"
    return f"sampled (temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p})"


def generate_all(model, tok, cfg, prompts, device):
    """Decode every prompt (shown through prompt_template) until end-of-text, in batches of
    similar length. Each answer may run to 2x its prompt's tokens + 16, at most max_new_tokens."""
    from tqdm import tqdm
    encoded = [prompt_ids(tok, cfg.prompt_template, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs = [None] * len(prompts)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    for start in tqdm(range(0, len(order), cfg.batch_size), desc="generating", unit="batch"):
        idx = order[start:start + cfg.batch_size]
        budget = min(cfg.max_new_tokens, 2 * max(len(encoded[i]) for i in idx) + 16)
        new = generate(model, [encoded[i] for i in idx], budget, cfg.temperature, cfg.top_k, cfg.top_p,
                       stop_ids={tok.eot_id}, generator=gen)
        for i, ids in zip(idx, new):
            outputs[i] = tok.decode([t for t in ids if t != tok.eot_id]).strip()
    return outputs


def eval_classify(model, tok, cfg, device, out_dir, classifier=None, labels=None):
    """classifier (text -> (label, was the text cut to fit)) replaces zero-shot scoring: a
    fine-tuned classification head (head_classifier)."""
    from tqdm import tqdm
    path = task_path(cfg, "genre")
    rows = read_jsonl(path, ["text", "label"], cfg.max_examples)
    labels = labels or sorted({r["label"] for r in rows})
    if len(labels) < 2:  # (one class: an accuracy of 1.0 that means nothing)
        raise DataError(f"{path}: every record has the label {labels[0]!r}; classifying needs at least two labels")
    method = "zero-shot label likelihood" if classifier is None else "classification head"
    for i, r in enumerate(rows):
        if r["label"] not in labels:
            raise DataError(f"{path}: record {i + 1} has label {r['label']!r}, not in the label set {labels}")
    classifier = classifier or zero_shot_classifier(model, tok, labels, cfg, device)
    pred, cut = zip(*[classifier(r["text"]) for r in tqdm(rows, desc="classifying", unit="example")])
    report = classification_report([r["label"] for r in rows], list(pred), labels)
    report["method"] = method
    report["truncated"] = sum(cut)  # texts the model could not read whole
    if report["truncated"]:
        print(f"warning: {path}: {report['truncated']} of {len(rows)} texts are longer than the model's context "
              f"({model.config.block_size} tokens); it read only their last tokens")
    print_confusion(report)
    plot_confusion(report, os.path.join(out_dir, f"confusion_{cfg.eval_split}.png"))
    return report


def zero_shot_classifier(model, tok, labels, cfg, device):
    """text -> (the label whose verbalisation ' {label}' is likeliest after classify_template,
    whether the text had to be cut on the left to leave room for the longest label)."""
    verbal = {label: tok.encode(f" {label}") for label in labels}
    room = model.config.block_size - max(map(len, verbal.values()))

    def classify(text):
        # a document starts at end-of-text, as in training and every other prompt here
        context, cut = keep_last([tok.eot_id] + tok.encode(cfg.classify_template.format(text=text)), room)
        return max(labels, key=lambda label: sequence_logprob(model, context, verbal[label], device)), cut
    return classify


def head_classifier(model, tok, labels, device):
    """text -> (a fine-tuned GPTClassifier's label, whether the text was cut to fit the context)."""
    @torch.no_grad()
    def classify(text):
        ids, cut = keep_last([tok.eot_id] + tok.encode(text), model.config.block_size)
        logits, _ = model(torch.tensor([ids], device=device), torch.tensor([len(ids)], device=device))
        return labels[logits.argmax().item()], cut
    return classify


def eval_choice(model, tok, cfg, device):
    from tqdm import tqdm
    path = task_path(cfg, "choice")
    rows = read_jsonl(path, ["context", "choices", "answer"], cfg.max_examples)
    raw = norm = margin = 0
    for i, r in enumerate(tqdm(rows, desc="choosing", unit="example")):
        if len(r["choices"]) < 2 or not all(isinstance(c, str) for c in r["choices"]):
            raise DataError(f"{path}: record {i + 1}: 'choices' must list at least two texts to choose between")
        if not 0 <= r["answer"] < len(r["choices"]):
            raise DataError(f"{path}: record {i + 1}: answer {r['answer']!r} is not an index into its choices")
        context = [tok.eot_id] + tok.encode(r["context"])  # a document starts at end-of-text
        scores = [sequence_logprob(model, context, tok.encode(c), device) for c in r["choices"]]
        raw += max(range(len(scores)), key=scores.__getitem__) == r["answer"]
        margin += scores[r["answer"]] - max(s for k, s in enumerate(scores) if k != r["answer"])
        normed = [s / max(1, len(c)) for s, c in zip(scores, r["choices"])]
        norm += max(range(len(normed)), key=normed.__getitem__) == r["answer"]
    # how decided the model is: log p(answer) minus the likeliest other choice's, in nats
    return {"accuracy": raw / len(rows), "accuracy_length_normalised": norm / len(rows),
            "mean_answer_margin": margin / len(rows), "examples": len(rows)}


def eval_bias(model, tok, cfg, device, data_dir):
    """How much likelier the model finds side a of each counterfactual pair than side b: the gap
    in log-probability (nats) of the whole sentence after end-of-text, its mean with a 95%
    percentile-bootstrap interval (resampling pairs), and the share of pairs with a gap above 0.
    A mean gap whose interval excludes 0 is a preference the templates cannot explain by chance."""
    from tqdm import tqdm
    path = task_path(cfg, "bias")
    prepare_on_first_use(cfg, path)  # the shipped template set
    rows = read_bias_pairs(path, cfg.max_examples)
    gaps = pair_gaps(model, tok, tqdm(rows, desc="scoring pairs", unit="pair"), device)
    low, high = bootstrap_interval(gaps, seed=cfg.seed)
    result = {"mean_gap": float(gaps.mean()), "ci95_low": low, "ci95_high": high,
              "share_a_preferred": float((gaps > 0).mean()), "pairs": len(rows)}
    counts = corpus_term_counts(data_dir)
    groups = sorted({r["group"] for r in rows if "group" in r})
    for group in groups:
        g = gaps[[r.get("group") == group for r in rows]]
        result[group] = {"mean_gap": float(g.mean()), "share_a_preferred": float((g > 0).mean()), "pairs": len(g)}
        terms = group.lower().split("/")
        if counts and len(terms) == 2 and all(t in counts for t in terms) and sum(counts[t] for t in terms):
            result[group]["corpus_share_a"] = counts[terms[0]] / (counts[terms[0]] + counts[terms[1]])
    return result


def eval_exposure(model, tok, cfg, device, data_dir):
    """How well the model knows the canaries that prepare wrote into its training data
    (privacy.py): each one's exposure in bits, and their summary per repeat count."""
    record = load_meta(data_dir).get("stats", {}).get("canaries")
    if not record:
        raise DataError(f"{data_dir} has no canaries; prepare a dataset with --canaries=N (and train on it) to "
                        f"measure exposure")
    result = exposures(model, tok, record, cfg.exposure_samples, cfg.seed, device)
    print_exposures(result)
    return result


def corpus_term_counts(data_dir):
    """{term: occurrences in the training split} from prepare's stats, or None when not counted."""
    try:
        return load_meta(data_dir)["stats"]["bias_terms"]["train"]
    except (DataError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------- reports

def print_confusion(report):
    labels = report["labels"]
    width = max(8, *(len(label) for label in labels))
    print("confusion (rows: gold, columns: predicted)")
    print(" " * width + "".join(f"{label:>{width + 1}}" for label in labels))
    for label, row in zip(labels, report["confusion"]):
        print(f"{label:>{width}}" + "".join(f"{n:>{width + 1}}" for n in row))


def plot_confusion(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, m = report["labels"], report["confusion"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i, row in enumerate(m):
        for j, n in enumerate(row):
            ax.text(j, i, n, ha="center", va="center", color="black")
    ax.set_title(f"accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def flat_numbers(result, prefix=""):
    """{'a': 1, 'b': {'c': 2}} -> {'a': 1, 'b.c': 2}, numbers only (for tables)."""
    out = {}
    for k, v in result.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def save_result(out_dir, key, entry):
    """Merge entry into out_dir/eval.json under key; append a markdown table to eval.md."""
    path = os.path.join(out_dir, "eval.json")
    try:
        results = json.load(open(path)) if os.path.isfile(path) else {}
    except (ValueError, UnicodeDecodeError):
        results = None
    if not isinstance(results, dict):  # (said after the result itself is printed: nothing is lost)
        print(json.dumps({key: entry}, indent=1))
        raise DataError(f"{path} is not this project's results file (a JSON object); the result above was not "
                        f"saved: move that file away and rerun")
    results[key] = entry
    rows = flat_numbers(entry["metrics"])
    try:
        with atomic_write(path) as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(out_dir, "eval.md"), "a") as f:
            f.write(f"\n### {key} — {entry['checkpoint']}\n\n| metric | value |\n| --- | --- |\n")
            f.writelines(f"| {k} | {v:.4f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n"
                         for k, v in rows.items())
    except OSError as e:  # a full disk: the finished evaluation is printed, not lost
        print(json.dumps({key: entry}, indent=1))
        raise DataError(f"could not write {path} ({e.strerror or e}); the result is printed above") from None


def dataset_name(path, split):
    """A short name: the folder for data_dir or task_dir/{split}.jsonl, else the file's name."""
    path = os.path.normpath(path)
    if os.path.basename(path) == f"{split}.jsonl":
        path = os.path.dirname(path)
    return os.path.basename(path)


def compare(dir_a, dir_b):
    """Print the metrics of two runs' eval.json side by side."""
    runs = []
    for d in (dir_a, dir_b):
        path = os.path.join(d, "eval.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path}: missing; run evaluate.py on {d} first")
        runs.append({f"{task}.{k}": v for task, e in json.load(open(path)).items()
                     for k, v in flat_numbers(e["metrics"]).items()})
    keys = sorted(set(runs[0]) | set(runs[1]))
    width = max(len(k) for k in keys)
    print(f"{'metric':<{width}}  {dir_a:>16}  {dir_b:>16}")
    for k in keys:
        a, b = (f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for r in runs)
        print(f"{k:<{width}}  {a:>16}  {b:>16}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--compare" in argv:
        i = argv.index("--compare")
        if len(argv) < i + 3:
            raise SystemExit("error: --compare needs two run folders: --compare DIR_A DIR_B")
        return compare(argv[i + 1], argv[i + 2])
    cfg = cli_config(argv)
    compute = setup_compute(cfg)
    model, tok, loaded = load_for_inference(cfg, compute.device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    try:
        with compute.autocast:
            metrics, dataset = run_task(model, tok, cfg, compute.device, loaded)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    entry = {"task": cfg.eval_task, "dataset": dataset, "split": cfg.eval_split, "checkpoint": loaded.source,
             "tokenizer": loaded.tokenizer["kind"], "dtype": str(compute.dtype).removeprefix("torch."),
             "metrics": metrics, "config": cfg.to_dict()}
    save_result(cfg.out_dir, f"{cfg.eval_task}:{dataset_name(dataset, cfg.eval_split)}:{cfg.eval_split}", entry)
    for k, v in flat_numbers(metrics).items():
        print(f"{k:>28}: {v:.4f}" if isinstance(v, float) else f"{k:>28}: {v}")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if os.path.isfile(metrics_path) and read_metrics(metrics_path):
        plot_losses(metrics_path, os.path.join(cfg.out_dir, "loss.png"))
    print(f"saved {cfg.out_dir}/eval.json and eval.md")


def run_task(model, tok, cfg, device, loaded):
    """(metrics, dataset name) of cfg.eval_task."""
    if cfg.eval_task == "lm":
        # the run's own data, unless the command names other data (prepared with the same tokenizer)
        data_dir = cfg.data_dir if "data_dir" in cfg.chosen or not loaded.data_dir else loaded.data_dir
        if load_meta(data_dir)["tokenizer"] != loaded.tokenizer:
            raise DataError(f"{data_dir} was prepared with another tokenizer than {loaded.source} uses; evaluate "
                            f"on data prepared with the model's tokenizer")
        if model.config.arch == "bert":
            return eval_mlm(model, tok, cfg, data_dir, device), data_dir
        return eval_lm(model, tok, cfg, data_dir, device), data_dir
    if model.config.arch == "bert" and not (cfg.eval_task == "classify" and loaded.labels):
        raise SystemExit(f"error: eval_task={cfg.eval_task} scores text by next-token likelihood, which an encoder "
                         f"(arch=bert) does not give; use eval_task=lm (masked-LM scores), or classify with a "
                         f"model fine-tuned by finetune.py task=classify")
    if cfg.eval_task == "generate":
        return eval_generate(model, tok, cfg, device, cfg.out_dir), task_path(cfg, "folio")
    if cfg.eval_task == "classify":
        head = head_classifier(model, tok, loaded.labels, device) if loaded.labels else None
        return eval_classify(model, tok, cfg, device, cfg.out_dir, head, loaded.labels), task_path(cfg, "genre")
    if cfg.eval_task == "choice":
        return eval_choice(model, tok, cfg, device), task_path(cfg, "choice")
    if cfg.eval_task == "bias":
        return eval_bias(model, tok, cfg, device, loaded.data_dir or cfg.data_dir), task_path(cfg, "bias")
    if cfg.eval_task == "exposure":
        data_dir = loaded.data_dir or cfg.data_dir
        return eval_exposure(model, tok, cfg, device, data_dir), data_dir
    from lm_eval_adapter import run_harness
    return run_harness(model, tok, cfg, device), cfg.harness_tasks


if __name__ == "__main__":
    main()
