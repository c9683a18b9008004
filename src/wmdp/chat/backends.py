"""Judges: an OpenAI-compatible chat-completions endpoint, or a local HF model; a judgment cache.

The endpoint client uses the standard library only (urllib, a thread pool). Its API key is read
from the environment variable whose NAME is configured, and is sent in the Authorization header
and nowhere else: never logged, never written, never part of an error message. Transient
failures (timeouts, connection errors, HTTP 408/409/429/5xx) are retried with exponential
backoff (honouring Retry-After); a judgment that still fails is reported as failed, not dropped.
A refused key or a wrong URL (HTTP 401/403/404) stops the run at once with one line.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from wmdp.chat.generate import generate_batch, render_prompt
from wmdp.errors import WmdpError
from wmdp.io import sha256_json

OnResult = Callable[[int, "str | None", "str | None"], None]  # (index, judgment, error)
RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)
FATAL_STATUS = {401: "the key was refused", 403: "access denied",
                404: "not found (check the base URL and the judge model name)"}


class JudgeFailure(Exception):
    """One judgment that could not be had; the run goes on and counts it."""


class Judge(Protocol):
    name: str          # the judge model, as recorded and as keyed in the cache
    settings: dict     # decoding settings that change a judgment (part of the cache key)

    def run(self, requests: Sequence[tuple[str, str]], on_result: OnResult) -> None:
        """Judge each (system, user) pair; call `on_result` as each one finishes."""


class JudgmentCache:
    """Judgments on disk (JSONL, appended as they come), keyed by judge model, prompt and
    decoding settings: rerunning a judged run sends no request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        self._entries[rec["key"]] = rec["judgment"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by an interrupted run: judged again

    @staticmethod
    def key(judge: str, system: str, user: str, settings: dict) -> str:
        return sha256_json({"judge": judge, "system": system, "user": user, **settings})

    def get(self, key: str) -> str | None:
        return self._entries.get(key)

    def put(self, key: str, judge: str, judgment: str) -> None:
        with self._lock:
            self._entries[key] = judgment
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "judge": judge, "judgment": judgment}) + "\n")


def completions_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


class ChatCompletionsJudge:
    """A judge behind an OpenAI-compatible `POST {base_url}/chat/completions`."""

    def __init__(self, model: str, base_url: str, api_key_env: str | None = None,
                 *, timeout: float = 120.0, max_retries: int = 5, backoff: float = 2.0,
                 max_backoff: float = 60.0, concurrency: int = 8, max_tokens: int = 2048,
                 temperature: float = 0.0) -> None:
        self.name, self.url, self.api_key_env = model, completions_url(base_url), api_key_env
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, concurrency
        self.backoff, self.max_backoff = backoff, max_backoff
        self.settings = {"temperature": temperature, "max_tokens": max_tokens}
        self.requests_sent = 0  # HTTP requests made, retries included
        self._count_lock = threading.Lock()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, system: str, user: str) -> str:
        """One judgment, retried on transient errors; JudgeFailure when none could be had."""
        body = json.dumps({"model": self.name, "n": 1, **self.settings, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": user}]}).encode()
        error = "no attempt"
        for attempt in range(self.max_retries + 1):
            wait_s = min(self.backoff * 2 ** attempt, self.max_backoff)
            request = urllib.request.Request(self.url, body, self._headers(), method="POST")
            with self._count_lock:
                self.requests_sent += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._redact(_content(response.read()))
            except urllib.error.HTTPError as e:
                if e.code in FATAL_STATUS:  # no response body: it may echo the key
                    raise WmdpError(f"judge endpoint {self.url}: HTTP {e.code}, "
                                    f"{FATAL_STATUS[e.code]}{self._key_hint(e.code)}") from None
                error = f"HTTP {e.code}"
                if e.code not in RETRY_STATUS:
                    raise JudgeFailure(f"{error} ({self._detail(e)})") from None
                retry_after = _seconds(e.headers.get("Retry-After") if e.headers else None)
                wait_s = min(max(wait_s, retry_after or 0.0), self.max_backoff)
            except (TimeoutError, OSError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                error = "timeout" if isinstance(reason, TimeoutError) or "timed out" in str(
                    reason) else f"connection error ({type(reason).__name__})"
            if attempt < self.max_retries:
                time.sleep(wait_s)
        raise JudgeFailure(f"{error} after {self.max_retries + 1} attempts")

    def _key_hint(self, status: int) -> str:
        if status != 401:
            return ""
        if self.api_key_env:
            return f" (the key is read from ${self.api_key_env})"
        return " (no key was sent: give --judge-api-key-env NAME)"

    def _detail(self, e: urllib.error.HTTPError) -> str:
        """The endpoint's error message, one line, short, with the key masked."""
        try:
            raw = e.read().decode("utf-8", "replace")
            message = json.loads(raw).get("error", {}).get("message", raw)
        except (ValueError, AttributeError, OSError):
            message = "no message"
        return self._redact(" ".join(str(message).split()))[:200]

    def _redact(self, text: str) -> str:
        """`text` with the API key masked: an endpoint may echo the request (its Authorization
        header) back, and whatever it returns is stored, cached or printed."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return text.replace(key, "***") if key else text

    def run(self, requests: Sequence[tuple[str, str]], on_result: OnResult) -> None:
        def one(i: int, system: str, user: str) -> None:
            try:
                text, err = self.complete(system, user), None
            except JudgeFailure as e:
                text, err = None, str(e)
            on_result(i, text, err)

        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency))
        try:
            futures = [pool.submit(one, i, s, u) for i, (s, u) in enumerate(requests)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:  # a fatal error (refused key): stop the rest
                    raise f.exception()  # type: ignore[misc]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _content(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeFailure("malformed response (no choices[0].message.content)") from None
    if not isinstance(content, str):
        raise JudgeFailure("malformed response (content is not text)")
    return content


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the exponential backoff stands


class LocalJudge:
    """A judge model in this process (greedy decoding, batched, its own chat template)."""

    def __init__(self, model: Any, tokenizer: Any, name: str, *, max_new_tokens: int = 2048,
                 batch_size: int = 8, chat_template: str | None = None) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size, self.chat_template = batch_size, chat_template
        self.settings = {"temperature": 0.0, "max_tokens": max_new_tokens}

    def _prompt(self, system: str, user: str) -> str:
        try:
            return render_prompt(self.tokenizer, [{"role": "system", "content": system},
                                                  {"role": "user", "content": user}],
                                 self.chat_template)
        except WmdpError:  # a template without a system role: FastChat's merge for such judges
            merged = user if system == "You are a helpful assistant." else \
                f"[Instruction]\n{system}\n\n{user}"
            return render_prompt(self.tokenizer, [{"role": "user", "content": merged}],
                                 self.chat_template)

    def run(self, requests: Sequence[tuple[str, str]], on_result: OnResult) -> None:
        prompts = [self._prompt(s, u) for s, u in requests]
        for start in range(0, len(prompts), self.batch_size):
            replies = generate_batch(self.model, self.tokenizer,
                                     prompts[start:start + self.batch_size], temperature=0.0,
                                     max_new_tokens=self.settings["max_tokens"])
            for i, (text, _, _) in enumerate(replies, start):
                on_result(i, text, None)
