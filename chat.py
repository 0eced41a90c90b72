"""
Talk to a model fine-tuned for conversation (finetune.py --task=chat), in the terminal.

    python chat.py --out_dir=out/chat                                  # a conversation
    python chat.py --out_dir=out/chat --prompt="Who's there?"          # one reply, then exit
    echo "Who's there?" | python chat.py --out_dir=out/chat           # the same, from a pipe
    python chat.py --out_dir=out/chat --system="Hamlet, act 1, scene 1" --temperature=0.5
    python chat.py --out_dir=out/chat --serve                         # a web page (chat_web.py)

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
from conversation import TEMPLATE, prompt_limit, reply, within_context
from errors import CheckpointError, ConfigError

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


def session(model, tok, cfg, lines, write):
    """A conversation over input lines (an iterator; StopIteration or EOFError ends it)."""
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages, temperature = list(system), cfg.temperature
    limit = prompt_limit(model)
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
    if cfg.serve:
        from chat_web import serve
        return serve(model, tok, cfg, compute.autocast)
    with compute.autocast:
        if cfg.prompt or not sys.stdin.isatty():  # one message, one reply
            message = cfg.prompt or sys.stdin.read().strip()
            if not message.strip():
                raise ConfigError("the message is empty: give one with --prompt=TEXT or on stdin")
            messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
                [{"role": "user", "content": message}]
            reply(model, tok, within_context(tok, messages, prompt_limit(model))[0], cfg, write,
                  cfg.temperature)
            print()
            return
        print(f"chatting with {cfg.out_dir} ({HELP})")
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops a reply, not the session
        session(model, tok, cfg, terminal_lines(), write)
        print()


if __name__ == "__main__":
    main()
