"""
chat.py --serve: the same conversation in a browser page, served on 127.0.0.1 (--host, --port).

    python chat.py --out_dir=out/chat --serve            # then open http://127.0.0.1:8000

The server is the standard library's ThreadingHTTPServer: one page and one streaming endpoint
need no framework, and nothing to install is the easiest thing for a learner to read. Each
connection gets a thread; one lock lets the model answer one request at a time, so several tabs
take turns (each waits for the reply before it). The page (chat.html, plain HTML and JavaScript)
keeps its own conversation and sends all of it with each message:

    GET  /        the page
    POST /chat    {"messages": [{"role", "content"}, ...], "temperature": 0.8 (optional)}
                  -> text/event-stream, one `data: {...}` line per event as the reply grows:
                     {"note": "..."} (oldest turns dropped), {"text": "..."} (the reply's next
                     piece), then {"done": true}

The page's stop button closes the request; the server notices when it next writes, and the model
is free for the next one. A request that cannot be answered gets a 4xx with a one-line reason: a
body that is not JSON or too large, no messages, a role that is not system, user or assistant,
a last message that is not the user's or is empty, a message alone longer than the context.
The server writes no file.
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from conversation import ROLES, prompt_limit, reply, within_context
from errors import ConfigError

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")
MAX_BODY = 1 << 20


class BadRequest(ValueError):
    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


def parse_request(body, tok, limit):
    """(messages, temperature or None) of a POST /chat body; BadRequest says what is wrong."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "the body is not JSON") from None
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, 'give {"messages": [{"role": "user", "content": "..."}]}')
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRequest(400, f"each message needs a role ({', '.join(ROLES)}) and a text content")
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise BadRequest(400, "the last message must be the user's, and not empty")
    length = len(tok.encode(messages[-1]["content"]))
    if length > limit:
        raise BadRequest(413, f"the message is {length} tokens; this model reads at most {limit} at once")
    temperature = request.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
        raise BadRequest(400, "temperature must be a number >= 0")
    return messages, temperature


def make_handler(model, tok, cfg, autocast):
    lock = threading.Lock()
    limit = prompt_limit(model)
    with open(PAGE, "rb") as f:
        page = f.read()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path.split("?")[0] not in ("/", "/index.html"):
                return self.refuse(404, "no such page: the chat is at /")
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def do_POST(self):
            if self.path != "/chat":
                return self.refuse(404, "POST to /chat")
            size = int(self.headers.get("Content-Length") or 0)
            if size > MAX_BODY:
                if size <= 8 * MAX_BODY:  # read it first, so the client sees the answer, not a reset
                    self.rfile.read(size)
                self.close_connection = True
                return self.refuse(413, f"the body is {size:,} bytes; at most {MAX_BODY:,}")
            try:
                messages, temperature = parse_request(self.rfile.read(size), tok, limit)
            except BadRequest as e:
                return self.refuse(e.status, str(e))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream ends with the reply
            self.end_headers()
            self.close_connection = True
            try:
                with lock, autocast:
                    messages, dropped = within_context(tok, messages, limit)
                    if dropped:
                        self.send_event({"note": f"the oldest {dropped} exchange(s) no longer fit the context"})
                    reply(model, tok, messages, cfg, lambda text: text and self.send_event({"text": text}),
                          cfg.temperature if temperature is None else temperature)
                self.send_event({"done": True})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the page stopped the reply or went away: the model is free again

        def send_event(self, event):
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()

        def refuse(self, status, reason):
            body = json.dumps({"error": reason}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # one short line per request, on stderr
            print(f"{self.address_string()} {format % args}", file=sys.stderr, flush=True)
    return Handler


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    # connections waiting to be accepted: socketserver's default of 5 reset some of 20 tabs
    # opened at once (seen in CI); each accepted one gets its thread at once, so this is a burst
    request_queue_size = 128


def serve(model, tok, cfg, autocast):
    try:
        server = ChatServer((cfg.host, cfg.port), make_handler(model, tok, cfg, autocast))
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise ConfigError(f"--host={cfg.host} --port={cfg.port}: cannot listen there ({e.strerror or e}); choose "
                          f"another port (--port=0 takes any free one)") from None
    host, port = server.server_address[:2]
    print(f"chat with {cfg.out_dir} at http://{host}:{port} (Ctrl-C ends)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
