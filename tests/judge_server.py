"""A scriptable OpenAI-compatible judge on loopback for the fault tests (real HTTP, real sockets).

It prefers the response that contains the word GOOD (so the expected win rate is known), and a
script of faults ("429", "500", "malformed", "down") is consumed one request at a time.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeJudge:
    def __init__(self, port: int = 0, api_key: str | None = None, faults: list[str] | None = None,
                 down_after: int | None = None, always: str | None = None) -> None:
        self.api_key = api_key
        self.faults = list(faults or [])
        self.down_after = down_after  # close the socket after this many answered requests
        self.always = always  # answer this letter regardless of content
        self.answered: list[str] = []  # the user message of every request answered with a verdict
        self.seen = 0
        self.closing = False
        self.refused_at: list[float] = []  # when each scripted 4xx/5xx was sent
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

            def do_GET(self) -> None:  # noqa: N802
                if self._authorized():
                    self._reply(200, json.dumps({"object": "list", "data": [{"id": "judge"}]}).encode())

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorized():
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
                user = body["messages"][-1]["content"]
                a_part, b_part = user.split("Response A:")[1].split("Response B:")
                letter = judge.always or ("A" if "GOOD" in a_part else "B" if "GOOD" in b_part else "A or B")
                reply = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                               "content": f"Reasoning.\nPreferred: {letter}"}}]}
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
