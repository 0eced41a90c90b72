"""
How fast a chat model answers: time to the first piece of a reply and the pieces' rate, in the
terminal's code path (conversation.reply) and through chat.py --serve (the same reply as
server-sent events over HTTP), for the same messages. Then a transcript of each message.

    python bench_chat.py --out_dir=out/chat                  # a run fine-tuned with task=chat
    python bench_chat.py --out_dir=out/chat --repeats=5 --max_new_tokens=200

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

from checkpoint import load_for_inference
from config import load_config
from conversation import reply

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=150)
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


if __name__ == "__main__":
    main()
