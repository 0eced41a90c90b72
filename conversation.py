"""
Conversations: the one chat format that finetune.py task=chat trains on, chat.py talks in and
prepare/chat.py writes.

A row is {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]} (JSONL),
the shape most chat datasets use. One template renders it into tokens:

    <|endoftext|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

The four turn markers are ids every tokenizer reserves after its text vocabulary and mask token
(tokenizer.TURN_TOKENS): text never encodes to them, so a message cannot forge a turn. A base
model has no embeddings for them: with_turn_tokens() grows its tables by those rows, each at
the mean of the existing embeddings (plus a little noise, so the four differ even where the
embeddings stay frozen, as under LoRA). The checkpoint records the template (TEMPLATE), which
chat.py checks before it talks.

Training scores the assistant turns only: their text and the <|end|> that closes them, so the
model learns what to say and when to stop; everything else is context. A conversation longer
than the context loses its oldest turns (the system message stays) until it fits, never half a
turn; one whose last exchange alone does not fit is skipped. Both are counted and reported.
"""

import dataclasses

import torch

from checkpoint import build_model
from data import DataError
from examples import read_jsonl
from generate import generate

TEMPLATE = "turn-markers-v1"
ROLES = ("system", "user", "assistant")


def check_messages(messages, where):
    """A DataError naming `where` unless messages is a conversation to learn from: objects with a
    known role and text content, ending on an assistant turn."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with a text 'content'")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} has role {m.get('role')!r}; a role is one of {', '.join(ROLES)}")
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation ends on a {messages[-1]['role'] if messages else 'missing'} "
                        f"turn; it must end on an assistant turn (the reply to learn)")


def turn(tok, role, text):
    """<|role|> text <|end|> as ids."""
    markers = tok.turn_ids
    return [markers[f"<|{role}|>"]] + tok.encode(text) + [markers["<|end|>"]]


def render(tok, messages):
    """(ids, scored) of a whole conversation: scored[i] is True where ids[i] is a target to learn
    (an assistant turn's text and its <|end|>, not its opening marker)."""
    ids, scored = [tok.eot_id], [False]
    for m in messages:
        t = turn(tok, m["role"], m["content"])
        ids += t
        scored += [False] + [m["role"] == "assistant"] * (len(t) - 1)
    return ids, scored


def prompt_ids(tok, messages):
    """The conversation so far, then <|assistant|>: what the model continues with its reply."""
    return render(tok, messages)[0] + [tok.turn_ids["<|assistant|>"]]


def without_oldest_turns(messages, fits, keep_last=False):
    """The turns from the earliest user turn on (or the first turn) that fits(turns) accepts, the
    system message kept: (turns, how many were dropped). When none fits: (None, all of them), or
    with keep_last the last turn alone."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    for start, m in enumerate(rest):
        if (start == 0 or m["role"] == "user") and fits(system + rest[start:]):
            return system + rest[start:], start
    return (system + rest[-1:], len(rest) - 1) if keep_last else (None, len(rest))


def fitting(tok, messages, limit):
    """The conversation with its oldest non-system turns dropped until it renders to at most
    `limit` tokens: (messages, turns dropped), or (None, _) when even the last exchange is too long."""
    return without_oldest_turns(messages, lambda kept: len(render(tok, kept)[0]) <= limit and
                                any(m["role"] == "assistant" for m in kept))


def chat_examples(path, tok, cfg):
    """[(x, y)] per conversation of a task file: x the rendered conversation, y its next-token
    targets, -1 except on the assistant turns."""
    rows = read_jsonl(path, ["messages"], cfg.max_examples)
    examples, shortened, skipped = [], 0, 0
    for i, row in enumerate(rows, 1):
        check_messages(row["messages"], f"{path}: record {i}")
        messages, dropped = fitting(tok, row["messages"], cfg.block_size + 1)
        if messages is None:
            skipped += 1
            continue
        shortened += dropped > 0
        ids, scored = render(tok, messages)
        examples.append((ids[:-1], [t if s else -1 for t, s in zip(ids[1:], scored[1:])]))
    if shortened or skipped:
        print(f"warning: {path}: {shortened} of {len(rows)} conversations lost their oldest turns to fit block_size="
              f"{cfg.block_size}, {skipped} skipped (their last exchange alone is longer)")
    if not examples:
        raise DataError(f"{path}: no conversation fits block_size={cfg.block_size}")
    return examples


def with_turn_tokens(model, tok):
    """The model with embedding rows for the turn markers (a new model when its table must
    grow; the model itself when it has them): each new row of every vocabulary-sized table (the
    token embedding, an untied head) starts at the mean of the table's rows, plus noise of a
    tenth of their spread."""
    old, new = model.config.vocab_size, max(tok.turn_ids.values()) + 1
    if new <= old:
        return model
    grown = build_model(dataclasses.replace(model.config, vocab_size=new))
    state = grown.state_dict()
    generator = torch.Generator().manual_seed(0)
    for name, weight in model.state_dict().items():
        if not name.endswith(("wte.weight", "lm_head.weight")):  # (the tables with a row per token)
            state[name] = weight
            continue
        rows = weight[:old].float()
        noise = torch.randn((new - old, *weight.shape[1:]), generator=generator) * rows.std(0) / 10
        table = state[name].clone()
        table[:old] = weight[:old]
        table[old:new] = (rows.mean(0) + noise).to(weight.dtype)
        state[name] = table
    grown.load_state_dict(state)
    return grown


# ----------------------------------------------------------------------------- replying (chat.py, chat_web.py)

def prompt_limit(model):
    """The most tokens a conversation may take as a prompt: the context, less a quarter kept for the reply."""
    return model.config.block_size - model.config.block_size // 4


def within_context(tok, messages, limit):
    """(messages, exchanges dropped): the oldest user/assistant exchanges dropped (the system
    message kept) until the prompt is at most `limit` tokens or only the last message is left."""
    kept, dropped = without_oldest_turns(messages, lambda kept: len(prompt_ids(tok, kept)) <= limit, keep_last=True)
    return kept, dropped // 2  # (the turns alternate, from a user turn: two to an exchange)


class Streamer:
    """generate()'s should_stop callback that writes the reply's new text as tokens arrive (a
    character cut between tokens waits for its rest). Any turn marker or end-of-text ends the
    reply (<|end|> is the one a chat model learns); a mask token is not shown."""

    def __init__(self, tok, write):
        self.tok, self.write, self.shown = tok, write, ""
        self.stops = {tok.eot_id, *tok.turn_ids.values()}
        self.hidden = self.stops | {tok.mask_id}

    def text(self, ids):
        return self.tok.decode([i for i in ids if i not in self.hidden])

    def __call__(self, ids):
        text = self.text(ids)
        if not text.endswith("\ufffd"):
            new, self.shown = text[len(self.shown):], text
            self.write(new)
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
