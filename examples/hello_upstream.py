#!/usr/bin/env python3
"""A function pod for the quickstart, standard library only.

It speaks the Dispatch pod contract (DESIGN.md section 3): POST / with
{"context": {...}, "payload": <input>} answers
{"context": {"logs": {...}, "error": null}, "payload": <output>}.
A body without that envelope (a raw OpenFaaS-style call) gets the bare output back.

    python3 examples/hello_upstream.py 9000
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def hello(payload):
    payload = payload if isinstance(payload, dict) else {}
    name = payload.get("name", "Noone")
    place = payload.get("place", "Nowhere")
    return {"myField": f"Hello, {name} from {place}"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return self.answer(400, {"error": "body is not JSON"})
        if isinstance(body, dict) and "context" in body and "payload" in body:
            output = hello(body["payload"])
            logs = {"stdout": [f"said hello to {output['myField']}"], "stderr": []}
            return self.answer(200, {"context": {"logs": logs, "error": None}, "payload": output})
        return self.answer(200, hello(body))

    def do_GET(self):
        self.answer(200, hello({"name": "GET", "place": self.path}))

    def answer(self, status, value):
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    print(f"hello upstream on http://127.0.0.1:{port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
