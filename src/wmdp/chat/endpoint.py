"""The judge endpoint's HTTP: httpx2's client, each request bounded as a whole, credentials masked.

httpx2 (the httpx that huggingface_hub already installs) gives the redirect rules: a redirect to
another origin (scheme, host or port) never carries the Authorization header. It bounds each
read, not a request, so a server that trickles a byte a second holds a request for ever; here
every connect, TLS handshake, read and write waits at most what is left of the request's
deadline (`Deadline.within`), across redirects. An http(s) proxy from the environment
(HTTPS_PROXY, NO_PROXY) is honoured, as urllib's was.

Credentials go in headers only: the key in `Authorization: Bearer`, a URL's userinfo
(`https://user:key@host`) in Basic auth, never in a URL that is shown, logged or stored.
`redact_url` and `Redactor` mask them in anything that is.
"""

from __future__ import annotations

import base64
import re
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator

import httpcore2
import httpx2

from wmdp.errors import WmdpError

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*@)")  # scheme://user:pass@...


def redact_url(url: str) -> str:
    """`url` with its userinfo masked (`https://***@host/v1`): what may be shown or stored."""
    return _USERINFO.sub(r"\1***@", url)


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """The URL without its userinfo, and (user, password) percent-decoded, or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    netloc = parts.netloc.rpartition("@")[2]
    auth = (urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or ""))
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), auth


def check_api_key(variable: str, key: str) -> None:
    """A key that fits in a header: printable ASCII, no space. The message never shows it."""
    bad = next((i for i, c in enumerate(key) if not "!" <= c <= "~"), None)
    if bad is not None:
        what = {"\n": "a line break", "\r": "a carriage return", " ": "a space",
                "\t": "a tab"}.get(key[bad], f"character U+{ord(key[bad]):04X}")
        raise WmdpError(f"judge API key: ${variable} holds {what} at position {bad + 1}; a key "
                        "is one line of printable ASCII (check how the variable was set)")


class Redactor:
    """Masks every form of the credentials a request carries: the key, the userinfo's password
    (its user name too when it stands alone: `https://KEY@host`), and the Basic auth value built
    from them (an endpoint may echo the request back)."""

    def __init__(self, key: str | None = None, userinfo: tuple[str, str] | None = None) -> None:
        secrets = [key] if key else []
        if userinfo:
            user, password = userinfo
            secrets += [base64.b64encode(f"{user}:{password}".encode()).decode(),
                        password or user]
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)  # longest first

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _DeadlineStream(httpcore2.NetworkStream):
    def __init__(self, stream: httpcore2.NetworkStream, deadline: Deadline) -> None:
        self._stream, self._deadline = stream, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._deadline.left(timeout, httpcore2.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._deadline.left(timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        left = self._deadline.left(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, left),
                               self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class Deadline(httpcore2.NetworkBackend):
    """httpcore's socket backend, each wait cut to what is left of the calling thread's
    current request (a connection made for one request may serve the next: the deadline is
    looked up at each wait, not fixed when the socket was opened)."""

    def __init__(self) -> None:
        self._backend = httpcore2.SyncBackend()
        self._local = threading.local()

    @contextmanager
    def within(self, seconds: float) -> Iterator[None]:
        self._local.end = time.monotonic() + seconds
        try:
            yield
        finally:
            self._local.end = None

    def left(self, timeout: float | None, error: type[Exception]) -> float | None:
        end = getattr(self._local, "end", None)
        if end is None:
            return timeout
        left = end - time.monotonic()
        if left <= 0:
            raise error("the request's time limit was reached")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Any = None) -> httpcore2.NetworkStream:
        left = self.left(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_tcp(host, port, left, local_address,
                                                         socket_options), self)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore2.NetworkStream:
        left = self.left(timeout, httpcore2.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, left, socket_options),
                               self)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


# httpcore's errors as httpx's (what httpx2's own transport does); the bases come last
_ERRORS: tuple[tuple[type[Exception], type[Exception]], ...] = (
    (httpcore2.ConnectTimeout, httpx2.ConnectTimeout), (httpcore2.ReadTimeout, httpx2.ReadTimeout),
    (httpcore2.WriteTimeout, httpx2.WriteTimeout), (httpcore2.PoolTimeout, httpx2.PoolTimeout),
    (httpcore2.ConnectError, httpx2.ConnectError), (httpcore2.ReadError, httpx2.ReadError),
    (httpcore2.WriteError, httpx2.WriteError), (httpcore2.ProxyError, httpx2.ProxyError),
    (httpcore2.UnsupportedProtocol, httpx2.UnsupportedProtocol),
    (httpcore2.RemoteProtocolError, httpx2.RemoteProtocolError),
    (httpcore2.LocalProtocolError, httpx2.LocalProtocolError),
    (httpcore2.TimeoutException, httpx2.TimeoutException),
    (httpcore2.NetworkError, httpx2.NetworkError), (httpcore2.ProtocolError, httpx2.ProtocolError))


@contextmanager
def _as_httpx(request: httpx2.Request) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        for core, mapped in _ERRORS:
            if isinstance(e, core):
                raise mapped(str(e), request=request) from None
        raise


class _Body(httpx2.SyncByteStream):
    def __init__(self, response: httpcore2.Response, request: httpx2.Request) -> None:
        self._response, self._request = response, request

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx(self._request):
            yield from self._response.iter_stream()

    def close(self) -> None:
        self._response.close()


class _Transport(httpx2.BaseTransport):
    """httpx2's transport over an httpcore2 pool that uses the deadline backend."""

    def __init__(self, url: str, deadline: Deadline) -> None:
        self._pool = httpcore2.ConnectionPool(ssl_context=httpx2.create_ssl_context(),
                                              proxy=_environment_proxy(url),
                                              network_backend=deadline)

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        core = httpcore2.Request(method=request.method, url=httpcore2.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions)
        with _as_httpx(request):
            response = self._pool.handle_request(core)
        return httpx2.Response(response.status, headers=response.headers,
                               stream=_Body(response, request), extensions=response.extensions)

    def close(self) -> None:
        self._pool.close()


def _environment_proxy(url: str) -> httpcore2.Proxy | None:
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    if urllib.parse.urlsplit(proxy).scheme not in ("http", "https"):
        raise WmdpError(f"the {parts.scheme} proxy {redact_url(proxy)} set in the environment is "
                        "not an http(s) proxy, the only kind the judge client speaks")
    p = httpx2.Proxy(proxy)  # its userinfo becomes Proxy-Authorization
    return httpcore2.Proxy(str(p.url), auth=p.raw_auth, headers=p.headers.raw)


def bounded_client(url: str, timeout: float) -> tuple[httpx2.Client, Deadline]:
    """A client for requests to `url` (redirects followed by httpx2's rules), and the deadline
    each request is made within: `with deadline.within(s): client.post(...)`."""
    deadline = Deadline()
    client = httpx2.Client(transport=_Transport(url, deadline), follow_redirects=True,
                           timeout=httpx2.Timeout(timeout))
    return client, deadline
