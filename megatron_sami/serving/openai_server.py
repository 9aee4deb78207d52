"""An OpenAI-compatible HTTP server over the ``hf`` generation backend (``sami-serve``).

The subset judges and clients use: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (one choice per request, greedy or sampled), plus ``GET /health``.
One model, one generation at a time (requests queue on a lock); meant as a local judge or to try a
checkpoint. On clusters the same clients talk to vLLM's server instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from megatron_sami.errors import ConfigError, RequestError

logger = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ServeConfig:
    """``sami-serve``'s settings; limits are in tokens and bytes.

    Raises:
        ConfigError: ``model_dir`` is not an HF directory, ``default_max_tokens`` > ``max_tokens``,
            ``api_key_env`` names an unset variable, or a non-loopback host without a key.
    """

    model_dir: str
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (printed)
    served_model_name: str | None = None  # default: the directory's name
    api_key_env: str | None = None  # name of the variable holding the key clients must send
    max_tokens: int = 1024  # the most new tokens one request may ask for
    default_max_tokens: int | None = None  # when a request gives none; null: min(256, max_tokens)
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 8192
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ConfigError(f"{self.model_dir} is not an HF model directory (no config.json).")
        if self.default_max_tokens is None:
            self.default_max_tokens = min(256, self.max_tokens)
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError("--default-max-tokens cannot exceed --max-tokens.")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ConfigError(f"--api-key-env {self.api_key_env}: that variable is unset or empty; export the key "
                              f"in it, or drop the option to serve without a key (loopback only).")
        if self.host not in LOOPBACK and not self.api_key_env:
            raise ConfigError(f"serving on {self.host} without an API key would let anyone on the network use "
                              f"the model; set --api-key-env VAR (and export VAR=<key>) or bind to 127.0.0.1.")

    @property
    def name(self) -> str:
        """The model name clients send: ``served_model_name``, else the directory's name."""
        return self.served_model_name or Path(self.model_dir).resolve().name


class Generator:
    """The HF backend behind a lock, with per-request sampling settings."""

    def __init__(self, cfg: ServeConfig) -> None:
        """Load the model (:class:`~megatron_sami.rollout.generation.HFBackend`, one prompt at a time)."""
        from megatron_sami.rollout.generation import GenerationConfig, HFBackend

        self.cfg = cfg
        self.backend = HFBackend(cfg.model_dir, GenerationConfig(dtype=cfg.dtype, batch_size=1, stop=[]))
        self.tokenizer = self.backend.tokenizer
        self.lock = threading.Lock()

    def chat_prompt(self, messages: list[dict]) -> str:
        """The model's chat template applied to ``messages``, or a plain transcript for a base model."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # Base models have no chat template: a plain transcript the model continues.
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(turns) + "\n\nAssistant:"

    def prompt_limit(self, max_tokens: int) -> int:
        """Prompt tokens a request may send: the configured limit, and what the model's context
        leaves after the new tokens."""
        context = getattr(self.backend.model.config, "max_position_embeddings", None) or self.cfg.max_prompt_tokens
        return min(self.cfg.max_prompt_tokens, context - max_tokens)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without special tokens."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompt: str, params: dict) -> tuple[str, str, int]:
        """(text, finish reason ``stop`` or ``length``, completion tokens) for one prompt, under the
        lock, with :func:`sampling_params`' settings."""
        settings = dataclasses.replace(self.backend.cfg, max_new_tokens=params["max_tokens"],
                                       temperature=params["temperature"], top_p=params["top_p"],
                                       stop=params["stop"], seed=params["seed"])
        with self.lock:
            self.backend.cfg = settings
            completion = self.backend.generate([prompt])[0]
        finish = "stop" if completion.finished else "length"
        return completion.text, finish, completion.num_tokens


def sampling_params(body: dict, cfg: ServeConfig) -> dict:
    """Validated sampling settings of a request (OpenAI names and defaults).

    Raises:
        RequestError: 400 for a bad or over-limit ``max_tokens``, ``n`` != 1, streaming, or a bad
            temperature, top_p, stop or seed.
    """
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", cfg.default_max_tokens))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestError(400, "max_tokens must be a positive integer.")
    if max_tokens > cfg.max_tokens:
        raise RequestError(400, f"max_tokens={max_tokens} exceeds this server's limit of {cfg.max_tokens}.")
    if body.get("n", 1) != 1:
        raise RequestError(400, "this server returns one choice per request (n=1).")
    if body.get("stream"):
        raise RequestError(400, "streaming is not supported; send stream=false.")
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise RequestError(400, "temperature must be a number in [0, 2].")
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise RequestError(400, "top_p must be a number in (0, 1].")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise RequestError(400, "stop must be a string or a list of at most 4 strings.")
    seed = body.get("seed", 0)
    if not isinstance(seed, int):
        raise RequestError(400, "seed must be an integer.")
    return {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p), "stop": stop,
            "seed": seed}


def chat_messages(body: dict) -> list[dict]:
    """The request's ``{role, content}`` messages.

    Raises:
        RequestError: 400 unless a non-empty list of system/user/assistant messages with string content.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of {role, content} objects.")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant") \
                or not isinstance(message.get("content"), str):
            raise RequestError(400, "each message needs a role (system, user or assistant) and string content.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class Handler(BaseHTTPRequestHandler):
    """The endpoints (module docstring); :func:`make_server` binds the generator, config and key.
    Every refusal is an OpenAI-style JSON error with a 4xx status."""

    server_version = "sami-serve"
    generator: Generator
    cfg: ServeConfig
    api_key: str | None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        """Access log lines go to this module's logger."""
        logger.info("%s %s", self.address_string(), format % args)

    # -- plumbing -----------------------------------------------------------------------------------
    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
        self._send(err.status, {"error": {"message": str(err), "type": err.kind, "code": err.status}})

    def _authorize(self) -> None:
        if not self.api_key:
            return
        sent = self.headers.get("Authorization", "")
        if not secrets.compare_digest(sent.encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError(401, "missing or wrong API key (send Authorization: Bearer <key>).",
                               "authentication_error")

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "send a Content-Length header.")
        if int(length) > self.cfg.max_body_bytes:
            raise RequestError(413, f"request body of {length} bytes exceeds the limit of {self.cfg.max_body_bytes}.")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object.")
        model = body.get("model")
        if model is not None and model != self.cfg.name:
            raise RequestError(404, f"model '{model}' is not served here; this server serves '{self.cfg.name}'.",
                               "not_found_error")
        return body

    # -- endpoints ----------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name
        """``/health`` (no key needed) and ``/v1/models``."""
        try:
            if self.path == "/health":
                self._send(200, {"status": "ok"})
                return
            self._authorize()
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": self.cfg.name, "object": "model", "created": 0, "owned_by": "megatron-sami"}]})
                return
            raise RequestError(404, f"no endpoint {self.path}; see /v1/models, /v1/chat/completions, "
                                    f"/v1/completions.", "not_found_error")
        except RequestError as err:
            self._error(err)

    def do_POST(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name
        """``/v1/chat/completions`` and ``/v1/completions``: one choice, with token usage."""
        try:
            self._authorize()
            path = self.path.rstrip("/")
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise RequestError(404, f"no endpoint {self.path}.", "not_found_error")
            body = self._body()
            params = sampling_params(body, self.cfg)
            if path == "/v1/chat/completions":
                prompt = self.generator.chat_prompt(chat_messages(body))
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str) or not prompt:
                    raise RequestError(400, "prompt must be a non-empty string (one prompt per request).")
            prompt_tokens, limit = self.generator.count_tokens(prompt), self.generator.prompt_limit(params["max_tokens"])
            if prompt_tokens > limit:
                raise RequestError(400, f"the prompt has {prompt_tokens} tokens; with max_tokens={params['max_tokens']} "
                                        f"this server takes at most {limit}: shorten it or ask for fewer tokens.")
            text, finish, completion_tokens = self.generator.generate(prompt, params)
        except RequestError as err:
            self._error(err)
            return
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        common = {"created": int(time.time()), "model": self.cfg.name, "usage": usage}
        if path == "/v1/chat/completions":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            self._send(200, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "choices": [choice]}
                       | common)
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            self._send(200, {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "choices": [choice]}
                       | common)


def make_server(cfg: ServeConfig) -> ThreadingHTTPServer:
    """Load the model and bind the socket (port 0 picks a free one); ``serve_forever`` serves.

    Raises:
        OSError: the address cannot be bound (e.g. the port is taken).
    """
    generator = Generator(cfg)
    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    handler = type("BoundHandler", (Handler,), {"generator": generator, "cfg": cfg, "api_key": api_key})
    server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
    server.daemon_threads = True
    return server
