"""Tests for the python3 runtime: the real server as a subprocess, spoken to over HTTP.

    python3 -m unittest discover -s runtimes/python3 -p 'test_*.py'
"""
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py")

FIXTURES = {
    # Dispatch's hello function, as its docs give it.
    "hello.py": """
        def handle(ctx, payload):
            name = "Noone"
            place = "Nowhere"
            if payload:
                name = payload.get("name", name)
                place = payload.get("place", place)
            return {"myField": "Hello, %s from %s" % (name, place)}
    """,
    "secret.py": """
        import helper  # a sibling module: DIR is on sys.path

        def handle(ctx, payload):
            return {"password": ctx["secrets"]["password"], "shout": helper.shout("hi")}
    """,
    "helper.py": """
        def shout(text):
            return text.upper()
    """,
    "boom.py": """
        import sys

        def handle(ctx, payload):
            print("about to fail")
            print("really", file=sys.stderr)
            raise ValueError("boom")
    """,
    "notjson.py": """
        def handle(ctx, payload):
            return {"tags": {1, 2}}
    """,
    # Two calls that must overlap: each waits for the other at the barrier.
    "pair.py": """
        import sys
        import threading
        import time

        both = threading.Barrier(2, timeout=5)

        def handle(ctx, payload):
            me = payload["id"]
            for i in range(5):
                print(me, i, flush=True)
                print(me, "err", i, file=sys.stderr)
                if i == 0:
                    both.wait()
                time.sleep(0.02)
            sys.stdout.write(me + " no newline")
            return me
    """,
    "flood.py": """
        import sys

        def handle(ctx, payload):
            out = sys.stderr if payload.get("stream") == "stderr" else sys.stdout
            line = "x" * (payload["width"] - 1)
            for _ in range(payload["lines"]):
                print(line, file=out)
            return "done"
    """,
    "slow.py": """
        import time

        def handle(ctx, payload):
            time.sleep(30)
    """,
    "syntax.py": """
        x = 1

        def handle(ctx, payload)
            return x
    """,
    "importboom.py": """
        print("loading, but not on stdout")
        raise RuntimeError("no config file")
    """,
}


def write_fixtures(directory):
    for name, source in FIXTURES.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(textwrap.dedent(source).lstrip("\n"))


def run_check(directory, handler):
    proc = subprocess.run([sys.executable, SERVER, "--dir", directory, "--handler", handler,
                           "--check"], capture_output=True, text=True, timeout=20)
    return proc.returncode, proc.stdout


class Runtime:
    """The server as a child process, as the gateway starts it."""

    def __init__(self, directory, handler, *extra):
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, "--dir", directory, "--handler", handler, *extra],
            stdout=subprocess.PIPE, stderr=self.stderr)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        if not ready:
            self.stop()
            raise AssertionError("the runtime printed no line within 20 s")
        self.first_line = self.proc.stdout.readline().decode()
        listening = json.loads(self.first_line)["listening"]
        self.host, port = listening.rsplit(":", 1)
        self.port = int(port)

    def connect(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=20)

    def request(self, method, path, body=None, conn=None):
        """One request, on conn if given (left open), else on a connection of its own."""
        own = conn is None
        conn = conn or self.connect()
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data)
            resp = conn.getresponse()
            return resp, resp.read()
        finally:
            if own:
                conn.close()

    def invoke(self, payload, context=None, conn=None):
        envelope = {"context": context or {"secrets": {}, "deadline": None}, "payload": payload}
        resp, data = self.request("POST", "/", envelope, conn)
        return resp.status, json.loads(data)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


class RuntimeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        write_fixtures(cls.dir)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def start(self, handler, *extra):
        rt = Runtime(self.dir, handler, *extra)
        self.addCleanup(rt.stop)
        return rt

    def test_listening_line_is_the_only_stdout(self):
        rt = self.start("hello.handle")
        self.assertRegex(rt.first_line, r'^\{"listening":"127\.0\.0\.1:\d+"\}\n$')

    def test_hello(self):
        rt = self.start("hello.handle")
        status, body = rt.invoke({"name": "Jon", "place": "Winterfell"})
        self.assertEqual(status, 200)
        self.assertEqual(body, {"context": {"logs": {"stdout": [], "stderr": []}, "error": None},
                                "payload": {"myField": "Hello, Jon from Winterfell"}})
        _, body = rt.invoke(None)
        self.assertEqual(body["payload"], {"myField": "Hello, Noone from Nowhere"})

    def test_secrets_reach_the_handler(self):
        rt = self.start("secret.handle")
        status, body = rt.invoke({}, {"secrets": {"password": "s3cret"}, "deadline": None})
        self.assertEqual(status, 200)
        self.assertIsNone(body["context"]["error"])
        self.assertEqual(body["payload"], {"password": "s3cret", "shout": "HI"})

    def test_raising_handler_is_a_function_error(self):
        rt = self.start("boom.handle")
        status, body = rt.invoke({})
        self.assertEqual(status, 200)
        self.assertIsNone(body["payload"])
        error = body["context"]["error"]
        self.assertEqual(error["type"], "FunctionError")
        self.assertEqual(error["message"], "ValueError: boom")
        self.assertEqual(error["stacktrace"][0], "Traceback (most recent call last):")
        self.assertEqual(error["stacktrace"][-1], "ValueError: boom")
        self.assertTrue(any("boom.py" in line for line in error["stacktrace"]))
        self.assertFalse(any("server.py" in line for line in error["stacktrace"]))
        self.assertEqual(body["context"]["logs"], {"stdout": ["about to fail"], "stderr": ["really"]})

    def test_value_that_is_not_json(self):
        rt = self.start("notjson.handle")
        status, body = rt.invoke({})
        self.assertEqual(status, 200)
        self.assertIsNone(body["payload"])
        error = body["context"]["error"]
        self.assertEqual(error["type"], "FunctionError")
        self.assertTrue(error["message"].startswith("function returned a value that is not JSON: "),
                        error["message"])
        self.assertIn("set", error["message"])

    def test_concurrent_calls_keep_their_own_prints(self):
        rt = self.start("pair.handle")
        results = {}

        def one(me):
            results[me] = rt.invoke({"id": me})

        threads = [threading.Thread(target=one, args=(me,)) for me in ("A", "B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        for me in ("A", "B"):
            status, body = results[me]
            self.assertEqual(status, 200)
            self.assertIsNone(body["context"]["error"])  # the barrier proves the calls overlapped
            self.assertEqual(body["payload"], me)
            logs = body["context"]["logs"]
            self.assertEqual(logs["stdout"], [f"{me} {i}" for i in range(5)] + [f"{me} no newline"])
            self.assertEqual(logs["stderr"], [f"{me} err {i}" for i in range(5)])

    def test_logs_are_cut_at_the_cap(self):
        rt = self.start("flood.handle", "--max-log-bytes", "1000")
        _, body = rt.invoke({"lines": 100, "width": 50})
        self.assertEqual(body["payload"], "done")
        stdout = body["context"]["logs"]["stdout"]
        self.assertEqual(stdout, ["x" * 49] * 20 + ["[dispatch: logs cut at 1000 bytes]"])
        _, body = rt.invoke({"lines": 100, "width": 30, "stream": "stderr"})
        stderr = body["context"]["logs"]["stderr"]
        self.assertEqual(stderr[-1], "[dispatch: logs cut at 1000 bytes]")
        self.assertEqual(stderr[-2], "x" * 10)  # 33 lines of 30 bytes, then 10 bytes of the 34th
        self.assertEqual(len(stderr), 35)
        self.assertEqual(body["context"]["logs"]["stdout"], [])

    def test_megabytes_of_prints_stay_under_the_default_cap(self):
        rt = self.start("flood.handle")
        resp, data = rt.request("POST", "/", {"context": {}, "payload": {"lines": 20000, "width": 1000}})
        self.assertEqual(resp.status, 200)
        self.assertLess(len(data), 1.2 * (1 << 20))
        stdout = json.loads(data)["context"]["logs"]["stdout"]
        self.assertEqual(stdout[-1], "[dispatch: logs cut at 1048576 bytes]")

    def test_body_that_is_not_json_is_an_input_error(self):
        rt = self.start("hello.handle")
        for body in (b"{not json", b"[1, 2]", b""):
            resp, data = rt.request("POST", "/", body)
            self.assertEqual(resp.status, 400, body)
            self.assertEqual(resp.getheader("Content-Type"), "application/json")
            answer = json.loads(data)
            self.assertEqual(answer["context"]["logs"], {"stdout": [], "stderr": []})
            self.assertEqual(answer["context"]["error"]["type"], "InputError")
            self.assertTrue(answer["context"]["error"]["message"])
            self.assertIsNone(answer["payload"])

    def test_healthz_and_other_routes(self):
        rt = self.start("hello.handle")
        resp, data = rt.request("GET", "/healthz")
        self.assertEqual((resp.status, data), (200, b"ok"))
        resp, _ = rt.request("GET", "/nope")
        self.assertEqual(resp.status, 404)
        resp, _ = rt.request("GET", "/")
        self.assertEqual(resp.status, 405)
        self.assertEqual(resp.getheader("Allow"), "POST")
        resp, _ = rt.request("DELETE", "/")
        self.assertEqual(resp.status, 405)

    def test_keep_alive(self):
        rt = self.start("hello.handle")
        conn = rt.connect()
        self.addCleanup(conn.close)
        status, body = rt.invoke({"name": "Arya"}, conn=conn)
        self.assertEqual((status, body["payload"]["myField"]), (200, "Hello, Arya from Nowhere"))
        sock = conn.sock
        self.assertIsNotNone(sock, "the server closed the connection after one request")
        resp, _ = rt.request("POST", "/", b"nope", conn=conn)
        self.assertEqual(resp.status, 400)
        resp, _ = rt.request("GET", "/healthz", conn=conn)
        self.assertEqual(resp.status, 200)
        status, body = rt.invoke({"name": "Sansa"}, conn=conn)
        self.assertEqual(body["payload"]["myField"], "Hello, Sansa from Nowhere")
        self.assertIs(conn.sock, sock, "the connection was not reused")

    def test_sigterm_exits_promptly_with_a_call_in_flight(self):
        rt = self.start("slow.handle")
        def call_and_be_dropped():
            with self.assertRaises(ConnectionError):
                rt.request("POST", "/", {"payload": None})

        caller = threading.Thread(target=call_and_be_dropped, daemon=True)
        caller.start()
        time.sleep(0.2)
        started = time.monotonic()
        rt.proc.send_signal(signal.SIGTERM)
        code = rt.proc.wait(timeout=5)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(code, 0)


class CheckTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name
        write_fixtures(cls.dir)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def assert_not_ok(self, handler, reason):
        code, out = run_check(self.dir, handler)
        self.assertEqual(code, 3)
        self.assertEqual(out.count("\n"), 1, out)
        self.assertEqual(json.loads(out), {"ok": False, "reason": reason})

    def test_ok(self):
        self.assertEqual(run_check(self.dir, "hello.handle"), (0, '{"ok":true}\n'))

    def test_missing_file(self):
        self.assert_not_ok("nope.handle", f"handler file nope.py not found in {self.dir}")

    def test_missing_function(self):
        self.assert_not_ok("hello.nope", "hello.py has no function nope")

    def test_syntax_error_names_the_line(self):
        self.assert_not_ok("syntax.handle", "SyntaxError in syntax.py line 3: expected ':'")

    def test_exception_at_import(self):
        self.assert_not_ok("importboom.handle",
                           "importboom.py raised at import: RuntimeError: no config file")

    def test_serving_a_broken_handler_says_why_and_exits_3(self):
        proc = subprocess.run([sys.executable, SERVER, "--dir", self.dir, "--handler", "hello.nope"],
                              capture_output=True, text=True, timeout=20)
        self.assertEqual(proc.returncode, 3)
        self.assertEqual(json.loads(proc.stdout), {"ok": False, "reason": "hello.py has no function nope"})

    def test_a_port_in_use_exits_4(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = str(taken.getsockname()[1])
            proc = subprocess.run([sys.executable, SERVER, "--dir", self.dir, "--handler",
                                   "hello.handle", "--port", port],
                                  capture_output=True, text=True, timeout=20)
        self.assertEqual(proc.returncode, 4)
        self.assertTrue(json.loads(proc.stdout)["reason"].startswith(f"cannot listen on 127.0.0.1:{port}: "))


if __name__ == "__main__":
    unittest.main()
