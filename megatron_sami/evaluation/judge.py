"""A client for OpenAI-compatible chat endpoints (hosted APIs, vLLM's server, ``sami-serve``).

The API key is read from an environment variable whose *name* is configured; the key itself is
never stored in configs, logged, cached or put in an error message. Replies are cached on disk by
a hash of the request (endpoint, model, messages, sampling settings), so an interrupted evaluation
resumes without asking again. 429 and 5xx replies and dropped connections are retried with
exponential backoff; a reply that is not the expected JSON is reported as malformed, not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from megatron_sami.errors import ConfigError, JudgeError
from megatron_sami.io import atomic_write_json

logger = logging.getLogger(__name__)

RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}


def retry_after(value: str | None) -> float:
    """Seconds a 429/503 reply asks the client to wait (numeric Retry-After only), else 0."""
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


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

    def __init__(self, cfg: JudgeConfig, cache_dir: Path) -> None:
        """Read the API key from ``cfg.api_key_env``; nothing is sent yet.

        Raises:
            ConfigError: ``cfg`` lacks ``base_url`` or ``model``.
        """
        cfg.require()
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/")
        self.cache_dir = cache_dir
        self._key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        self.requests_sent = 0

    # -- secrecy ------------------------------------------------------------------------------------
    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``<api key>``."""
        return text.replace(self._key, "<api key>") if self._key else text

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    # -- cache --------------------------------------------------------------------------------------
    def payload(self, messages: list[dict]) -> dict:
        """The chat-completion request body for ``messages``."""
        return {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens}

    def cache_path(self, payload: dict) -> Path:
        """Where the reply to ``payload`` at this endpoint is cached (a SHA-256 of both)."""
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
    def check_reachable(self) -> None:
        """GET /models once, so a wrong address fails at once with the fix, not after retries.

        Raises:
            JudgeError: the endpoint is unreachable or refuses the key (401/403).
        """
        request = urllib.request.Request(f"{self.url}/models", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=min(self.cfg.timeout_s, 30)):
                return
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise JudgeError(f"the judge at {self.url} refused the API key (HTTP {err.code}); set the variable "
                                 f"{self.cfg.api_key_env} to a valid key.") from None
            return  # some servers have no /models; the first request will tell
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise JudgeError(f"cannot reach the judge at {self.url} ({self.redact(str(reason))}); start the "
                             f"server (sami-serve MODEL_DIR --port PORT, or vLLM) or fix judge.base_url.") from None

    def complete(self, messages: list[dict]) -> Reply:
        """The judge's reply to ``messages``: from the cache, else asked (with retries) and cached
        when it is a well-formed chat completion.

        Raises:
            JudgeError: the key is refused, an HTTP error that is not retried, or failures on
                every retry.
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

    def _post(self, payload: dict) -> bytes:
        data = json.dumps(payload).encode()
        last, asked_wait = "", 0.0
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                wait = min(60.0, max(self.cfg.backoff_s * 2 ** (attempt - 1), asked_wait))
                logger.info("judge: %s; retry %d/%d in %.1f s", last, attempt, self.cfg.max_retries, wait)
                time.sleep(wait)
            request = urllib.request.Request(f"{self.url}/chat/completions", data=data, headers=self._headers())
            try:
                self.requests_sent += 1
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                detail = self.redact(err.read()[:200].decode("utf-8", "replace"))
                if err.code in (401, 403):
                    raise JudgeError(f"the judge at {self.url} refused the API key (HTTP {err.code}); set "
                                     f"{self.cfg.api_key_env} to a valid key.") from None
                if err.code not in RETRIED_STATUS:
                    raise JudgeError(f"the judge at {self.url} answered HTTP {err.code}: {detail}") from None
                last = f"HTTP {err.code}"
                asked_wait = retry_after(err.headers.get("Retry-After"))
            except (urllib.error.URLError, OSError) as err:
                last = f"connection failed ({self.redact(str(getattr(err, 'reason', err)))})"
        raise JudgeError(f"the judge at {self.url} kept failing ({last}) after {self.cfg.max_retries} retries; the "
                         f"replies received so far are cached in {self.cache_dir}: rerun the same command to resume.")
