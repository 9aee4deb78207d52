"""An OpenAI-compatible HTTP server over the ``hf`` generation backend (``sami-serve``), on
FastAPI and uvicorn.

The subset judges and clients use: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (one choice per request, greedy or sampled), plus ``GET /health`` (no key
needed). Requests are validated by pydantic models: an explicit ``null`` for ``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``n`` or ``stop`` means the default, as in the OpenAI API
and vLLM; anything else the server cannot honour is a 4xx with an OpenAI-style JSON error naming
the reason, never a dropped connection.

One model, one generation at a time (a request holds the model while it generates); at most
``max_queue`` further requests wait for it, and beyond that a request is answered 503 with a
``Retry-After`` header at once. Meant as a local judge or to try a checkpoint; on clusters the
same clients talk to vLLM's server instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from megatron_sami.errors import ConfigError, RequestError

logger = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.manual_seed takes
MAX_STOP_STRINGS = 4


@dataclass
class ServeConfig:
    """``sami-serve``'s settings; limits are in tokens, bytes, requests and seconds.

    Raises:
        ConfigError: ``model_dir`` is not an HF directory, ``default_max_tokens`` > ``max_tokens``,
            a limit out of range, ``api_key_env`` naming an unset variable, or a non-loopback host
            without a key.
    """

    model_dir: str
    host: str = "127.0.0.1"  # IPv6 hosts as they are: ::1
    port: int = 8000  # 0: any free port (printed)
    served_model_name: str | None = None  # default: the directory's name
    api_key_env: str | None = None  # name of the variable holding the key clients must send
    max_tokens: int = 1024  # the most new tokens one request may ask for
    default_max_tokens: int | None = None  # when a request gives none; null: min(256, max_tokens)
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 8192
    dtype: str = "auto"
    max_queue: int = 16  # requests that may wait for the model beside the one generating; more get 503
    backlog: int = 2048  # the listening socket's queue of connections not yet accepted
    max_connections: int = 1024  # open connections (uvicorn's limit_concurrency); more get 503
    body_timeout_s: float = 60.0  # a request body must arrive within this

    def __post_init__(self) -> None:
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ConfigError(f"{self.model_dir} is not an HF model directory (no config.json).")
        if self.default_max_tokens is None:
            self.default_max_tokens = min(256, self.max_tokens)
        for name, low in (("max_tokens", 1), ("default_max_tokens", 1), ("max_body_bytes", 1),
                          ("max_prompt_tokens", 1), ("max_queue", 0), ("backlog", 1), ("max_connections", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}.")
        if not 0 <= self.port <= 65535 or self.body_timeout_s <= 0:
            raise ConfigError("--port must be in [0, 65535] (0: any free port) and the body timeout positive.")
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


# -- requests -------------------------------------------------------------------------------------

class _Request(BaseModel):
    """Fields both endpoints share. Strict types (no "5" for 5, no true for 1); unknown fields
    (frequency_penalty, user, ...) are ignored, as they do not change a greedy answer."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = None


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    """``POST /v1/completions``: one prompt per request."""

    prompt: str = Field(min_length=1)


# What each field must be, for the one-sentence 400 a malformed value gets.
FIELD_RULES = {
    "messages": "messages must be a non-empty list of {role, content} objects (role system, user or assistant; "
                "content a string)",
    "prompt": "prompt must be a non-empty string (one prompt per request)",
    "max_tokens": "max_tokens must be a positive integer or null",
    "max_completion_tokens": "max_completion_tokens must be a positive integer or null",
    "temperature": "temperature must be a number in [0, 2] or null",
    "top_p": "top_p must be a number in (0, 1] or null",
    "n": "n must be 1 or null (one choice per request)",
    "stream": "stream must be false or null (streaming is not supported)",
    "stop": f"stop must be a string, a list of at most {MAX_STOP_STRINGS} strings, or null",
    "seed": f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] or null",
    "model": "model must be a string",
}


def parse_request(kind: type[_Request], body: object) -> _Request:
    """``body`` (parsed JSON) validated as ``kind``.

    Raises:
        RequestError: 400 naming the first offending field and what it must be.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object.")
    try:
        return kind.model_validate(body)
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        where = ".".join(str(part) for part in first["loc"])
        rule = FIELD_RULES.get(field, "the request does not match the OpenAI API")
        raise RequestError(400, f"{rule} ({where}: {first['msg']}).") from None


def sampling_params(request: _Request, cfg: ServeConfig) -> dict:
    """Validated sampling settings of a request (OpenAI names; null or absent: the default).

    Raises:
        RequestError: 400 for an out-of-range or over-limit ``max_tokens``, ``n`` != 1,
            streaming, or a temperature, top_p, stop or seed out of range.
    """
    max_tokens = request.max_tokens if request.max_tokens is not None else request.max_completion_tokens
    max_tokens = cfg.default_max_tokens if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise RequestError(400, f"{FIELD_RULES['max_tokens']} (got {max_tokens}).")
    if max_tokens > cfg.max_tokens:
        raise RequestError(400, f"max_tokens={max_tokens} exceeds this server's limit of {cfg.max_tokens}.")
    if request.n not in (None, 1):
        raise RequestError(400, "this server returns one choice per request (n=1).")
    if request.stream:
        raise RequestError(400, "streaming is not supported; send stream=false.")
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    if not 0 <= temperature <= 2:  # also refuses NaN, which Python's JSON reader accepts
        raise RequestError(400, f"{FIELD_RULES['temperature']} (got {temperature}).")
    if not 0 < top_p <= 1:
        raise RequestError(400, f"{FIELD_RULES['top_p']} (got {top_p}).")
    stop = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(400, f"{FIELD_RULES['stop']} (got {len(stop)} strings).")
    seed = 0 if request.seed is None else request.seed
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise RequestError(400, f"{FIELD_RULES['seed']}.")
    return {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p), "stop": stop,
            "seed": seed}


# -- the model ------------------------------------------------------------------------------------

class Generator:
    """The HF backend with per-request sampling settings; one caller at a time (a lock)."""

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


def answer(generator: Generator, request: _Request, params: dict) -> dict:
    """Prompt, usage and the generated text of one request (run on the model's thread: the
    tokenizer and model are used by one request at a time).

    Raises:
        RequestError: 400 when the prompt is longer than the server takes.
    """
    if isinstance(request, ChatRequest):
        prompt = generator.chat_prompt([message.model_dump() for message in request.messages])
    else:
        prompt = request.prompt
    prompt_tokens, limit = generator.count_tokens(prompt), generator.prompt_limit(params["max_tokens"])
    if prompt_tokens > limit:
        raise RequestError(400, f"the prompt has {prompt_tokens} tokens; with max_tokens={params['max_tokens']} "
                                f"this server takes at most {limit}: shorten it or ask for fewer tokens.")
    text, finish, completion_tokens = generator.generate(prompt, params)
    return {"text": text, "finish": finish, "usage": {"prompt_tokens": prompt_tokens,
                                                      "completion_tokens": completion_tokens,
                                                      "total_tokens": prompt_tokens + completion_tokens}}


class ModelSlot:
    """One generation at a time on the model, at most ``max_queue`` requests waiting for it."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.pending = 0  # generating or waiting; only touched on the event loop's thread
        self.lock = asyncio.Lock()  # FIFO: waiters are served in arrival order

    async def run(self, request: Request, work: Callable[[], dict]) -> dict:
        """``work()`` on a worker thread once the model is free.

        Raises:
            RequestError: 503 when ``max_queue`` requests already wait; 499 when the client left
                while waiting (nobody reads that reply).
        """
        if self.pending > self.max_queue:
            raise RequestError(503, f"the server is busy ({self.pending} requests generating or queued, at most "
                                    f"{self.max_queue + 1}); retry after a second.", "server_busy")
        self.pending += 1
        try:
            async with self.lock:
                if await request.is_disconnected():
                    raise RequestError(499, "the client closed the request before it was served.")
                return await run_in_threadpool(work)
        finally:
            self.pending -= 1


# -- HTTP -----------------------------------------------------------------------------------------

def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """An OpenAI-style error reply; 429 and 503 carry ``Retry-After: 1``."""
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


async def read_json(request: Request, cfg: ServeConfig) -> object:
    """The request body parsed as JSON, read within ``body_timeout_s`` and ``max_body_bytes``.

    Raises:
        RequestError: 413 over the limit, 408 too slow, 499 the client left, 400 not JSON or
            nested too deeply for the parser.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cfg.max_body_bytes:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {cfg.max_body_bytes}.")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(cfg.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    raise RequestError(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes.")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {cfg.body_timeout_s:g} s.") from None
    except ClientDisconnect:
        raise RequestError(499, "the client closed the request while sending it.") from None
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise RequestError(400, "the request body is not valid JSON.") from None
    except RecursionError:
        raise RequestError(400, "the request body nests too deeply to read; send a flat OpenAI request.") from None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(_request: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, str(err), err.kind)

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            return error_response(404, f"no endpoint {request.url.path}; see /v1/models, /v1/chat/completions, "
                                       f"/v1/completions.", "not_found_error")
        return error_response(err.status_code, f"{request.method} {request.url.path}: {err.detail}.")

    @app.exception_handler(Exception)
    async def bug(_request: Request, err: Exception) -> JSONResponse:
        # Starlette logs the traceback after this reply is sent: a bug, not the client's fault.
        return error_response(500, f"internal error ({type(err).__name__}); see the server's log.", "server_error")


def make_app(cfg: ServeConfig, generator: Generator, api_key: str | None) -> FastAPI:
    """The ASGI application: routes (module docstring) over ``generator``, the key ``api_key``
    (None: none needed), the queue of :class:`ModelSlot`."""
    app = FastAPI(title="sami-serve", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    slot = ModelSlot(cfg.max_queue)
    _install_error_handlers(app)

    def authorize(request: Request) -> None:
        if api_key and not secrets.compare_digest(request.headers.get("authorization", "").encode(),
                                                  f"Bearer {api_key}".encode()):
            raise RequestError(401, "missing or wrong API key (send Authorization: Bearer <key>).",
                               "authentication_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    @app.get("/v1/models/")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [{"id": cfg.name, "object": "model", "created": 0,
                                            "owned_by": "megatron-sami"}]}

    async def complete(request: Request, kind: type[_Request]) -> dict:
        authorize(request)
        parsed = parse_request(kind, await read_json(request, cfg))
        if parsed.model is not None and parsed.model != cfg.name:
            raise RequestError(404, f"model '{parsed.model}' is not served here; this server serves '{cfg.name}'.",
                               "not_found_error")
        params = sampling_params(parsed, cfg)
        result = await slot.run(request, lambda: answer(generator, parsed, params))
        common = {"created": int(time.time()), "model": cfg.name, "usage": result["usage"]}
        if kind is ChatRequest:
            choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                      "finish_reason": result["finish"]}
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "choices": [choice]} | common
        choice = {"index": 0, "text": result["text"], "finish_reason": result["finish"], "logprobs": None}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "choices": [choice]} | common

    @app.post("/v1/chat/completions")
    @app.post("/v1/chat/completions/")
    async def chat_completions(request: Request) -> dict:
        return await complete(request, ChatRequest)

    @app.post("/v1/completions")
    @app.post("/v1/completions/")
    async def completions(request: Request) -> dict:
        return await complete(request, CompletionRequest)

    return app


def bind(cfg: ServeConfig) -> socket.socket:
    """A listening socket on ``cfg.host`` (a name, an IPv4 or an IPv6 address) and ``cfg.port``
    with ``cfg.backlog``; bound before the model loads, so a taken port fails at once.

    Raises:
        OSError: the address cannot be resolved or bound (e.g. the port is taken).
    """
    family, kind, proto, _, address = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(cfg.backlog)
    except OSError:
        sock.close()
        raise
    return sock


def base_url(sock: socket.socket) -> str:
    """``http://HOST:PORT/v1`` of a bound socket (an IPv6 host in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def make_server(cfg: ServeConfig, sock: socket.socket, generator: Generator | None = None):
    """A ``uvicorn.Server`` for ``sock`` (from :func:`bind`), loading the model unless a
    ``generator`` is given; ``server.run(sockets=[sock])`` serves until it is told to stop
    (SIGINT or SIGTERM in the main thread, or ``server.should_exit = True``)."""
    import uvicorn

    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    app = make_app(cfg, generator or Generator(cfg), api_key)
    config = uvicorn.Config(app, log_config=None, lifespan="off", backlog=cfg.backlog,
                            limit_concurrency=cfg.max_connections, timeout_keep_alive=5,
                            timeout_graceful_shutdown=5, server_header=False, proxy_headers=False)
    return uvicorn.Server(config)
