"""A client for OpenAI-compatible chat endpoints (hosted APIs, vLLM's server, ``sami-serve``).

The API key is read from an environment variable whose *name* is configured; the key itself is
never stored in configs, logged, cached or put in an error message. Requests go through httpx.
No redirect of a chat completion is followed (a POST answered 3xx is an error naming the new
address), and ``GET /models`` follows a redirect only within the same origin (scheme, host and
port), so the key never reaches another origin; httpx would also drop ``Authorization`` on a
cross-origin redirect (``Client._redirect_headers`` in httpx 0.28), but we do not rely on it.
A key sent over plain http to a host that is not loopback is warned about once per address.

Replies are cached on disk by a hash of the request (endpoint, model, messages, sampling
settings), so an interrupted evaluation resumes without asking again. 429, 5xx and 408 replies,
dropped or half-read connections and timeouts are retried with exponential backoff; a reply that is
not the expected JSON is reported as malformed, not cached. ``timeout_s`` bounds each whole
request (connecting, sending and reading to the last byte), not each socket read.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import httpx

from megatron_sami.errors import ConfigError, JudgeError
from megatron_sami.io import atomic_write_json

logger = logging.getLogger(__name__)

RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}
MAX_SAME_ORIGIN_REDIRECTS = 5  # GET /models only
_warned_plain_http: set[str] = set()
_warn_lock = threading.Lock()


def retry_after(value: str | None) -> float:
    """Seconds a 429/503 reply asks the client to wait (numeric Retry-After only), else 0."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP literal, IPv6 without brackets) is this machine's loopback.
    Only ``localhost`` is taken on its name; other names are not resolved."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same_origin(first: httpx.URL, second: httpx.URL) -> bool:
    """Whether two URLs share scheme, host and port (default ports filled in)."""
    def port(url: httpx.URL) -> int | None:
        return url.port or {"http": 80, "https": 443}.get(url.scheme)

    return first.scheme == second.scheme and first.host == second.host and port(first) == port(second)


@dataclass
class JudgeConfig:
    """The judge endpoint (``winrate.judge.*``, ``sami-eval winrate --judge-*``): an OpenAI-
    compatible chat endpoint, asked at temperature 0 by default (Fränken et al. 2024,
    arXiv:2404.14313, judged with GPT-4 at temperature 0).

    Raises:
        ConfigError: a ``base_url`` that is not http(s), ``max_tokens`` or ``concurrency`` < 1,
            negative retries or backoff, or a non-positive timeout.
    """

    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1 (sami-serve, vLLM) or a hosted API
    model: str | None = None
    api_key_env: str | None = "SAMI_JUDGE_API_KEY"  # the variable's name; unset or empty: no key sent
    max_tokens: int = 256
    temperature: float = 0.0
    concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 1.0  # first wait; doubles per retry, at most 60 s
    cache_dir: str | None = None  # null: <output>/judge-cache

    def __post_init__(self) -> None:
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge.base_url={self.base_url} must start with http:// or https://, e.g. "
                              f"http://127.0.0.1:8000/v1.")
        for name in ("max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"judge.{name} must be at least 1.")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ConfigError("judge.max_retries and judge.backoff_s must be >= 0 and judge.timeout_s > 0.")

    @property
    def configured(self) -> bool:
        """Whether both ``base_url`` and ``model`` are set."""
        return bool(self.base_url and self.model)

    def require(self) -> None:
        """Raises ConfigError, naming the settings, unless :attr:`configured`."""
        if not self.configured:
            raise ConfigError("set judge.base_url and judge.model (an OpenAI-compatible endpoint, e.g. sami-serve "
                              "or vLLM at http://HOST:PORT/v1) to evaluate win rates.")


@dataclass(frozen=True)
class Reply:
    """The judge's reply text, whether it came from the cache, and ``ok`` or ``malformed``."""

    text: str | None  # None when the reply was malformed
    cached: bool
    status: str  # ok | malformed


class JudgeClient:
    """Asks the judge, retrying and caching replies under ``cache_dir`` (module docstring)."""

    def __init__(self, cfg: JudgeConfig, cache_dir: Path | None) -> None:
        """Read the API key from ``cfg.api_key_env``; nothing is sent yet. ``cache_dir`` None: a
        client that can only :meth:`check_reachable`.

        Raises:
            ConfigError: ``cfg`` lacks ``base_url`` or ``model``.
        """
        cfg.require()
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/")
        self.cache_dir = cache_dir
        self._key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self.requests_sent = 0
        self._warn_plain_http()
        # Certificates are loaded once, not per request (each request gets its own client, below).
        self._tls = httpx.create_ssl_context() if self.url.startswith("https://") else True

    # -- secrecy ------------------------------------------------------------------------------------
    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``<api key>``."""
        return text.replace(self._key, "<api key>") if self._key else text

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def _warn_plain_http(self) -> None:
        parts = urlsplit(self.url)
        if not self._key or parts.scheme != "http" or is_loopback(parts.hostname or ""):
            return
        with _warn_lock:
            if self.url in _warned_plain_http:
                return
            _warned_plain_http.add(self.url)
        logger.warning("judge: the API key in %s goes over plain http to %s, readable by anyone on the way; use "
                       "an https:// judge.base_url, or a tunnel to 127.0.0.1.", self.cfg.api_key_env, self.url)

    # -- cache --------------------------------------------------------------------------------------
    def payload(self, messages: list[dict]) -> dict:
        """The chat-completion request body for ``messages``."""
        return {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens}

    def cache_path(self, payload: dict) -> Path:
        """Where the reply to ``payload`` at this endpoint is cached (a SHA-256 of both)."""
        if self.cache_dir is None:
            raise ValueError("this JudgeClient was made without a cache_dir")
        digest = hashlib.sha256(json.dumps({"url": self.url, "request": payload}, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def cached(self, messages: list[dict]) -> str | None:
        """The cached reply text to ``messages``, or None."""
        path = self.cache_path(self.payload(messages))
        return json.loads(path.read_text())["text"] if path.is_file() else None

    def _store(self, payload: dict, text: str) -> None:
        path = self.cache_path(payload)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"request": payload, "text": text}, indent=None)

    # -- HTTP ---------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, payload: dict | None, timeout_s: float) -> httpx.Response:
        """One request, read to its last byte within ``timeout_s``, redirects not followed except a
        GET's within the same origin.

        Raises:
            TimeoutError: no complete reply within ``timeout_s``.
            httpx.TransportError: connecting, sending or reading failed.
            JudgeError: a redirect that is not followed.
        """
        return asyncio.run(self._send_async(method, path, payload, timeout_s))

    async def _send_async(self, method: str, path: str, payload: dict | None, timeout_s: float) -> httpx.Response:
        # One event loop and client per request: asyncio's cancellation bounds the whole exchange,
        # which httpx's own timeouts (per connect, per read) do not.
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, verify=self._tls) as client:
            async with asyncio.timeout(timeout_s):
                request = client.build_request(method, f"{self.url}{path}", headers=self._headers(),
                                               content=None if payload is None else json.dumps(payload).encode())
                for _ in range(MAX_SAME_ORIGIN_REDIRECTS + 1):
                    response = await client.send(request)
                    await response.aread()
                    target = response.next_request
                    if target is None:
                        return response
                    if method != "GET" or not same_origin(target.url, request.url):
                        self._refuse_redirect(response, method, path)
                    request = target
        self._refuse_redirect(response, method, path)  # too many redirects, all within the origin

    def _refuse_redirect(self, response: httpx.Response, method: str, path: str) -> NoReturn:
        location = self.redact(response.headers.get("Location", "?"))
        why = "the API key is never sent to another origin" if method == "GET" else \
            "a chat completion is never re-sent to a redirected address"
        raise JudgeError(f"the judge at {self.url} answered {method} {path} with HTTP {response.status_code}, "
                         f"redirecting to {location}; {why}: set judge.base_url (--judge-url) to the address the "
                         f"server redirects to.")

    def _refused_key(self, status: int) -> JudgeError:
        return JudgeError(f"the judge at {self.url} refused the API key (HTTP {status}); set the variable "
                          f"{self.cfg.api_key_env} to a valid key.")

    def check_reachable(self) -> None:
        """GET /models once, so a wrong address or key fails at once with the fix, not after
        retries (and, in ``sami-eval winrate``, before any response is generated).

        Raises:
            JudgeError: the endpoint is unreachable, refuses the key (401/403), does not answer
                within ``timeout_s`` (at most 30 s), or redirects to another origin.
        """
        timeout_s = min(self.cfg.timeout_s, 30.0)
        try:
            response = self._send("GET", "/models", None, timeout_s)
        except (httpx.TransportError, TimeoutError) as err:
            timed_out = isinstance(err, TimeoutError | httpx.TimeoutException)
            reason = f"no reply within {timeout_s:g} s" if timed_out else self.redact(str(err) or type(err).__name__)
            raise JudgeError(f"cannot reach the judge at {self.url} ({reason}); start the server (sami-serve "
                             f"MODEL_DIR --port PORT, or vLLM) or fix judge.base_url.") from None
        if response.status_code in (401, 403):
            raise self._refused_key(response.status_code)
        # Any other status: the server answers; some have no /models, and the first request will tell.

    def complete(self, messages: list[dict]) -> Reply:
        """The judge's reply to ``messages``: from the cache, else asked (with retries) and cached
        when it is a well-formed chat completion.

        Raises:
            JudgeError: the key is refused, a redirect, an HTTP error that is not retried, or
                failures on every retry.
        """
        payload = self.payload(messages)
        path = self.cache_path(payload)
        if path.is_file():
            return Reply(json.loads(path.read_text())["text"], cached=True, status="ok")
        body = self._post(payload)
        try:
            text = json.loads(body)["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            logger.warning("judge reply is not a chat completion (%s): %s", type(err).__name__,
                           self.redact(body[:200].decode("utf-8", "replace")))
            return Reply(None, cached=False, status="malformed")
        self._store(payload, text)
        return Reply(text, cached=False, status="ok")

    def _attempt(self, payload: dict) -> tuple[bytes | None, str, float]:
        """One POST: (body, "", 0) on success, else (None, what failed, seconds the server asked
        to wait) for a failure worth retrying.

        Raises:
            JudgeError: a refused key, a redirect or an HTTP error that is not retried.
        """
        try:
            self.requests_sent += 1
            response = self._send("POST", "/chat/completions", payload, self.cfg.timeout_s)
        except (TimeoutError, httpx.TimeoutException):
            return None, f"no complete reply within {self.cfg.timeout_s:g} s", 0.0
        except httpx.TransportError as err:  # refused, reset, closed mid-body (RemoteProtocolError, ReadError)
            return None, f"connection failed ({self.redact(str(err) or type(err).__name__)})", 0.0
        status = response.status_code
        if status < 300:
            return response.content, "", 0.0
        if status in (401, 403):
            raise self._refused_key(status)
        if status not in RETRIED_STATUS:
            detail = self.redact(response.content[:200].decode("utf-8", "replace"))
            raise JudgeError(f"the judge at {self.url} answered HTTP {status}: {detail}")
        return None, f"HTTP {status}", retry_after(response.headers.get("Retry-After"))

    def _post(self, payload: dict) -> bytes:
        last, asked_wait = "", 0.0
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                wait = min(60.0, max(self.cfg.backoff_s * 2 ** (attempt - 1), asked_wait))
                logger.info("judge: %s; retry %d/%d in %.1f s", last, attempt, self.cfg.max_retries, wait)
                time.sleep(wait)
            body, last, asked_wait = self._attempt(payload)
            if body is not None:
                return body
        raise JudgeError(f"the judge at {self.url} kept failing ({last}) after {self.cfg.max_retries} retries; the "
                         f"replies received so far are cached in {self.cache_dir}: rerun the same command to resume.")


def check_judge(cfg: JudgeConfig) -> None:
    """Ask the judge of ``cfg`` once (``GET /models``), before any work that its verdicts need:
    ``sami-eval winrate`` calls it before generating, ``sami-iterate`` when a run with
    ``winrate.enabled`` starts.

    Raises:
        ConfigError: ``cfg`` lacks ``base_url`` or ``model``.
        JudgeError: the judge is unreachable, refuses the key, or redirects to another origin.
    """
    JudgeClient(cfg, cache_dir=None).check_reachable()
