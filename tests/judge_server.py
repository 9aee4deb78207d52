"""A scriptable OpenAI-compatible judge on loopback for the fault tests (real HTTP, real sockets).

It prefers the response that contains the word GOOD (so the expected win rate is known), and a
script of faults is consumed one request at a time: a status ("429", "503:2" with Retry-After),
"malformed" (a cut JSON body), "truncate" (fewer body bytes than Content-Length, then the
connection closes) or "trickle" (the whole reply, status line included, one byte every 0.2 s).
``redirect_to`` answers every request with a 302 to that base URL (another origin when it is a
second server), ``models_moved`` answers ``GET /v1/models`` with a 308 to ``/v1/models/`` (the same
origin). Every request's method, path and Authorization header is recorded in ``requests``.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudge:
    def __init__(self, port: int = 0, api_key: str | None = None, faults: list[str] | None = None,
                 down_after: int | None = None, always: str | None = None, redirect_to: str | None = None,
                 models_moved: bool = False) -> None:
        self.api_key = api_key
        self.faults = list(faults or [])
        self.down_after = down_after  # close the socket after this many answered requests
        self.always = always  # answer this letter regardless of content
        self.answered: list[str] = []  # the user message of every request answered with a verdict
        self.seen = 0
        self.closing = False
        self.refused_at: list[float] = []  # when each scripted 4xx/5xx was sent
        self.redirect_to = redirect_to
        self.models_moved = models_moved
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization) of each request
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorized(self) -> bool:
                sent = self.headers.get("Authorization", "")
                if judge.api_key and sent != f"Bearer {judge.api_key}":
                    # Echo what was sent, as some servers do: the client must redact it.
                    self._reply(401, json.dumps({"error": f"bad credentials: {sent}"}).encode())
                    return False
                return True

            def _redirected(self) -> bool:
                with judge.lock:
                    judge.requests.append((self.command, self.path, self.headers.get("Authorization")))
                location = None
                if judge.redirect_to:
                    location = judge.redirect_to.rstrip("/") + self.path.removeprefix("/v1")
                elif judge.models_moved and self.command == "GET" and self.path == "/v1/models":
                    location = "/v1/models/"
                if location is None:
                    return False
                self.send_response(302 if judge.redirect_to else 308)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True

            def _trickle(self, reply: dict) -> None:
                data = json.dumps(reply).encode()
                raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                       + str(len(data)).encode() + b"\r\n\r\n" + data)
                try:
                    for index in range(len(raw)):
                        self.wfile.write(raw[index:index + 1])
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass  # the client gave up, as it should
                self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802
                if not self._redirected() and self._authorized():
                    self._reply(200, json.dumps({"object": "list", "data": [{"id": "judge"}]}).encode())

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self._redirected() or not self._authorized():
                    return
                with judge.lock:
                    if judge.closing:
                        return  # going down: drop the connection without a reply
                    judge.seen += 1
                    fault = judge.faults.pop(0) if judge.faults else None
                if fault is not None and fault.split(":")[0].isdigit():
                    status, _, wait = fault.partition(":")
                    self.send_response(int(status))
                    if wait:
                        self.send_header("Retry-After", wait)
                    self.send_header("Content-Length", "22")
                    self.end_headers()
                    self.wfile.write(b'{"error": "try later"}')
                    with judge.lock:
                        judge.refused_at.append(time.monotonic())
                    return
                if fault == "malformed":
                    self._reply(200, b'{"choices": [{"message": ')
                    return
                if fault == "truncate":  # announce 400 bytes, send 20, close: an incomplete read
                    self.send_response(200)
                    self.send_header("Content-Length", "400")
                    self.end_headers()
                    self.wfile.write(b'{"choices": [{"index')
                    self.close_connection = True
                    return
                user = body["messages"][-1]["content"]
                a_part, b_part = user.split("Response A:")[1].split("Response B:")
                letter = judge.always or ("A" if "GOOD" in a_part else "B" if "GOOD" in b_part else "A or B")
                reply = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                               "content": f"Reasoning.\nPreferred: {letter}"}}]}
                if fault == "trickle":
                    self._trickle(reply)
                    return
                with judge.lock:
                    judge.answered.append(user)
                    close = judge.down_after is not None and len(judge.answered) >= judge.down_after
                    judge.closing = judge.closing or close
                self._reply(200, json.dumps(reply).encode())
                if close:
                    threading.Thread(target=judge.stop, daemon=True).start()

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self) -> FakeJudge:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
