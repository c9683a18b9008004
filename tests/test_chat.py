"""Judged chat: questions, chat-template generation on a tiny model, MT-Bench's rating parser,
the judge client against a chat-completions server on loopback, and `wmdp chat-eval`."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import MISTRAL_TOK, save_tiny_model
from wmdp.chat import generate as gen
from wmdp.chat.backends import ChatCompletionsJudge, JudgeFailure, JudgmentCache, LocalJudge
from wmdp.chat.judge import chat_scores, judge_answers, judge_spec
from wmdp.chat.prompts import JUDGE_PROMPTS, judge_messages, parse_rating
from wmdp.chat.questions import CATEGORIES, Question, load_questions
from wmdp.cli import main
from wmdp.errors import WmdpError
from wmdp.models import load_model

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SECRET = "sk-test-0123456789-secret"


# --- a chat-completions server on loopback -------------------------------------------------

class FakeEndpoint:
    """Speaks POST /v1/chat/completions; `reply(body, n)` gives (status, content, delay_s)."""

    def __init__(self, reply):
        self.reply, self.requests, self.lock = reply, [], threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.requests.append({"path": self.path, "body": body,
                                              "auth": self.headers.get("Authorization")})
                    n = len(endpoint.requests)
                status, content, delay = endpoint.reply(body, n)
                time.sleep(delay)
                payload = json.dumps({"id": f"c{n}", "object": "chat.completion", "choices": [
                    {"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}]} if status == 200
                    else {"error": {"message": content}}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def rating_by_turn(body, n):
    """A judge that gives 8 to turn 1 and 6 to turn 2, in MT-Bench's words."""
    user = body["messages"][-1]["content"]
    return 200, ("Helpful and correct. Rating: [[6]]" if "### Assistant A:" in user
                 else "Fine answer. [[8]]"), 0.0


def client(url, **kw):
    kw = {"timeout": 5.0, "max_retries": 2, "backoff": 0.01, "concurrency": 4, **kw}
    return ChatCompletionsJudge("judge-model", url, "WMDP_TEST_JUDGE_KEY", **kw)


def two_questions() -> list[Question]:
    return [Question(1, "writing", ("Write a haiku.", "Now make it rhyme.")),
            Question(2, "math", ("What is 2+2?", "And 3+3?"), ("4", "6"))]


def answers_for(questions) -> dict:
    return {q.question_id: {"question_id": q.question_id,
                            "choices": [{"index": 0, "turns": [f"answer {q.question_id}.{t}"
                                                               for t in (1, 2)]}]}
            for q in questions}


# --- the rating parser and the judge's prompts ----------------------------------------------

@pytest.mark.parametrize("text,rating", [
    ("The answer is accurate. Rating: [[7]]", 7.0),
    ("[[8.5]]", 8.5),
    ("Good.\n\nRating: [[10]]", 10.0),
    ("I would rate it [6] overall.", 6.0),            # FastChat's fallback pattern
    ("See [1]. Final verdict: Rating: [[4]]", 4.0),    # [[N]] wins over an earlier [N]
    ("[[3]] at first, then [[9]]", 3.0),               # the first match, as re.search
    ("Rating: 7/10", None),
    ("Rating: [[ 7 ]]", None),
    ("[[11]]", None),                                  # outside 1-10: not averaged in
    ("[[0]]", None),
    ("", None),
])
def test_parse_rating_mt_bench_formats(text, rating):
    assert parse_rating(text) == rating


def test_judge_prompts_are_mt_bench_verbatim():
    # sha256 of FastChat's judge_prompts.jsonl entries (system_prompt + "\x00" + prompt_template)
    digest = {n: hashlib.sha256((p.system_prompt + "\x00" + p.prompt_template).encode())
              .hexdigest()[:16] for n, p in JUDGE_PROMPTS.items()}
    assert digest == PINNED_PROMPT_DIGESTS


PINNED_PROMPT_DIGESTS = {
    "single-v1": "7d276fe1d4b3f18f", "single-math-v1": "226191a3df0fe7a9",
    "single-v1-multi-turn": "a91a5b4266b4e377", "single-math-v1-multi-turn": "572e584361120697"}


def test_judge_messages_turns_and_references():
    writing, math_q = two_questions()
    name, system, user = judge_messages(writing, ["A1", "A2"], 1)
    assert name == "single-v1" and system == "You are a helpful assistant."
    assert "[Question]\nWrite a haiku.\n\n[The Start of Assistant's Answer]\nA1\n" in user
    name, system, user = judge_messages(writing, ["A1", "A2"], 2)
    assert name == "single-v1-multi-turn" and "second user question" in system
    assert user.index("Write a haiku.") < user.index("A1") < user.index("Now make it rhyme.") \
        < user.index("A2")
    name, _, user = judge_messages(math_q, ["four", "six"], 1)
    assert name == "single-math-v1" and "[The Start of Reference Answer]\n4\n" in user
    name, _, user = judge_messages(math_q, ["four", "six"], 2)
    assert name == "single-math-v1-multi-turn"
    assert "### Reference answer:\n4\n" in user and "### Reference answer:\n6\n" in user
    no_ref = Question(3, "coding", ("Write code.", "More."))
    assert judge_messages(no_ref, ["a", "b"], 1)[0] == "single-v1"  # no reference to show


def test_judge_spec():
    assert judge_spec("openai:gpt-4o") == ("openai", "gpt-4o")
    assert judge_spec("hf:runs/judge") == ("hf", "runs/judge")
    assert judge_spec("meta-llama/Llama-3.1-70B-Instruct") == \
        ("openai", "meta-llama/Llama-3.1-70B-Instruct")
    assert judge_spec("none") == ("none", None)
    with pytest.raises(WmdpError, match="name a model"):
        judge_spec("hf:")


# --- the judge client against a real server -------------------------------------------------

def test_client_speaks_chat_completions_with_the_key(monkeypatch):
    monkeypatch.setenv("WMDP_TEST_JUDGE_KEY", SECRET)
    with FakeEndpoint(rating_by_turn) as ep:
        assert client(ep.url).complete("sys", "question") == "Fine answer. [[8]]"
    r = ep.requests[0]
    assert r["path"] == "/v1/chat/completions" and r["auth"] == f"Bearer {SECRET}"
    assert r["body"]["model"] == "judge-model" and r["body"]["temperature"] == 0.0
    assert r["body"]["max_tokens"] == 2048
    assert r["body"]["messages"] == [{"role": "system", "content": "sys"},
                                     {"role": "user", "content": "question"}]


def test_key_goes_only_where_asked(monkeypatch, tmp_path):
    from wmdp.chat.judge import JudgeConfig

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert JudgeConfig(model="m").key_env() == "OPENAI_API_KEY"  # OpenAI's own URL
    other = JudgeConfig(model="m", base_url="http://127.0.0.1:9/v1")
    assert other.key_env() is None and other.record()["api_key_set"] is False
    with FakeEndpoint(rating_by_turn) as ep:
        ChatCompletionsJudge("m", ep.url, other.key_env()).complete("s", "u")
    assert ep.requests[0]["auth"] is None
    monkeypatch.delenv("WMDP_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(WmdpError, match=r"\$WMDP_TEST_JUDGE_KEY is not set"):
        JudgeConfig(model="m", api_key_env="WMDP_TEST_JUDGE_KEY").check()


def test_client_retries_server_errors():
    statuses = {1: 500, 2: 429}  # a 500, then rate-limited, then an answer
    with FakeEndpoint(lambda b, n: (statuses.get(n, 200), "Rating: [[9]]", 0.0)) as ep:
        assert client(ep.url).complete("s", "u") == "Rating: [[9]]"
    assert len(ep.requests) == 3
    with FakeEndpoint(lambda b, n: (503, "down", 0.0)) as ep:
        with pytest.raises(JudgeFailure, match="HTTP 503 after 3 attempts"):
            client(ep.url).complete("s", "u")
    assert len(ep.requests) == 3
    with FakeEndpoint(lambda b, n: (400, "max_tokens is too large", 0.0)) as ep:  # not retried
        with pytest.raises(JudgeFailure, match=r"HTTP 400 \(max_tokens is too large\)"):
            client(ep.url).complete("s", "u")
    assert len(ep.requests) == 1


def test_client_timeout():
    with FakeEndpoint(lambda b, n: (200, "[[5]]", 1.0)) as ep:
        t0 = time.perf_counter()
        with pytest.raises(JudgeFailure, match=r"timeout \(0.2 s\) after 2 attempts"):
            client(ep.url, timeout=0.2, max_retries=1).complete("s", "u")
        assert time.perf_counter() - t0 < 1.0


def test_refused_key_stops_with_one_line_and_no_key(monkeypatch):
    monkeypatch.setenv("WMDP_TEST_JUDGE_KEY", SECRET)
    with FakeEndpoint(lambda b, n: (401, f"Incorrect API key provided: {SECRET}", 0.0)) as ep:
        with pytest.raises(WmdpError) as e:
            client(ep.url).complete("s", "u")
    msg = str(e.value)
    assert "HTTP 401" in msg and "$WMDP_TEST_JUDGE_KEY" in msg and SECRET not in msg
    assert "\n" not in msg and len(ep.requests) == 1


def test_error_detail_masks_the_key(monkeypatch):
    monkeypatch.setenv("WMDP_TEST_JUDGE_KEY", SECRET)
    with FakeEndpoint(lambda b, n: (422, f"key {SECRET} cannot use this model", 0.0)) as ep:
        with pytest.raises(JudgeFailure) as e:
            client(ep.url).complete("s", "u")
    assert str(e.value) == "HTTP 422 (key *** cannot use this model)"


def test_judging_counts_failed_and_unparseable_and_caches(tmp_path):
    questions = two_questions()

    def reply(body, n):
        user = body["messages"][-1]["content"]
        if "answer 2.2" in user:
            return 500, "always down", 0.0        # math turn 2: fails every attempt
        if "answer 1.2" in user:
            return 200, "A nice poem, but I will not give a number.", 0.0
        return rating_by_turn(body, n)

    cache = JudgmentCache(tmp_path / "cache.jsonl")
    with FakeEndpoint(reply) as ep:
        judgments = judge_answers(questions, answers_for(questions), client(ep.url), cache,
                                  progress=False)
        first = len(ep.requests)
        by = {(j["question_id"], j["turn"]): j for j in judgments}
        assert [by[k]["status"] for k in sorted(by)] == ["ok", "unparseable", "ok", "failed"]
        assert by[(2, 2)]["error"] == "HTTP 500 after 3 attempts" and by[(2, 2)]["score"] is None
        assert by[(2, 1)]["prompt_name"] == "single-math-v1"
        scores = chat_scores(judgments)
        assert scores["score"] == 8.0 and scores["n"] == 2
        assert scores["failed"] == 1 and scores["unparseable"] == 1 and scores["judgments"] == 4
        assert scores["turns"]["2"] == {"score": None, "n": 0, "failed": 1, "unparseable": 1}
        assert scores["categories"]["math"]["turn_1"] == 8.0
        # a rerun with a fresh cache object on the same file: only the failed one is asked again
        again = judge_answers(questions, answers_for(questions), client(ep.url),
                              JudgmentCache(tmp_path / "cache.jsonl"), progress=False)
        assert len(ep.requests) - first == 3  # one judgment, three attempts
        assert [j["cached"] for j in again] == [True, True, True, False]


def test_fully_cached_rerun_sends_no_request(tmp_path):
    questions = two_questions()
    with FakeEndpoint(rating_by_turn) as ep:
        for _ in range(2):
            judgments = judge_answers(questions, answers_for(questions), client(ep.url),
                                      JudgmentCache(tmp_path / "cache.jsonl"), progress=False)
        assert len(ep.requests) == 4  # the first run's only
    assert all(j["cached"] for j in judgments) and chat_scores(judgments)["score"] == 7.0
    # another judge model is another cache key
    with FakeEndpoint(rating_by_turn) as ep:
        other = ChatCompletionsJudge("other-judge", ep.url, None, backoff=0.01)
        judge_answers(questions, answers_for(questions), other,
                      JudgmentCache(tmp_path / "cache.jsonl"), progress=False)
        assert len(ep.requests) == 4


def test_concurrency_limit():
    live, peak = [0], [0]
    lock = threading.Lock()

    def reply(body, n):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return 200, "[[5]]", 0.0

    with FakeEndpoint(reply) as ep:
        results = []
        client(ep.url, concurrency=3).run([("s", f"u{i}") for i in range(12)],
                                          lambda i, t, e: results.append((i, t, e)))
    assert sorted(i for i, _, _ in results) == list(range(12)) and peak[0] <= 3


# --- questions ------------------------------------------------------------------------------

def test_default_questions_cover_mt_bench_categories():
    qs = load_questions()
    assert {q.category for q in qs} == set(CATEGORIES)
    assert all(len(q.turns) == 2 for q in qs)
    assert all(q.reference is not None and len(q.reference) == 2
               for q in qs if q.category in ("math", "reasoning", "coding"))
    assert len({q.question_id for q in qs}) == len(qs)


@pytest.mark.parametrize("line,expected", [
    ('{"category": "math", "turns": ["q"]}', 'line 1: field "question_id" is missing'),
    ('{"question_id": 1, "category": "math", "turns": []}',
     'field "turns" must be a non-empty list of strings'),
    ('{"question_id": 1, "category": "math", "turns": ["a", 3]}',
     'field "turns" item 1 must be a non-empty string'),
    ('{"question_id": 1, "category": "math", "turns": ["a", "b", "c"]}',
     'field "turns" has 3 turns, at most 2'),
    ('{"question_id": 1, "category": "", "turns": ["a"]}', 'field "category" must be'),
    ('{"question_id": true, "category": "x", "turns": ["a"]}', 'field "question_id" is True'),
    ('{"question_id": 1, "category": "math", "turns": ["a", "b"], "reference": ["x"]}',
     'field "reference" has 1 answers for 2 turns'),
    ("[1, 2]", "line 1: expected a JSON object"),
    ("{oops", "line 1: invalid JSON"),
])
def test_bad_questions_one_line(tmp_path, line, expected):
    p = tmp_path / "q.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(WmdpError) as e:
        load_questions(p)
    assert str(e.value).startswith(f"{p} line 1") and expected in str(e.value)


def test_reference_answers_file(tmp_path):
    from wmdp.chat.questions import load_references

    p = tmp_path / "gpt-4.jsonl"
    p.write_text(json.dumps({"question_id": 2, "model_id": "gpt-4",
                             "choices": [{"index": 0, "turns": ["four", "six"]}]}) + "\n")
    writing, math_q = load_references(p, two_questions())
    assert math_q.reference == ("four", "six") and writing.reference is None
    assert "[The Start of Reference Answer]\nfour\n" in judge_messages(math_q, ["a", "b"], 1)[2]
    p.write_text('{"question_id": 2, "choices": []}\n')
    with pytest.raises(WmdpError, match="line 1: expected question_id and choices"):
        load_references(p, two_questions())


def test_duplicate_question_id(tmp_path):
    p = tmp_path / "q.jsonl"
    rec = {"question_id": 7, "category": "writing", "turns": ["a"]}
    p.write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    with pytest.raises(WmdpError, match=re.escape(f'{p} line 3: field "question_id" is 7, '
                                                  "already used on line 1")):
        load_questions(p)


# --- generation with a chat template --------------------------------------------------------

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny Llama with Mistral's tokenizer and a simple chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MISTRAL_TOK)
    tok.chat_template = TEMPLATE
    return save_tiny_model(tmp_path_factory.mktemp("chat") / "llama-chat", "llama", tokenizer=tok)


def test_turn_two_sees_turn_one_answer(chat_model, monkeypatch):
    model, tok = load_model(chat_model, dtype="float32", device="cpu")
    prompts = []
    real = gen.generate_batch
    monkeypatch.setattr(gen, "generate_batch", lambda m, t, p, **k: prompts.extend(p) or
                        real(m, t, p, **k))
    qs = load_questions()[:3]
    answers = gen.generate_answers(model, tok, qs, model_id="tiny", max_new_tokens=6,
                                   batch_size=3, progress=False)
    assert len(prompts) == 6  # one batch (one temperature), two turns
    for q, a, turn2 in zip(qs, answers, prompts[3:]):
        first = a["choices"][0]["turns"][0]
        assert first and first in turn2
        assert turn2 == (f"<|user|>\n{q.turns[0]}</s>\n<|assistant|>\n{first}</s>\n"
                         f"<|user|>\n{q.turns[1]}</s>\n<|assistant|>\n")
        assert a["temperature"] == 0.7 and len(a["new_tokens"]) == 2


def test_greedy_batched_equals_unbatched(chat_model):
    model, tok = load_model(chat_model, dtype="float32", device="cpu")
    qs = [q for q in load_questions() if q.category in ("math", "coding")][:4]  # varied lengths
    assert len({len(tok(q.turns[0])["input_ids"]) for q in qs}) == 4
    kw = dict(model_id="tiny", max_new_tokens=6, progress=False)
    one = gen.generate_answers(model, tok, qs, batch_size=1, **kw)
    many = gen.generate_answers(model, tok, qs, batch_size=4, **kw)
    assert all(a["temperature"] == 0.0 for a in one)
    assert [a["choices"] for a in one] == [a["choices"] for a in many]
    # sampling is reproducible from the seed
    hot = dict(kw, temperature=1.0, batch_size=2)
    assert gen.generate_answers(model, tok, qs[:2], **hot) == \
        gen.generate_answers(model, tok, qs[:2], **hot)


def test_tokenizer_without_chat_template(llama_mistral_tok, tmp_path):
    model, tok = load_model(llama_mistral_tok, dtype="float32", device="cpu")
    with pytest.raises(WmdpError, match="no chat template.*--chat-template FILE"):
        gen.generate_answers(model, tok, load_questions()[:1], model_id="base", progress=False)
    answers = gen.generate_answers(model, tok, load_questions()[:1], model_id="base",
                                   max_new_tokens=3, chat_template=TEMPLATE, progress=False)
    assert len(answers[0]["choices"][0]["turns"]) == 2


def test_local_hf_judge(chat_model, tmp_path):
    model, tok = load_model(chat_model, dtype="float32", device="cpu")
    judge = LocalJudge(model, tok, "tiny-judge", max_new_tokens=4, batch_size=3)
    questions = two_questions()
    judgments = judge_answers(questions, answers_for(questions), judge,
                              JudgmentCache(tmp_path / "c.jsonl"), progress=False)
    # a random model writes no rating: every judgment is counted as unparseable, none dropped
    scores = chat_scores(judgments)
    assert scores["judgments"] == 4 and scores["unparseable"] == 4
    assert scores["failed"] == 0 and scores["n"] == 0 and scores["score"] is None


# --- the command ----------------------------------------------------------------------------

def test_chat_eval_command_end_to_end(capsys, chat_model, tmp_path, monkeypatch):
    monkeypatch.setenv("WMDP_TEST_JUDGE_KEY", SECRET)
    out = tmp_path / "chat"
    with FakeEndpoint(rating_by_turn) as ep:
        args = ["chat-eval", "--model", str(chat_model), "--judge", "openai:judge-model",
                "--judge-base-url", ep.url, "--judge-api-key-env", "WMDP_TEST_JUDGE_KEY",
                "--output", str(out), "--limit", "4", "--max-new-tokens", "4",
                "--batch-size", "4", "--dtype", "float32"]
        code = main(args)
        stdout, err = capsys.readouterr()
        assert code == 0, err
        assert len(ep.requests) == 8
        res = json.loads((out / "chat_results.json").read_text())
        assert res["score"] == 7.0 and res["turns"]["1"]["score"] == 8.0
        assert res["turns"]["2"]["score"] == 6.0 and res["failed"] == res["unparseable"] == 0
        assert res["categories"]["writing"] == {"score": 7.0, "n": 6, "failed": 0,
                                                "unparseable": 0, "turn_1": 8.0, "turn_2": 6.0}
        assert res["config"]["judge"]["api_key_env"] == "WMDP_TEST_JUDGE_KEY"
        assert res["config"]["judge"]["api_key_set"] is True
        assert res["questions"]["n"] == 4 and res["complete"] is True
        assert "| **overall** | 8 | 8.00 | 6.00 | 7.00 |" in stdout
        assert len((out / "answers.jsonl").read_text().splitlines()) == 4
        assert len((out / "judgments.jsonl").read_text().splitlines()) == 8
        for f in out.iterdir():  # the key is written nowhere
            assert SECRET not in f.read_text()
        assert SECRET not in stdout + err
        answers = (out / "answers.jsonl").read_text()
        # a rerun: no generation, no request
        monkeypatch.setattr(gen, "generate_batch", lambda *a, **k: pytest.fail("regenerated"))
        assert main(args) == 0
        assert len(ep.requests) == 8 and (out / "answers.jsonl").read_text() == answers
        # other generation settings in the same directory are refused
        assert main(args[:-1] + ["bfloat16"]) == 2
        assert "different configuration" in capsys.readouterr().err


def test_chat_eval_resumes_missing_answers(chat_model, tmp_path):
    from wmdp.chat import ChatEvalConfig, JudgeConfig, run_chat_eval

    cfg = ChatEvalConfig(model=str(chat_model), dtype="float32", limit=3, max_new_tokens=3,
                         batch_size=1, temperature=0.0, judge=JudgeConfig(backend="none"))
    full = run_chat_eval(cfg, tmp_path / "a", progress=False)
    assert full["score"] is None and "categories" not in full
    lines = (tmp_path / "a" / "answers.jsonl").read_text().splitlines()
    (tmp_path / "a" / "answers.jsonl").write_text("\n".join(lines[:1]) + "\n")  # interrupted
    run_chat_eval(cfg, tmp_path / "a", progress=False)
    assert (tmp_path / "a" / "answers.jsonl").read_text().splitlines() == lines


def test_chat_eval_errors(capsys, chat_model, llama_mistral_tok, tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "category": "math"}\n')
    base = ["chat-eval", "--judge", "none", "--output", str(tmp_path / "o")]
    assert main(base + ["--model", str(chat_model), "--questions", str(bad)]) == 2
    assert capsys.readouterr().err == f'wmdp: {bad} line 1: field "turns" is missing\n'
    assert main(base + ["--model", str(llama_mistral_tok), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no chat template" in err.splitlines()[-1]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    assert main(["chat-eval", "--judge", "none", "--model", str(chat_model), "--output",
                 str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(base + ["--model", str(chat_model), "--judge", "hf:" + str(tmp_path / "nope")]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_chat_config_from_settings():
    from wmdp.chat.run import chat_config

    cfg = chat_config({"model": "m", "judge": "openai:gpt-4o", "max_new_tokens": 64})
    assert (cfg.judge.backend, cfg.judge.model, cfg.max_new_tokens) == ("openai", "gpt-4o", 64)
    cfg = chat_config({"judge": {"backend": "hf", "model": "dir", "batch_size": 2}})
    assert cfg.judge.batch_size == 2
    with pytest.raises(WmdpError, match="chat: unknown key 'judge_model'"):
        chat_config({"judge_model": "x"})


# --- replies that must not hurt: an echoed key, a rating the parser cannot take ----------------

def test_echoed_key_is_redacted_everywhere(capsys, chat_model, tmp_path, monkeypatch):
    """An endpoint that echoes the request's Authorization header in a 200 reply: the key is
    in no file, no cache and no output, whatever the server returns."""
    monkeypatch.setenv("WMDP_TEST_JUDGE_KEY", SECRET)
    holder: list[FakeEndpoint] = []

    def echo(body, n):
        auth = holder[0].requests[n - 1]["auth"]
        return 200, f"You sent {auth} (key {SECRET}). Rating: [[5]]", 0.0

    out = tmp_path / "chat"
    with FakeEndpoint(echo) as ep:
        holder.append(ep)
        code = main(["chat-eval", "--model", str(chat_model), "--judge", "openai:judge-model",
                     "--judge-base-url", ep.url, "--judge-api-key-env", "WMDP_TEST_JUDGE_KEY",
                     "--output", str(out), "--limit", "1", "--max-new-tokens", "2",
                     "--dtype", "float32"])
        assert ep.requests[0]["auth"] == f"Bearer {SECRET}"  # it was sent, and echoed
    stdout, err = capsys.readouterr()
    assert code == 0, err
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert judgments[0]["judgment"] == "You sent Bearer *** (key ***). Rating: [[5]]"
    assert judgments[0]["score"] == 5.0
    for f in out.iterdir():
        assert SECRET not in f.read_text(), f.name
    assert SECRET not in stdout + err


def test_huge_rating_is_unparseable_and_a_rerun_does_not_crash(tmp_path):
    huge = "Rating: [[" + "9" * 5000 + "]]"
    assert parse_rating(huge) is None
    assert parse_rating("[" + "1" * 5000 + ".5]") is None
    questions = two_questions()[:1]
    with FakeEndpoint(lambda body, n: (200, huge, 0.0)) as ep:
        for _ in range(2):  # the second run reads the cached reply
            judgments = judge_answers(questions, answers_for(questions), client(ep.url),
                                      JudgmentCache(tmp_path / "cache.jsonl"), progress=False)
            assert [j["status"] for j in judgments] == ["unparseable", "unparseable"]
        assert len(ep.requests) == 2


def test_a_reply_that_crashes_the_parser_is_never_cached(tmp_path, monkeypatch):
    from wmdp.chat import judge as judge_module

    def crash(text):
        raise RecursionError("a parser bug")

    monkeypatch.setattr(judge_module, "parse_rating", crash)
    questions = two_questions()[:1]
    with FakeEndpoint(rating_by_turn) as ep:
        judgments = judge_answers(questions, answers_for(questions), client(ep.url),
                                  JudgmentCache(tmp_path / "cache.jsonl"), progress=False)
    assert [j["status"] for j in judgments] == ["unparseable", "unparseable"]
    assert not (tmp_path / "cache.jsonl").exists()  # a rerun asks again


@pytest.mark.parametrize("flags,expected", [
    (["--judge-timeout", "nan"], "--judge-timeout is nan"),
    (["--judge-timeout", "inf"], "--judge-timeout is inf"),
    (["--judge-timeout", "0"], "--judge-timeout is 0.0"),
    (["--judge-base-url", "notaurl"], "--judge-base-url 'notaurl' is not an http(s) URL"),
    (["--judge-base-url", "ftp://host/v1"], "is not an http(s) URL"),
    (["--judge-base-url", "http://[::1/v1"], "is not an http(s) URL"),
    (["--max-new-tokens", "-1"], "--max-new-tokens is -1, expected at least 1"),
    (["--batch-size", "0"], "--batch-size is 0, expected at least 1"),
    (["--limit", "0"], "--limit is 0, expected at least 1"),
    (["--temperature", "nan"], "--temperature is nan"),
])
def test_chat_eval_bad_settings_one_line(capsys, chat_model, tmp_path, flags, expected):
    code = main(["chat-eval", "--model", str(chat_model), "--judge", "openai:j",
                 "--output", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "o").exists()


def test_a_cache_line_cut_short_is_dropped_before_appending(tmp_path):
    """An interrupted run leaves a last line cut short; the next run drops it and appends on a
    line of its own, so the run after that still reads the cache (it refused it before)."""
    from wmdp.chat.backends import JudgmentCache

    path = tmp_path / "cache.jsonl"
    whole = json.dumps({"key": "a", "judge": "j", "judgment": "[[7]]"}) + "\n"
    path.write_text(whole + '{"key": "b", "judge": "j", "judg')
    cache = JudgmentCache(path)
    assert cache.get("a") == "[[7]]" and cache.get("b") is None
    cache.put("c", "j", "[[3]]")
    again = JudgmentCache(path)
    assert again.get("a") == "[[7]]" and again.get("c") == "[[3]]"
    assert path.read_text().count("\n") == 2
