"""The judge endpoint as an adversary: servers on loopback that redirect to another origin, echo
the key, or trickle a byte at a time; keys with a line break or in the URL's userinfo; judge
caches that cannot or must not be written; chat templates that fail to render.

Every case runs `wmdp chat-eval` and checks what every bad input must give: no key in stdout,
stderr or any file written, every input byte-identical, and where it is an error one line, exit 2,
and no output directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from test_chat import chat_model  # noqa: F401 - the tiny chat model fixture
from wmdp.chat.backends import ChatCompletionsJudge, JudgeFailure
from wmdp.chat.endpoint import redact_url
from wmdp.cli import main
from wmdp.errors import WmdpError

KEY = "sk-sec-0123456789-abcdefKEY"
USER, PASSWORD = "judge-user", "pw-0123456789-USERINFO"


def completion(content: str) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps({"choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


def error(status: int, message: str) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(
        {"error": {"message": message}}).encode()


class Server:
    """HTTP on 127.0.0.1 in a thread. `handle(method, path, headers)` gives (status, headers,
    body); every request is recorded with its Authorization header. `trickle`: seconds between
    the bytes of each response, from its status line on (or from its body on: `body_only`)."""

    def __init__(self, handle, trickle: float = 0.0, body_only: bool = False) -> None:
        self.seen: list[dict] = []
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                server.seen.append({"method": self.command, "path": self.path, "body": body,
                                    "auth": self.headers.get("Authorization")})
                status, headers, payload = handle(self.command, self.path, self.headers)
                head = f"HTTP/1.0 {status} X\r\n" + "".join(
                    f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": len(payload)}.items())
                head = head.encode() + b"\r\n"
                at_once = head + payload if not trickle else head if body_only else b""
                slowly = (head + payload)[len(at_once):]
                self.close_connection = True
                try:
                    self.wfile.write(at_once)
                    for i in range(len(slowly)):
                        if server.stop.wait(trickle):
                            return
                        self.wfile.write(slowly[i:i + 1])
                except OSError:
                    pass  # the client gave up

            do_GET = do_POST = _serve  # noqa: N815 - http.server's names

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.origin + "/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(handle, trickle: float = 0.0, body_only: bool = False) -> Server:
        servers.append(Server(handle, trickle, body_only))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def rating(method, path, headers):
    return completion("Fine. Rating: [[7]]")


def snapshot(*roots: Path) -> dict[str, str]:
    files = {}
    for root in roots:
        for p in ([root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []):
            if p.is_file():
                files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def chat_eval(capsys, tmp_path, model, url, *flags, env_key=None, inputs=(), late=False):
    """Run `wmdp chat-eval` once; check what holds for every case; (code, stdout, stderr).
    `late`: an error found after the answers were made, so progress lines come before it."""
    out = tmp_path / "out"
    watched = [model, *inputs]
    before = snapshot(*watched)
    args = ["chat-eval", "--model", str(model), "--judge", "openai:judge", "--judge-base-url",
            url, "--output", str(out), "--limit", "1", "--max-new-tokens", "2", "--dtype",
            "float32", "--judge-retries", "0", "--judge-timeout", "5", *flags]
    if env_key is not None:
        os.environ["WMDP_JUDGE_SEC_KEY"] = env_key
        args += ["--judge-api-key-env", "WMDP_JUDGE_SEC_KEY"]
    try:
        code = main(args)
    finally:
        os.environ.pop("WMDP_JUDGE_SEC_KEY", None)
    stdout, stderr = capsys.readouterr()
    assert snapshot(*watched) == before  # every input byte-identical
    secrets = [s for s in (KEY, PASSWORD, env_key) if s]
    secrets += [part for s in secrets for part in s.split("\n") if len(part) > 4]
    written = "".join(p.read_text(errors="replace")  # the output, a cache beside it
                      for p in tmp_path.rglob("*") if p.is_file())
    for secret in secrets:
        assert secret not in stdout + stderr + written
    assert "Traceback" not in stderr
    wmdp_lines = [line for line in stderr.splitlines() if line.startswith("wmdp:")]
    if code != 0:
        lines = stderr.splitlines()
        progress = [line for line in lines[:-1] if re.match(r"(answers|judging .*): \d+/", line)]
        assert code == 2 and lines[-1:] == wmdp_lines, stderr
        assert len(lines) == 1 or late and progress == lines[:-1], stderr
        assert not out.exists() or not any(out.iterdir())  # nothing left behind
    return code, stdout, stderr


def results(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "chat_results.json").read_text())


def judgments(tmp_path) -> list[dict]:
    lines = (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# --- redirects: credentials stay with their origin -------------------------------------------

def test_a_redirect_to_another_origin_gets_no_key(capsys, tmp_path, chat_model, serve):
    other = serve(rating)                                            # another port: another origin
    judge = serve(lambda m, path, h: (307, {"Location": other.origin + path}, b""))
    code, _, err = chat_eval(capsys, tmp_path, chat_model, judge.url, env_key=KEY)
    assert code == 0, err
    assert [s["auth"] for s in judge.seen] == [f"Bearer {KEY}"] * 3     # /models, two turns
    assert len(other.seen) == 3 and {s["auth"] for s in other.seen} == {None}
    assert [j["score"] for j in judgments(tmp_path)] == [7.0, 7.0]


def test_a_redirect_within_the_origin_keeps_the_key(capsys, tmp_path, chat_model, serve):
    """The control: the same server, another path; the key goes with it."""
    def handle(method, path, headers):
        if path.startswith("/v1/"):
            return 307, {"Location": path.replace("/v1/", "/v2/")}, b""
        return rating(method, path, headers)

    judge = serve(handle)
    code, _, err = chat_eval(capsys, tmp_path, chat_model, judge.url, env_key=KEY)
    assert code == 0, err
    assert [(s["path"], s["auth"]) for s in judge.seen if s["path"].startswith("/v2/")] == [
        ("/v2/models", f"Bearer {KEY}")] + [("/v2/chat/completions", f"Bearer {KEY}")] * 2


def test_a_redirect_to_an_origin_that_wants_a_key_is_one_line(capsys, tmp_path, chat_model,
                                                              serve):
    other = serve(lambda m, p, headers: rating(m, p, headers) if headers.get("Authorization")
                  else error(401, "no key"))
    judge = serve(lambda m, path, h: (308, {"Location": other.origin + path}, b""))
    code, _, err = chat_eval(capsys, tmp_path, chat_model, judge.url, env_key=KEY)
    assert code == 2
    assert err == (f"wmdp: judge endpoint {judge.url}/chat/completions redirected to "
                   f"{other.url}/models, which answered HTTP 401: credentials are never sent to "
                   "another origin (give that URL as --judge-base-url if you trust it)\n")
    assert {s["auth"] for s in other.seen} == {None}


# --- echoes: whatever the server sends back, the key is masked ------------------------------

def echo_key(status):
    def handle(method, path, headers):
        return error(status, f"Incorrect API key provided: {headers.get('Authorization')} "
                             f"({KEY})")
    return handle


@pytest.mark.parametrize("credentials", ["env", "userinfo"])
def test_a_refused_key_echoed_back_is_one_line_before_anything_is_written(
        capsys, tmp_path, chat_model, serve, credentials):
    judge = serve(echo_key(401))
    if credentials == "env":
        code, _, err = chat_eval(capsys, tmp_path, chat_model, judge.url, env_key=KEY)
        hint = "(the key is read from $WMDP_JUDGE_SEC_KEY)"
    else:
        url = judge.url.replace("http://", f"http://{USER}:{PASSWORD}@")
        code, _, err = chat_eval(capsys, tmp_path, chat_model, url)
        hint = "(the key is the URL's user:password)"
    assert code == 2
    assert err == (f"wmdp: judge endpoint {judge.url}/chat/completions: HTTP 401, the key was "
                   f"refused {hint}\n")
    assert [s["path"] for s in judge.seen] == ["/v1/models"]  # no answer generated, no judgment


@pytest.mark.parametrize("models", [200, 404])
def test_a_key_refused_only_when_judging_leaves_no_output(capsys, tmp_path, chat_model, serve,
                                                          models):
    """An endpoint whose /models takes any key (or has none): the refusal comes after the
    answers were made, and the failed run's output is removed."""
    judge = serve(lambda m, path, h: (rating(m, path, h) if models == 200 else error(404, "no"))
                  if path.endswith("/models") else echo_key(401)(m, path, h))
    code, _, err = chat_eval(capsys, tmp_path, chat_model, judge.url, env_key=KEY, late=True)
    assert code == 2 and err.splitlines()[-1].startswith(
        f"wmdp: judge endpoint {judge.url}/chat/completions: HTTP 401, the key was refused"), err
    assert not (tmp_path / "out").exists()


def test_an_error_body_echoing_the_key_is_masked_in_the_judgments(capsys, tmp_path, chat_model,
                                                                  serve):
    judge = serve(lambda m, path, h: rating(m, path, h) if path.endswith("/models")
                  else echo_key(422)(m, path, h))
    code, _, err = chat_eval(capsys, tmp_path, chat_model, judge.url, env_key=KEY)
    assert code == 0
    assert [j["error"] for j in judgments(tmp_path)] == [
        "HTTP 422 (Incorrect API key provided: Bearer *** (***))"] * 2


# --- userinfo: Basic auth on the wire, masked everywhere else --------------------------------

def test_userinfo_is_sent_as_basic_auth_and_stored_masked(capsys, tmp_path, chat_model, serve):
    def echo(method, path, headers):
        return completion(f"You sent {headers.get('Authorization')}. Rating: [[6]]")

    judge = serve(echo)
    url = judge.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    code, _, err = chat_eval(capsys, tmp_path, chat_model, url)
    assert code == 0, err
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert {s["auth"] for s in judge.seen} == {f"Basic {basic}"}
    assert results(tmp_path)["config"]["judge"]["base_url"] == judge.url.replace(
        "http://", "http://***@")
    assert [j["judgment"] for j in judgments(tmp_path)] == ["You sent Basic ***. Rating: [[6]]"] * 2


def test_userinfo_does_not_follow_a_redirect_to_another_origin(capsys, tmp_path, chat_model,
                                                               serve):
    other = serve(rating)
    judge = serve(lambda m, path, h: (302 if m == "GET" else 307,
                                      {"Location": other.origin + path}, b""))
    url = judge.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    code, _, err = chat_eval(capsys, tmp_path, chat_model, url)
    assert code == 0, err
    assert judge.seen[0]["auth"].startswith("Basic ") and {s["auth"] for s in other.seen} == {None}


@pytest.mark.parametrize("url,expected", [
    ("http://{u}:{p}@127.0.0.1:9/v1", "holds credentials (user:key@) and --judge-api-key-env"),
    ("ftp://{u}:{p}@127.0.0.1:9/v1", "'ftp://***@127.0.0.1:9/v1' is not an http(s) URL"),
    ("http://{u}:{p}@127.0.0.1:9/v1\nX", "'http://***@127.0.0.1:9/v1\\nX' is not an http(s) URL"),
])
def test_a_bad_url_with_userinfo_is_one_line_masked(capsys, tmp_path, chat_model, url, expected):
    code, _, err = chat_eval(capsys, tmp_path, chat_model, url.format(u=USER, p=PASSWORD),
                             env_key=KEY)
    assert code == 2 and expected in err, err


def test_redact_url():
    assert redact_url("https://u:k@host:8/v1?q=1") == "https://***@host:8/v1?q=1"
    assert redact_url("https://k@host/v1") == "https://***@host/v1"
    assert redact_url("https://host/v1/a@b") == "https://host/v1/a@b"  # a path's @ is no userinfo


# --- a key that cannot be a header ------------------------------------------------------------

@pytest.mark.parametrize("key,what", [
    ("sk-abcdef\nghijklmn", "a line break at position 10"),
    ("sk-abcdef\r\nX-Evil: 1", "a carriage return at position 10"),
    ("sk-abcdef ghijklmn", "a space at position 10"),
    ("sk-abcdéfghijklmn", "character U+00E9 at position 8"),
])
def test_a_key_that_is_no_header_is_one_line_that_never_shows_it(capsys, tmp_path, chat_model,
                                                                 serve, key, what):
    judge = serve(rating)
    code, _, err = chat_eval(capsys, tmp_path, chat_model, judge.url, env_key=key)
    assert code == 2
    assert err == (f"wmdp: judge API key: $WMDP_JUDGE_SEC_KEY holds {what}; a key is one line "
                   "of printable ASCII (check how the variable was set)\n")
    assert judge.seen == []
    os.environ["WMDP_JUDGE_SEC_KEY"] = key
    try:
        with pytest.raises(WmdpError, match="holds"):  # the library refuses it too
            ChatCompletionsJudge("judge", judge.url, "WMDP_JUDGE_SEC_KEY")
    finally:
        del os.environ["WMDP_JUDGE_SEC_KEY"]


# --- a server that trickles: the whole request is bounded ---------------------------------------

@pytest.mark.parametrize("body_only", [False, True])
def test_a_trickling_server_fails_the_request_within_its_timeout(serve, body_only):
    """20 bytes a second: every read is quick, and a read timeout alone would wait ~20 s."""
    judge = serve(lambda m, p, h: completion("Rating: [[5]]" + " " * 300), trickle=0.05,
                  body_only=body_only)
    client = ChatCompletionsJudge("judge", judge.url, None, timeout=0.5, max_retries=1,
                                  backoff=0.01)
    t0 = time.perf_counter()
    with pytest.raises(JudgeFailure, match=re.escape("timeout (0.5 s) after 2 attempts")):
        client.complete("s", "u")
    assert time.perf_counter() - t0 < 1.5 and len(judge.seen) == 2


def test_chat_eval_against_a_trickling_server_ends_with_failed_judgments(capsys, tmp_path,
                                                                         chat_model, serve):
    judge = serve(rating, trickle=0.1)  # ~150 bytes a response: 15 s each
    t0 = time.perf_counter()
    code, stdout, err = chat_eval(capsys, tmp_path, chat_model, judge.url, "--judge-timeout", "1")
    assert code == 0 and time.perf_counter() - t0 < 10
    assert [j["error"] for j in judgments(tmp_path)] == ["timeout (1 s) after 1 attempt"] * 2
    assert results(tmp_path)["failed"] == 2
    assert [line for line in err.splitlines() if line.startswith("wmdp:")] == [
        "wmdp: chat-eval: 2 of 2 judgments failed (first: timeout (1 s) after 1 attempt); "
        "rerun the same command to ask them again"]


# --- the judge cache: an output that must be writable and never an input ---------------------

def _cache_cases(tmp_path: Path, model: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "a-dir").mkdir()
    read_only = tmp_path / "ro.jsonl"
    read_only.write_text("")
    read_only.chmod(0o444)
    (tmp_path / "ro-dir").mkdir()
    (tmp_path / "ro-dir").chmod(0o555)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nline two\n")
    (tmp_path / "one-line.txt").write_text("one line, no newline")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "writing",
                                     "turns": ["Hi?", "More?"]}) + "\n")
    return {
        "a directory": (tmp_path / "a-dir", "the judge cache is a directory; give a file path"),
        "read-only": (read_only, "the judge cache is read-only"),
        "in a read-only directory": (tmp_path / "ro-dir" / "c.jsonl", "cannot create the judge "
                                     "cache in"),
        "the model's config.json": (model / "config.json", "lies inside the input"),
        "a new file in the model": (model / "judge_cache.jsonl", "lies inside the input"),
        "the questions": (questions, "is the input"),
        "the run's answers": (tmp_path / "out" / "answers.jsonl", "is one of the run's own files"),
        "not a cache": (notes, "line 1: not a judge cache record"),
        "a one-line file": (tmp_path / "one-line.txt", "line 1: not a judge cache record"),
    }


@pytest.mark.parametrize("case", ["a directory", "read-only", "in a read-only directory",
                                  "the model's config.json", "a new file in the model",
                                  "the questions", "the run's answers", "not a cache",
                                  "a one-line file"])
def test_an_unusable_judge_cache_is_one_line_and_nothing_written(capsys, tmp_path, chat_model,
                                                                 serve, case):
    cache, expected = _cache_cases(tmp_path, chat_model)[case]
    judge = serve(rating)
    questions = tmp_path / "questions.jsonl"
    code, _, err = chat_eval(capsys, tmp_path, chat_model, judge.url, "--judge-cache", str(cache),
                             "--questions", str(questions), inputs=[
        tmp_path / "notes.txt", tmp_path / "one-line.txt", tmp_path / "ro.jsonl", questions])
    assert code == 2 and expected in err, err
    assert judge.seen == [] and not (chat_model / "judge_cache.jsonl").exists()


def test_a_judge_cache_cut_short_by_an_interrupted_run_is_kept(capsys, tmp_path, chat_model,
                                                               serve):
    cache = tmp_path / "cache.jsonl"
    cache.write_text('{"key": "k", "judgment": "[[3]]"}\n{"key": "k2", "judg')
    judge = serve(rating)
    code, _, err = chat_eval(capsys, tmp_path, chat_model, judge.url, "--judge-cache", str(cache))
    assert code == 0, err
    # the line cut short is dropped (appending to it would corrupt the next record), the whole
    # record kept, and every line of the cache reads as a record again
    text = cache.read_text()
    assert text.startswith('{"key": "k", "judgment": "[[3]]"}\n') and '"judg\n' not in text
    assert all(json.loads(line)["key"] for line in text.splitlines())
    code, _, err = chat_eval(capsys, tmp_path, chat_model, judge.url, "--judge-cache", str(cache),
                             "--overwrite")
    assert code == 0, err  # a second run reads it


# --- a chat template that cannot render: refused before any answer is made --------------------

@pytest.mark.parametrize("template,flags,expected", [
    # turn 2 only (the assistant's first answer in the conversation): before, turn 1 ran first
    ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no "
     "multi-turn') }}{% endif %}{{ m['content'] }}{% endfor %}", [],
     "question 1, turn 2: cannot render the chat template: no multi-turn"),
    ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role "
     "not supported') }}{% endif %}{{ m['content'] }}{% endfor %}",
     ["--system-prompt", "Be brief."],
     "question 1, turn 1: cannot render the chat template: System role not supported"),
    ("{{ messages | no_such_filter }}", [], "cannot render the chat template: No filter named"),
])
def test_a_chat_template_that_fails_to_render_leaves_nothing(capsys, tmp_path, chat_model, serve,
                                                             template, flags, expected):
    path = tmp_path / "template.jinja"
    path.write_text(template)
    judge = serve(rating)
    code, _, err = chat_eval(capsys, tmp_path, chat_model, judge.url, "--chat-template",
                             str(path), *flags, env_key=KEY, inputs=[path])
    assert code == 2 and expected in err, err
    assert judge.seen == []


# --- a proxy from the environment, as urllib honoured it ---------------------------------------

def test_an_http_proxy_from_the_environment_is_used_and_no_proxy_bypasses_it(serve, monkeypatch):
    judge = serve(lambda m, path, h: completion(f"direct {path}"))
    proxy = serve(lambda m, target, h: completion(f"proxied {target}"))  # absolute-form target
    for name in ("http_proxy", "NO_PROXY", "no_proxy"):  # lower case wins over upper in urllib
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.origin)
    client = ChatCompletionsJudge("judge", judge.url, None, timeout=2, max_retries=0)
    assert client.complete("s", "u") == f"proxied {judge.url}/chat/completions"
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = ChatCompletionsJudge("judge", judge.url, None, timeout=2, max_retries=0)
    assert client.complete("s", "u") == "direct /v1/chat/completions"
    monkeypatch.setenv("HTTP_PROXY", f"socks5://{USER}:{PASSWORD}@127.0.0.1:1")
    monkeypatch.delenv("NO_PROXY")
    with pytest.raises(WmdpError, match=r"proxy socks5://\*\*\*@127.0.0.1:1 .* not an http\(s\)"):
        ChatCompletionsJudge("judge", judge.url, None)
