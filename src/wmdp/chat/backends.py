"""Judges: an OpenAI-compatible chat-completions endpoint, or a local HF model; a judgment cache.

The endpoint client is httpx2's (see `endpoint`): redirects follow its rules, so credentials
never reach another origin, and each request is bounded as a whole (`timeout`), however
slowly the server sends. The API key is read from the environment variable whose NAME is
configured and sent in the Authorization header only; a URL's userinfo is sent as Basic auth;
neither is ever logged, written, or part of an error message (an echo from the server is
masked). Transient failures (timeouts, connection errors, HTTP 408/409/429/5xx) are retried with
exponential backoff (honouring Retry-After); a judgment that still fails is reported as failed,
not dropped. A refused key or a wrong URL (HTTP 401/403/404) stops the run at once, with one
line; `check_access` finds a refused key before anything is generated or written.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import httpx2

from wmdp.chat.endpoint import Redactor, bounded_client, check_api_key, redact_url, split_userinfo
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
        for rec in self._records(self.path):
            self._entries[rec["key"]] = rec["judgment"]
        # a last line cut short by an interrupted run is dropped, so appending goes on cleanly
        if self.path.is_file() and (data := self.path.read_bytes()) and not data.endswith(b"\n"):
            self.path.write_bytes(data[:data.rfind(b"\n") + 1])

    @staticmethod
    def _records(path: Path) -> list[dict]:
        """The cache's records; an existing file that is not a judge cache is refused (it is
        appended to), except for a last line cut short by an interrupted run (judged again)."""
        if not path.is_file():
            return []
        try:
            lines = path.read_bytes().splitlines()
        except OSError as e:
            raise WmdpError(f"{path}: cannot read the judge cache ({e.strerror or e})") from None
        records = []
        for lineno, raw in enumerate(lines, 1):
            try:
                rec = json.loads(raw)
                if isinstance(rec.get("key"), str) and isinstance(rec.get("judgment"), str):
                    records.append(rec)
                    continue
            except (ValueError, AttributeError):
                pass
            cut_short = lineno == len(lines) and raw.startswith(b'{"key": "')
            if raw.strip() and not cut_short:
                raise WmdpError(f"{path} line {lineno}: not a judge cache record (key, judgment); "
                                "the judge cache is written to: give a new file or a judge cache")
        return records

    @classmethod
    def check(cls, path: str | Path) -> None:
        """Before anything is written: `path` can be read as a cache and appended to."""
        path = Path(path)
        if path.exists():
            mode = path.stat().st_mode
            if stat.S_ISDIR(mode):
                raise WmdpError(f"{path}: the judge cache is a directory; give a file path")
            if not stat.S_ISREG(mode):
                raise WmdpError(f"{path}: the judge cache is not a regular file")
            if not mode & 0o222 or not os.access(path, os.W_OK):
                raise WmdpError(f"{path}: the judge cache is read-only")
            cls._records(path)
            try:
                open(path, "ab").close()  # no byte written, nothing changed
            except OSError as e:
                raise WmdpError(f"{path}: cannot write the judge cache "
                                f"({e.strerror or e})") from None
            return
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir():
            raise WmdpError(f"{path}: cannot create the judge cache ({parent} is not a directory)")
        try:
            if not parent.stat().st_mode & 0o222:
                raise PermissionError(13, "Read-only directory")
            fd, probe = tempfile.mkstemp(dir=parent, prefix=".wmdp-write-test.")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise WmdpError(f"{path}: cannot create the judge cache in {parent} "
                            f"({e.strerror or e})") from None

    @staticmethod
    def key(judge: str, system: str, user: str, settings: dict) -> str:
        return sha256_json({"judge": judge, "system": system, "user": user, **settings})

    def get(self, key: str) -> str | None:
        return self._entries.get(key)

    def put(self, key: str, judge: str, judgment: str) -> None:
        with self._lock:
            self._entries[key] = judgment
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "judge": judge, "judgment": judgment}) + "\n")
            except OSError as e:
                raise WmdpError(f"{self.path}: cannot write the judge cache "
                                f"({e.strerror or e})") from None


def completions_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


class ChatCompletionsJudge:
    """A judge behind an OpenAI-compatible `POST {base_url}/chat/completions`."""

    def __init__(self, model: str, base_url: str, api_key_env: str | None = None,
                 *, timeout: float = 120.0, max_retries: int = 5, backoff: float = 2.0,
                 max_backoff: float = 60.0, concurrency: int = 8, max_tokens: int = 2048,
                 temperature: float = 0.0) -> None:
        url, userinfo = split_userinfo(completions_url(base_url))
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            check_api_key(api_key_env or "", key)
        self.name, self.url, self.api_key_env = model, url, api_key_env
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, concurrency
        self.backoff, self.max_backoff = backoff, max_backoff
        self.settings = {"temperature": temperature, "max_tokens": max_tokens}
        self.requests_sent = 0  # chat-completions requests made, retries included
        self._count_lock = threading.Lock()
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._auth = httpx2.BasicAuth(*userinfo) if userinfo else None
        self._redact = Redactor(key, userinfo)
        self._client, self._deadline = bounded_client(url, timeout)

    def close(self) -> None:
        self._client.close()

    def _send(self, method: str, url: str, body: bytes | None = None) -> httpx2.Response:
        """One request, redirects included, within `timeout` seconds in all."""
        headers = {**self._headers, **({"Content-Type": "application/json"} if body else {})}
        with self._deadline.within(self.timeout):
            return self._client.request(method, url, content=body, headers=headers,
                                        auth=self._auth)

    def check_access(self) -> None:
        """Before anything is written: a key the endpoint refuses stops the run here. Asks
        `GET {base}/models` (free; OpenAI's and vLLM's have it); any answer but 401/403, or
        none, says nothing, and the judgments will tell."""
        url = self.url.removesuffix("/chat/completions") + "/models"
        try:
            response = self._send("GET", url)
        except (httpx2.HTTPError, httpx2.InvalidURL):
            return
        if response.status_code in (401, 403):
            raise WmdpError(self._fatal(response))

    def complete(self, system: str, user: str) -> str:
        """One judgment, retried on transient errors; JudgeFailure when none could be had."""
        body = json.dumps({"model": self.name, "n": 1, **self.settings, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": user}]}).encode()
        error = "no attempt"
        for attempt in range(self.max_retries + 1):
            wait_s = min(self.backoff * 2 ** attempt, self.max_backoff)
            with self._count_lock:
                self.requests_sent += 1
            try:
                response = self._send("POST", self.url, body)
            except httpx2.TimeoutException:
                error = f"timeout ({self.timeout:g} s)"
            except (httpx2.TooManyRedirects, httpx2.UnsupportedProtocol, httpx2.InvalidURL) as e:
                raise WmdpError(f"judge endpoint {redact_url(self.url)}: "
                                f"{self._redact(' '.join(str(e).split()))[:200]}") from None
            except httpx2.HTTPError as e:
                error = f"connection error ({type(e).__name__})"
            else:
                if response.is_success:
                    return self._redact(_content(response.content))
                if response.status_code in FATAL_STATUS:
                    raise WmdpError(self._fatal(response))
                error = f"HTTP {response.status_code}"
                if response.status_code not in RETRY_STATUS:
                    raise JudgeFailure(f"{error} ({self._detail(response)})")
                retry_after = _seconds(response.headers.get("Retry-After"))
                wait_s = min(max(wait_s, retry_after or 0.0), self.max_backoff)
            if attempt < self.max_retries:
                time.sleep(wait_s)
        n = self.max_retries + 1
        raise JudgeFailure(f"{error} after {n} attempt{'s' if n > 1 else ''}")

    def _fatal(self, response: httpx2.Response) -> str:
        """One line for a refusal (no response body: it may echo the key)."""
        status, where = response.status_code, redact_url(self.url)
        final = self._redact(redact_url(str(response.url)))
        moved = _origin(str(response.url)) != _origin(self.url)
        if moved and status in (401, 403) and (self._headers or self._auth):
            return (f"judge endpoint {where} redirected to {final}, which answered HTTP {status}: "
                    "credentials are never sent to another origin (give that URL as "
                    "--judge-base-url if you trust it)")
        via = f" (redirected to {final})" if moved else ""
        return (f"judge endpoint {where}{via}: HTTP {status}, {FATAL_STATUS[status]}"
                f"{self._key_hint(status)}")

    def _key_hint(self, status: int) -> str:
        if status != 401:
            return ""
        if self.api_key_env:
            return f" (the key is read from ${self.api_key_env})"
        if self._auth is not None:
            return " (the key is the URL's user:password)"
        return " (no key was sent: give --judge-api-key-env NAME)"

    def _detail(self, response: httpx2.Response) -> str:
        """The endpoint's error message, one line, short, with the key masked."""
        raw = response.content.decode("utf-8", "replace")
        try:
            message = json.loads(raw).get("error", {}).get("message", raw)
        except (ValueError, AttributeError):
            message = raw
        return self._redact(" ".join(str(message).split()))[:200]

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


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, parts.hostname, parts.port or default


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
