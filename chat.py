"""
Talk to a model fine-tuned for conversation (finetune.py --task=chat), in the terminal.

    python chat.py --out_dir=out/chat                                  # a conversation
    python chat.py --out_dir=out/chat --prompt="Who's there?"          # one reply, then exit
    echo "Who's there?" | python chat.py --out_dir=out/chat           # the same, from a pipe
    python chat.py --out_dir=out/chat --system="Hamlet, act 1, scene 1" --temperature=0.5

The reply streams as it is generated, rendered and ended the way the model was trained
(conversation.py's template: the reply ends at its <|end|> marker). In a conversation:
  /reset            forget the conversation (the system message stays)
  /system TEXT      a new system message, and a fresh conversation
  /temperature X    sample at temperature X from now on (0: always the likeliest token)
  Ctrl-C            stop the reply being written; the conversation goes on
  Ctrl-D, /quit     end the session
The whole conversation is the model's prompt. When it no longer fits the context (block_size,
less a quarter kept for the reply), the oldest exchanges are dropped first, never the system
message, and a line says so.
"""

import exits  # noqa: F401  first: from here on a signal or a failed write ends the program with one line

import signal
import sys

import torch

from checkpoint import load_for_inference
from compute import setup_compute
from config import cli_config
from conversation import TEMPLATE, prompt_ids
from errors import CheckpointError, ConfigError
from generate import generate

HELP = "/reset, /system TEXT, /temperature X, /quit (Ctrl-C stops a reply, Ctrl-D ends)"


def load_chat_model(cfg, device):
    """(model, tokenizer) of out_dir's checkpoint, which must have been fine-tuned with task=chat."""
    model, tok, loaded = load_for_inference(cfg, device)
    template = ((loaded.checkpoint or {}).get("finetune") or {}).get("chat_template")
    if template != TEMPLATE:
        raise CheckpointError(f"{loaded.source} was not fine-tuned for conversation (it has no turn markers): "
                              f"fine-tune it first, e.g. python finetune.py --task=chat --init_from={cfg.out_dir} "
                              f"--out_dir=out/chat, or sample from it with sample.py")
    return model, tok


def within_context(tok, messages, limit):
    """(messages, exchanges dropped): the oldest user/assistant exchanges dropped (the system
    message kept) until the prompt is at most `limit` tokens or only the last message is left."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest, dropped = messages[len(system):], 0
    while len(rest) > 1 and len(prompt_ids(tok, system + rest)) > limit:
        rest, dropped = rest[2:], dropped + 1
    return system + rest, dropped


class Streamer:
    """generate()'s should_stop callback that writes the reply's new text as tokens arrive (a
    character cut between tokens waits for its rest)."""

    def __init__(self, tok, write):
        self.tok, self.write, self.shown = tok, write, ""
        self.stops = {tok.eot_id, tok.turn_ids["<|end|>"]}

    def text(self, ids):
        return self.tok.decode([i for i in ids if i not in self.stops])

    def __call__(self, ids):
        text = self.text(ids)
        if not text.endswith("\ufffd"):
            self.write(text[len(self.shown):])
            self.shown = text
        return False


def reply(model, tok, messages, cfg, write, temperature):
    """The assistant's reply to messages (streamed through write); Ctrl-C ends it early and
    keeps what was written."""
    streamer = Streamer(tok, write)
    ids = prompt_ids(tok, messages)
    try:
        with torch.no_grad():
            new = generate(model, [ids], cfg.max_new_tokens, temperature, cfg.top_k, cfg.top_p,
                           stop_ids=tuple(streamer.stops), should_stop=streamer)[0]
        text = streamer.text(new)
        write(text[len(streamer.shown):])
        return text
    except KeyboardInterrupt:
        write(" [stopped]")
        return streamer.shown


def session(model, tok, cfg, lines, write):
    """A conversation over input lines (an iterator; StopIteration or EOFError ends it)."""
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages, temperature = list(system), cfg.temperature
    limit = model.config.block_size - model.config.block_size // 4
    while True:
        write("\n> ")
        try:
            line = next(lines).strip()
        except (StopIteration, EOFError):
            return
        except KeyboardInterrupt:  # at the prompt: nothing to stop, ask again
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset" or line.startswith("/system"):
            if line.startswith("/system"):
                system = [{"role": "system", "content": line[len("/system"):].strip()}]
            messages = list(system)
            write("(a new conversation)")
            continue
        if line.startswith("/temperature"):
            try:
                temperature = max(0.0, float(line.split()[1]))
                write(f"(temperature {temperature})")
            except (IndexError, ValueError):
                write("(give a number: /temperature 0.8)")
            continue
        if line.startswith("/") or not line:
            write(f"({HELP})")
            continue
        messages, dropped = within_context(tok, messages + [{"role": "user", "content": line}], limit)
        if dropped:
            write(f"(the oldest {dropped} exchange(s) no longer fit the context and were dropped)\n")
        messages.append({"role": "assistant", "content": reply(model, tok, messages, cfg, write, temperature)})


def terminal_lines():
    while True:
        yield input()


def main():
    cfg = cli_config()
    compute = setup_compute(cfg)
    model, tok = load_chat_model(cfg, compute.device)
    torch.manual_seed(cfg.seed)

    def write(text):
        print(text, end="", flush=True)
    with compute.autocast:
        if cfg.prompt or not sys.stdin.isatty():  # one message, one reply
            message = cfg.prompt or sys.stdin.read().strip()
            if not message.strip():
                raise ConfigError("the message is empty: give one with --prompt=TEXT or on stdin")
            messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
                [{"role": "user", "content": message}]
            reply(model, tok, within_context(tok, messages, model.config.block_size * 3 // 4)[0], cfg, write,
                  cfg.temperature)
            print()
            return
        print(f"chatting with {cfg.out_dir} ({HELP})")
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops a reply, not the session
        session(model, tok, cfg, terminal_lines(), write)
        print()


if __name__ == "__main__":
    main()
