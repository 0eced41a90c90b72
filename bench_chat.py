"""
How fast a chat model answers: time to the first piece of a reply and the pieces' rate, in the
terminal's code path (conversation.reply) and through chat.py --serve (the same reply as
server-sent events over HTTP), for the same messages. Then a transcript of each message.

    python bench_chat.py --out_dir=out/chat                  # a run fine-tuned with task=chat
    python bench_chat.py --out_dir=out/chat --repeats=5 --max_new_tokens=200
    python bench_chat.py --out_dir=out/chat --base=out/base --task_dir=data/shakespeare_chat

With --base (the run the chat model was fine-tuned from), also the loss on the assistant turns of
task_dir's val split before (the base, given rows for the turn markers as fine-tuning starts) and
after, and the base's replies beside the chat model's.

Decoding is greedy (temperature 0) so both paths write the same tokens. Prints a Markdown table;
run it on an otherwise idle machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

import torch
import torch.nn.functional as F

from checkpoint import load_for_inference
from config import load_config
from conversation import chat_examples, reply, with_turn_tokens
from examples import pad_batch

HERE = os.path.dirname(os.path.abspath(__file__))
MESSAGES = ["Who's there?", "What news from the court?", "12 plus 30"]


def timed(pieces):
    """(seconds to the first piece, pieces per second after it) of [(time, piece)] from t=0."""
    times = [t for t, piece in pieces if piece]
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    return times[0], rate


def in_process(model, tok, cfg, message):
    pieces, t0 = [], time.perf_counter()
    text = reply(model, tok, [{"role": "user", "content": message}], cfg,
                 lambda piece: pieces.append((time.perf_counter() - t0, piece)), 0.0)
    return timed(pieces), text


def over_http(url, message):
    body = json.dumps({"messages": [{"role": "user", "content": message}], "temperature": 0}).encode()
    pieces, t0 = [], time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url + "/chat", data=body, method="POST")) as response:
        for line in response:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if "text" in event:
                    pieces.append((time.perf_counter() - t0, event["text"]))
    return timed(pieces), "".join(p for _, p in pieces)


@torch.no_grad()
def assistant_turn_loss(model, tok, path, block_size):
    """Mean loss per scored token (the assistant turns) over a conversation file, as task=chat scores it."""
    examples = chat_examples(path, tok, load_config([], {"block_size": block_size}))
    total, count = 0.0, 0
    for i in range(0, len(examples), 32):
        x, y = pad_batch(examples[i:i + 32], tok.eot_id)
        logits = model(x)[0].float()
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum").item()
        count += int((y >= 0).sum())
    return total / count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=150)
    parser.add_argument("--base", default="", help="the run fine-tuned from: before/after loss and replies")
    parser.add_argument("--task_dir", default="data/shakespeare_chat")
    args = parser.parse_args()
    cfg = load_config([], {"out_dir": args.out_dir, "device": "cpu", "dtype": "float32",
                           "max_new_tokens": args.max_new_tokens, "top_k": 0})
    model, tok, _ = load_for_inference(cfg, torch.device("cpu"))
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "chat.py"), f"--out_dir={args.out_dir}", "--serve",
                               "--port=0", "--device=cpu", "--dtype=float32", f"--max_new_tokens={args.max_new_tokens}",
                               "--top_k=0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = server.stdout.readline().split(" at ")[1].split()[0]
        rows, transcript = {"terminal": [], "server": []}, []
        for message in MESSAGES:
            for _ in range(args.repeats):
                (first, rate), text = in_process(model, tok, cfg, message)
                rows["terminal"].append((first, rate, len(text)))
                (first, rate), served = over_http(url, message)
                rows["server"].append((first, rate, len(served)))
            transcript.append((message, text, served == text))
    finally:
        server.terminate()
    print(f"{len(MESSAGES)} messages x {args.repeats}, greedy, at most {args.max_new_tokens} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| path | time to first piece (ms), median | pieces/s, median | reply length (chars), median |")
    print("| --- | --- | --- | --- |")
    for path, values in rows.items():
        print(f"| {path} | {1e3 * statistics.median(v[0] for v in values):.1f} | "
              f"{statistics.median(v[1] for v in values):.0f} | {statistics.median(v[2] for v in values):.0f} |")
    print()
    for message, text, same in transcript:
        print(f"> {message}\n{text}\n(the server wrote {'the same' if same else 'another'} reply)\n")
    if args.base:
        base, _, _ = load_for_inference(load_config([], {"out_dir": args.base, "device": "cpu"}), torch.device("cpu"))
        base = with_turn_tokens(base, tok).eval()
        val = os.path.join(args.task_dir, "val.jsonl")
        before, after = (assistant_turn_loss(m, tok, val, model.config.block_size) for m in (base, model))
        print(f"loss on the assistant turns of {val}: base {before:.3f}, chat model {after:.3f}\n")
        for message in MESSAGES:
            text = reply(base, tok, [{"role": "user", "content": message}], cfg, lambda piece: None, 0.0)
            print(f"base > {message}\n{text}\n")


if __name__ == "__main__":
    main()
