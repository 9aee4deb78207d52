"""``sami-serve`` over real sockets: request validation (null means the default, out-of-range values
are a 400 with a reason, never a dropped connection), the bounded queue, client disconnects, IPv6,
and a load test of the real command on a tiny model.

Most tests run the ASGI app in-process on loopback with a stub generator that echoes the sampling
settings it was given, so they need no model and take milliseconds per request.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from megatron_sami.serving.openai_server import ServeConfig, base_url, bind, make_server

KEY = "sk-serve-test-31337"


class StubGenerator:
    """Replies with the sampling settings it was given (as JSON), after ``delay`` seconds; counts
    how many generations ever ran at the same time."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.active, self.most_active, self.calls = delay, 0, 0, 0
        self.lock = threading.Lock()

    def chat_prompt(self, messages: list[dict]) -> str:
        return "\n".join(message["content"] for message in messages)

    def prompt_limit(self, max_tokens: int) -> int:
        return 1000

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompt: str, params: dict) -> tuple[str, str, int]:
        with self.lock:
            self.active += 1
            self.calls += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        return json.dumps(params), "length", params["max_tokens"]


class InProcessServer:
    def __init__(self, tmp_path: Path, generator: StubGenerator, host: str = "127.0.0.1", **settings) -> None:
        (tmp_path / "model").mkdir(exist_ok=True)
        (tmp_path / "model" / "config.json").write_text("{}")
        self.cfg = ServeConfig(model_dir=str(tmp_path / "model"), host=host, port=0, served_model_name="stub",
                               **settings)
        self.sock = bind(self.cfg)
        self.url = base_url(self.sock)
        self.generator = generator
        self.server = make_server(self.cfg, self.sock, generator=generator)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture
def stub(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMI_TEST_SERVE_KEY", KEY)
    with InProcessServer(tmp_path, StubGenerator(), api_key_env="SAMI_TEST_SERVE_KEY", max_tokens=64) as server:
        yield server


def chat(url: str, payload: dict | bytes, key: str | None = KEY, path: str = "/chat/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(payload, bytes):
        headers["Content-Type"] = "application/json"
        return httpx.post(url + path, content=payload, headers=headers, timeout=60)
    return httpx.post(url + path, json=payload, headers=headers, timeout=60)


HI = [{"role": "user", "content": "hi"}]
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "stop": [], "seed": 0}


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
                                   "stop", "stream", "model"])
def test_explicit_null_means_the_default(stub, field):
    reply = chat(stub.url, {"messages": HI, field: None})
    assert reply.status_code == 200, reply.text
    params = json.loads(reply.json()["choices"][0]["message"]["content"])
    assert params == DEFAULTS | {"max_tokens": stub.cfg.default_max_tokens}


@pytest.mark.parametrize(("payload", "status", "reason"), [
    ({"messages": HI, "seed": 2**70}, 400, "seed must be an integer in"),
    ({"messages": HI, "seed": -(2**70)}, 400, "seed must be an integer in"),
    ({"messages": HI, "seed": "7"}, 400, "seed must be an integer"),
    ({"messages": HI, "n": 10**30}, 400, "one choice per request"),
    ({"messages": HI, "n": 2}, 400, "one choice per request"),
    ({"messages": HI, "max_tokens": -1}, 400, "max_tokens must be a positive integer"),
    ({"messages": HI, "max_tokens": 0}, 400, "max_tokens must be a positive integer"),
    ({"messages": HI, "max_tokens": 10**30}, 400, "exceeds this server's limit of 64"),
    ({"messages": HI, "max_tokens": True}, 400, "max_tokens must be a positive integer"),
    ({"messages": HI, "temperature": 3}, 400, "temperature must be a number in [0, 2]"),
    ({"messages": HI, "temperature": "0.5"}, 400, "temperature must be a number"),
    ({"messages": HI, "top_p": 0}, 400, "top_p must be a number in (0, 1]"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 strings"),
    ({"messages": HI, "stop": [1]}, 400, "stop must be a string"),
    ({"messages": HI, "stream": True}, 400, "streaming is not supported"),
    ({"messages": []}, 400, "non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "role system, user or assistant"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, 400, "content a string"),
    ({"messages": "hi"}, 400, "non-empty list"),
    ({"messages": HI, "model": "gpt-x"}, 404, "serves 'stub'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature must be"),
    (b"[" * 100_000, 400, "nests too deeply"),
    (b"{" * 100_000, 400, "not valid JSON"),
    (b'"just a string"', 400, "must be a JSON object"),
    (b"\xff\xfe not utf", 400, "not valid JSON"),
    (b"{not json", 400, "not valid JSON"),
    (b"x" * (2 << 20), 413, "exceeds the limit"),
])
def test_bad_requests_are_a_4xx_with_a_reason_and_the_server_stays_up(stub, payload, status, reason):
    reply = chat(stub.url, payload)
    assert reply.status_code == status, reply.text
    assert reason in reply.json()["error"]["message"]
    assert httpx.get(stub.url.removesuffix("/v1") + "/health", timeout=30).json() == {"status": "ok"}


@pytest.mark.parametrize(("method", "path", "key", "status", "reason"), [
    ("GET", "/v1/models", None, 401, "API key"),
    ("GET", "/v1/models", "sk-wrong", 401, "API key"),
    ("POST", "/v1/completions", None, 401, "API key"),
    ("GET", "/v1/nothing", KEY, 404, "no endpoint /v1/nothing"),
    ("GET", "/v1/chat/completions", KEY, 405, "Method Not Allowed"),
])
def test_routes_and_keys(stub, method, path, key, status, reason):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = httpx.request(method, stub.url.removesuffix("/v1") + path, headers=headers, timeout=30)
    assert reply.status_code == status and reason in reply.json()["error"]["message"]


def test_the_api_surface_is_unchanged(stub):
    root = stub.url.removesuffix("/v1")
    assert httpx.get(root + "/health", timeout=30).json() == {"status": "ok"}  # no key needed
    for path in ("/models", "/models/"):
        models = httpx.get(stub.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
        assert models["data"][0]["id"] == "stub" and models["object"] == "list"
    reply = chat(stub.url, {"model": "stub", "messages": HI, "max_tokens": 5, "temperature": 0, "seed": 3}).json()
    assert reply["object"] == "chat.completion" and reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
    completion = chat(stub.url, {"prompt": "Human: hi\n\nAssistant:", "max_tokens": 4}, path="/completions/").json()
    assert completion["object"] == "text_completion" and json.loads(completion["choices"][0]["text"])["max_tokens"] == 4
    assert chat(stub.url, {"prompt": ["a", "b"]}, path="/completions").json()["error"]["message"].startswith(
        "prompt must be a non-empty string")


def test_generation_is_one_at_a_time_and_the_queue_is_bounded(tmp_path):
    generator = StubGenerator(delay=0.3)
    with InProcessServer(tmp_path, generator, max_queue=2) as server, ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda _: chat(server.url, {"messages": HI}, key=None), range(12)))
        assert httpx.get(server.url.removesuffix("/v1") + "/health", timeout=30).status_code == 200
    statuses = sorted(reply.status_code for reply in replies)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 3
    for reply in replies:
        if reply.status_code == 503:
            assert "busy" in reply.json()["error"]["message"] and reply.headers["Retry-After"] == "1"
    assert generator.most_active == 1 and generator.calls == statuses.count(200)


def test_a_client_leaving_early_is_no_error(tmp_path, caplog):
    generator = StubGenerator(delay=0.5)
    with caplog.at_level("DEBUG"), InProcessServer(tmp_path, generator) as server:
        host, port = server.sock.getsockname()[:2]
        body = json.dumps({"messages": HI}).encode()
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        for sent in (body, body[:5]):  # gone while generating; gone halfway through the body
            with socket.create_connection((host, port)) as conn:
                conn.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + sent)
                time.sleep(0.1)
        time.sleep(1.0)
        assert chat(server.url, {"messages": HI}, key=None).status_code == 200
    assert not [record for record in caplog.records if record.exc_info or record.levelname in ("ERROR", "CRITICAL")]


def test_an_ipv6_host_is_served(tmp_path):
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    with InProcessServer(tmp_path, StubGenerator(), host="::1") as server:
        assert server.url.startswith("http://[::1]:")
        assert chat(server.url, {"messages": HI}, key=None).status_code == 200


# -- the real command ----------------------------------------------------------------------------

@pytest.mark.slow
def test_sami_serve_answers_64_concurrent_requests_and_stays_healthy(tmp_path):
    from megatron_sami.testing.tiny import make_tiny_hf_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(tmp_path / "model")
    make_tiny_hf_model("llama", tmp_path / "model", vocab_size=len(tokenizer))
    process = subprocess.Popen([sys.executable, "-m", "megatron_sami.cli.serve", str(tmp_path / "model"), "--port",
                                "0", "--max-tokens", "4", "--max-queue", "8"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        assert " at http://" in line, process.stderr.read()
        url = line.strip().split(" at ")[1]

        def ask(index: int) -> httpx.Response:  # a reset or a dropped connection raises here
            return httpx.post(url + "/chat/completions", json={"messages": [{"role": "user", "content": f"q {index}"}],
                                                               "max_tokens": 4, "temperature": 0}, timeout=300)

        with ThreadPoolExecutor(64) as pool:
            replies = list(pool.map(ask, range(64)))
        for reply in replies:
            assert reply.status_code in (200, 503), reply.text
            if reply.status_code == 503:
                assert "busy" in reply.json()["error"]["message"]
            else:
                assert reply.json()["choices"][0]["message"]["role"] == "assistant"
        assert any(reply.status_code == 200 for reply in replies)
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json() == {"status": "ok"}
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
