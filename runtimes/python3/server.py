#!/usr/bin/env python3
"""The python3 function runtime: one process serves one function on a loopback port.

The gateway's local driver starts it as a child process, reads one JSON line from its
stdout to learn the port, then speaks the Dispatch pod contract (DESIGN.md section 3):
POST / with {"context": {...}, "payload": <input>} calls `handle(ctx, payload)` and answers
{"context": {"logs": {"stdout": [..], "stderr": [..]}, "error": null | {..}}, "payload": <output>}.
What the handler prints during a call is captured into that call's logs, even when calls
run concurrently. Standard library only. See runtimes/README.md for the whole contract.

    python3 server.py --dir DIR --handler hello.handle [--host 127.0.0.1] [--port 0]
                      [--max-log-bytes 1048576] [--check]
"""
import argparse
import contextvars
import importlib.util
import io
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

EXIT_NOT_LOADABLE = 3  # the handler cannot be loaded: the function is broken, not the runtime
EXIT_CANNOT_LISTEN = 4  # the host/port cannot be bound: retrying elsewhere may help

# The real streams, saved before sys.stdout/sys.stderr are replaced. The real stdout carries
# only this runtime's JSON lines (the gateway reads the first one), so nothing else writes it.
PROTOCOL_OUT = sys.stdout
REAL_ERR = sys.stderr


def to_json(value, **options):
    """Compact JSON, ASCII-escaped so any string the handler returns encodes as UTF-8."""
    return json.dumps(value, separators=(",", ":"), **options)


class CallLogs:
    """The stdout/stderr lines of one call, capped at max_bytes in total.

    Writes arrive in arbitrary pieces (print writes the text and the newline separately), so
    each stream keeps its unfinished line until a newline or the end of the call. Once the
    cap is reached the rest is dropped, so a handler printing megabytes costs no memory.
    """

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self.used = 0
        self.cut_in = None  # the stream that overflowed, once it has
        self.lines = {"stdout": [], "stderr": []}
        self.partial = {"stdout": [], "stderr": []}  # pieces of the unfinished line
        self.lock = threading.Lock()  # threads run inside the call's context may write too

    def write(self, stream, text):
        with self.lock:
            if self.cut_in is not None:
                return
            size = len(text) if text.isascii() else len(text.encode("utf-8", "replace"))
            if self.used + size > self.max_bytes:
                size = self.max_bytes - self.used
                text = text.encode("utf-8", "replace")[:size].decode("utf-8", "ignore")
                self.cut_in = stream
            self.used += size
            *done, rest = text.split("\n")
            pieces = self.partial[stream]
            if done:  # the pieces end their line; joined only then, so many small writes are cheap
                done[0] = "".join(pieces) + done[0]
                pieces.clear()
                self.lines[stream].extend(line.rstrip("\r") for line in done)
            if rest:
                pieces.append(rest)

    def finish(self):
        """The logs as the pod contract wants them: unfinished lines kept, the cut noted."""
        with self.lock:
            for stream, pieces in self.partial.items():
                if pieces:
                    self.lines[stream].append("".join(pieces).rstrip("\r"))
                    pieces.clear()
            if self.cut_in is not None:
                self.lines[self.cut_in].append(f"[dispatch: logs cut at {self.max_bytes} bytes]")
                self.cut_in = "reported"  # keeps dropping late writes, reports the cut once
            return self.lines


# The logs of the call running in this thread (each request has its own thread), or None.
current_call = contextvars.ContextVar("current_call", default=None)


class RoutedStream(io.TextIOBase):
    """Stands in for sys.stdout or sys.stderr: text goes to the current call's logs.

    Outside a call (while importing the handler, from threads the handler started) text goes
    to the real stderr, never to stdout, which carries only the runtime's JSON lines.
    """

    def __init__(self, name):
        self.name = name

    def write(self, text):
        logs = current_call.get()
        if logs is None:
            REAL_ERR.write(text)
        else:
            logs.write(self.name, text)
        return len(text)

    def flush(self):
        if current_call.get() is None:
            REAL_ERR.flush()

    def writable(self):
        return True

    def fileno(self):
        return REAL_ERR.fileno()

    @property
    def encoding(self):
        return "utf-8"


def load_handler(directory, handler):
    """Imports DIR/<file>.py and returns (function, None), or (None, reason) when it cannot."""
    module_name, dot, func_name = handler.rpartition(".")
    if not dot or not module_name or not func_name:
        return None, f"handler must be file.function, got {handler!r}"
    file_name = module_name + ".py"
    path = os.path.join(directory, file_name)
    if not os.path.isfile(path):
        return None, f"handler file {file_name} not found in {directory}"
    sys.path.insert(0, os.path.abspath(directory))  # sibling modules import as usual
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except SyntaxError as e:  # also a sibling module's: name the file that has it
        where = os.path.basename(e.filename) if e.filename else file_name
        return None, f"SyntaxError in {where} line {e.lineno}: {e.msg}"
    except BaseException as e:  # noqa: BLE001 - whatever the import raised, even SystemExit
        return None, f"{file_name} raised at import: {type(e).__name__}: {e}"
    func = getattr(module, func_name, None)
    if not callable(func):
        return None, f"{file_name} has no function {func_name}"
    return func, None


def call(func, context, payload, max_log_bytes):
    """Runs one call with its prints captured; returns the pod contract's response as JSON."""
    logs = CallLogs(max_log_bytes)
    token = current_call.set(logs)
    output, error = "null", None
    try:
        try:
            result = func(context, payload)
        except BaseException as e:  # noqa: BLE001 - sys.exit() in a handler fails the call too
            error = raised(e)
        else:
            try:  # encoded here, so a value that is not JSON fails this call and nothing else
                output = to_json(result, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as e:
                error = function_error(f"function returned a value that is not JSON: {e}", [])
    finally:
        current_call.reset(token)
    context = to_json({"logs": logs.finish(), "error": error})
    return f'{{"context":{context},"payload":{output}}}'


def raised(e):
    """The FunctionError for an exception, its stack trace without this runtime's frame."""
    tb = e.__traceback__.tb_next if e.__traceback__ else None
    lines = "".join(traceback.format_exception(type(e), e, tb)).splitlines()
    return function_error(f"{type(e).__name__}: {e}", lines)


def function_error(message, stacktrace):
    return {"type": "FunctionError", "message": message, "stacktrace": stacktrace}


def input_error(message):
    error = {"type": "InputError", "message": message}
    return to_json({"context": {"logs": {"stdout": [], "stderr": []}, "error": error},
                    "payload": None})


class Handler(BaseHTTPRequestHandler):
    """POST / runs the function, GET /healthz answers ok; anything else is 404 or 405."""

    protocol_version = "HTTP/1.1"  # keep-alive: the gateway pools connections
    disable_nagle_algorithm = True  # headers and body are two writes; no delayed-ACK stalls
    server_version = "dispatch-python3"
    routes = {"/": "POST", "/healthz": "GET"}

    def route(self):
        body = self.read_body()
        path = urlsplit(self.path).path
        allowed = self.routes.get(path)
        if allowed is None:
            return self.reply(404, "text/plain", f"no route {path}: POST / or GET /healthz")
        if self.command != allowed and (self.command, allowed) != ("HEAD", "GET"):
            return self.reply(405, "text/plain", f"{path} takes {allowed}", [("Allow", allowed)])
        if path == "/healthz":
            return self.reply(200, "text/plain", "ok")
        return self.invoke(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = route

    def invoke(self, body):
        try:
            envelope = json.loads(body)
        except ValueError as e:  # UnicodeDecodeError is a ValueError too
            return self.reply(400, "application/json", input_error(f"request body is not JSON: {e}"))
        if not isinstance(envelope, dict):
            kind = type(envelope).__name__
            return self.reply(400, "application/json",
                              input_error(f"request body must be a JSON object, not {kind}"))
        context = envelope.get("context")
        context = {} if context is None else context
        if not isinstance(context, dict):
            return self.reply(400, "application/json", input_error("context must be a JSON object"))
        server = self.server
        answer = call(server.func, context, envelope.get("payload"), server.max_log_bytes)
        self.reply(200, "application/json", answer)

    def read_body(self):
        """Reads the body by Content-Length, so the next request on the connection is intact."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # a body we cannot delimit: do not reuse the connection
            return b""
        return self.rfile.read(length) if length else b""

    def reply(self, status, content_type, text, headers=()):
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 - no access log; runs carry the logs
        pass


class Server(ThreadingHTTPServer):
    """One thread per connection; a keep-alive connection's calls run one after another."""

    daemon_threads = True  # a call still running does not hold up exit
    block_on_close = False
    request_queue_size = 128  # the default listen backlog of 5 drops connections in a burst

    def __init__(self, host, port, func, max_log_bytes):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.func, self.max_log_bytes = func, max_log_bytes
        super().__init__((host, port), Handler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the host's FQDN, which can stall startup on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a gateway hanging up is normal
            traceback.print_exc(file=REAL_ERR)


class Stop(Exception):
    """Raised by the SIGTERM handler to leave serve_forever at once."""


def stop(signum, frame):
    raise Stop


def say(value):
    PROTOCOL_OUT.write(to_json(value) + "\n")
    PROTOCOL_OUT.flush()


def exit_at_stdin_eof():
    """Reads stdin to its end (the gateway writes nothing), then ends the process."""
    while sys.stdin.buffer.read(4096):
        pass
    REAL_ERR.flush()
    os._exit(0)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Dispatch python3 function runtime")
    p.add_argument("--dir", required=True, help="the function's unpacked source")
    p.add_argument("--handler", required=True, help="file.function, e.g. hello.handle")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--max-log-bytes", type=int, default=1 << 20, help="per call, both streams")
    p.add_argument("--check", action="store_true", help="only load the handler and say so")
    p.add_argument("--exit-with-stdin", action="store_true",
                   help="exit when stdin closes (the gateway holds its end: a gateway that dies, "
                        "even by SIGKILL, takes its runtimes with it)")
    args = p.parse_args(argv)
    if args.max_log_bytes < 0:
        p.error("--max-log-bytes must not be negative")
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.stdout, sys.stderr = RoutedStream("stdout"), RoutedStream("stderr")
    func, reason = load_handler(args.dir, args.handler)
    if func is None:
        say({"ok": False, "reason": reason})
        return EXIT_NOT_LOADABLE
    if args.check:
        say({"ok": True})
        return 0
    try:
        server = Server(args.host, args.port, func, args.max_log_bytes)
    except OSError as e:
        say({"ok": False, "reason": f"cannot listen on {args.host}:{args.port}: {e.strerror or e}"})
        return EXIT_CANNOT_LISTEN
    host, port = server.server_address[:2]
    say({"listening": f"[{host}]:{port}" if ":" in host else f"{host}:{port}"})
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.exit_with_stdin:
        threading.Thread(target=exit_at_stdin_eof, daemon=True).start()
    try:
        server.serve_forever()
    except Stop:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    code = main()
    REAL_ERR.flush()
    os._exit(code)  # do not wait for threads the handler started, or for calls in flight
