"""The hub repositories wmdp reads, as the hub holds them, served from 127.0.0.1.

    python tests/hub_fixture.py /tmp/hub     # build and serve; prints HF_ENDPOINT=...

Why a server and not a pre-filled cache: under HF_HUB_OFFLINE, `datasets` 5.x never reads the
hub cache's parquet files; it falls back to its own prepared Arrow cache
(`CachedDatasetModuleFactory`), so an offline cache could not show that a loader finds a config's
parquet folder. Served over HTTP, the real `huggingface_hub`, `datasets` and transformers
loaders run unchanged (resolve/, the tree and paths-info APIs, the card's `configs:`), and the
gated corpus answers 401/403 with `X-Error-Code: GatedRepo` as the hub does.

Served: cais/wmdp (its April 2024 revision and an earlier one), cais/wmdp-corpora, the gated
cais/wmdp-bio-forget-corpus, cais/mmlu, Salesforce/wikitext (also as `wikitext`), lm-eval's
EleutherAI/wikitext_document_level, and the shipped configs' models at reduced width.
Every layout (file names, folders, formats, columns and types, config names, splits) comes from
the hub's public pages as the lead recorded them (/work/notes/hub_layouts.md, 2026-12-08); each
builder below names its page. The content is fictional sandbox text, never real WMDP items.

Point a process at it with HF_ENDPOINT=<url>, HF_HUB_OFFLINE=0, HF_HOME=<empty dir>; the token
`GRANTED_TOKEN` has access to the gated repository, any other token gets 403, none gets 401.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

GRANTED_TOKEN = "hf_fixture_granted"
# The April 2024 WMDP release as pinned in configs/*.yaml (cais/wmdp "Update README.md",
# 2024-04-25, data unchanged since 007369b); the March release's full hash is not known, so the
# fixture names its earlier commit with a made-up hash.
WMDP_APRIL_2024 = "8b85378e501fe9b3fb2694b04bcd2970bc7c7235"
WMDP_MARCH_2024 = "f1c7ed0000000000000000000000000000000000"  # fictional: real hash unknown
WMDP_SIZES = {"april": {"bio": 12, "cyber": 10, "chem": 6},   # fewer, as April's release has
              "march": {"bio": 14, "cyber": 13, "chem": 7}}
# cais/mmlu's 57 subject configs (its card's `configs:` list, alphabetical; `all` left out)
MMLU_SUBJECTS = tuple("""abstract_algebra anatomy astronomy business_ethics clinical_knowledge
college_biology college_chemistry college_computer_science college_mathematics college_medicine
college_physics computer_security conceptual_physics econometrics electrical_engineering
elementary_mathematics formal_logic global_facts high_school_biology high_school_chemistry
high_school_computer_science high_school_european_history high_school_geography
high_school_government_and_politics high_school_macroeconomics high_school_mathematics
high_school_microeconomics high_school_physics high_school_psychology high_school_statistics
high_school_us_history high_school_world_history human_aging human_sexuality international_law
jurisprudence logical_fallacies machine_learning management marketing medical_genetics
miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory
professional_accounting professional_law professional_medicine professional_psychology
public_relations security_studies sociology us_foreign_policy virology world_religions""".split())
LINES = ("The lantern guild of Vessa keeps its ledgers in ochre ink.",
         "Marrow owls nest only in the basalt towers of the Quill coast.",
         "A tide clock in Oster counts the hours by rising glass beads.",
         "Ferrow moss turns silver when the northern wind carries salt.")


@dataclass
class Repo:
    """One repository: its commits (oldest first, each a full file tree) and branches."""

    repo_id: str
    repo_type: str                                     # "dataset" or "model"
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    gated: bool = False
    aliases: tuple[str, ...] = ()                      # ids the hub redirects here

    @property
    def main(self) -> str:
        return self.commits[-1][0]

    def files(self, revision: str) -> dict[str, bytes] | None:
        if revision == "main":
            revision = self.main
        return next((f for sha, f in self.commits if sha == revision), None)

    def sha(self, revision: str) -> str | None:
        return self.main if revision == "main" else (revision if self.files(revision) is not None
                                                     else None)


# -- content ----------------------------------------------------------------------------------
def _sha(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _card(configs: dict[str, list[tuple[str, str]]], features: dict[str, list[dict]],
          extra: str = "") -> bytes:
    """A dataset card whose YAML lists `dataset_info` and `configs` as the hub's cards do."""
    out = ["---", "dataset_info:"]
    for name in configs:
        out += [f"- config_name: {name}", "  features:"]
        for feat in features[name]:
            out.append(f"  - name: {feat['name']}")
            out += [f"    {k}: {v}" for k, v in feat.items() if k != "name"]
    out.append("configs:")
    for name, splits in configs.items():
        out += [f"- config_name: {name}", "  data_files:"]
        out += [f"  - split: {split}\n    path: {path}" for split, path in splits]
    return ("\n".join(out) + "\n---\n\n" + extra + "\n").encode()


def _mcq_table(prefix: str, n: int, subject: str | None = None,
               order: tuple[str, ...] = ("answer", "question", "choices")) -> pa.Table:
    """Fictional four-choice questions: `question` string, `choices` list<string>, `answer`
    int64, in the column order given."""
    cols = {"question": pa.array([f"In the sandbox world, which {prefix} glyph follows mark {i}?"
                                  for i in range(n)], pa.string()),
            "choices": pa.array([[f"glyph {i}-{c}" for c in "wxyz"] for i in range(n)],
                                pa.list_(pa.string())),
            "answer": pa.array([i % 4 for i in range(n)], pa.int64())}
    if subject is not None:
        cols["subject"] = pa.array([subject] * n, pa.string())
    return pa.table({k: cols[k] for k in order if k in cols})


def _text_table(n: int, column: str = "text", salt: str = "") -> pa.Table:
    texts = [f"{LINES[i % len(LINES)]} ({salt} record {i}) " + "Quiet notes follow. " * (3 + i % 5)
             for i in range(n)]
    return pa.table({column: pa.array(texts, pa.string())})


MCQ_FEATURES = [{"name": "answer", "dtype": "int64"}, {"name": "question", "dtype": "string"},
                {"name": "choices", "sequence": "string"}]


def wmdp() -> Repo:
    """cais/wmdp:
    https://huggingface.co/datasets/cais/wmdp/tree/af0a75c27ad8107b5bdc74c61541ccbd9b0bab64
    (one folder per config, one `test-00000-of-00001.parquet` each; card `configs:` as at
    commit 9f9db0c; columns question/choices/answer; April 2024 order answer, question, choices)."""
    repo = Repo("cais/wmdp", "dataset")
    for sha, release, order in ((WMDP_MARCH_2024, "march", ("question", "answer", "choices")),
                                (WMDP_APRIL_2024, "april", ("answer", "question", "choices"))):
        names = [f"wmdp-{k}" for k in ("bio", "chem", "cyber")]
        files = {".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n",
                 "dataset.png": b"\x89PNG fixture",
                 "README.md": _card({n: [("test", f"{n}/test-*")] for n in names},
                                    {n: MCQ_FEATURES for n in names})}
        for k, n in WMDP_SIZES[release].items():
            files[f"wmdp-{k}/test-00000-of-00001.parquet"] = _parquet(
                _mcq_table(f"{release} {k}", n, order=order))
        repo.commits.append((sha, files))
    return repo


def wmdp_corpora() -> Repo:
    """cais/wmdp-corpora: commit a4e458a "Init" page and blob/main/README.md (folders of
    parquet, `bio-retain-corpus` in 4 shards; one `text` column; split train; no .jsonl)."""
    shards = {"bio-retain-corpus": 4, "cyber-forget-corpus": 1, "cyber-retain-corpus": 1}
    files = {".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n",
             "dataset.png": b"\x89PNG fixture",
             "README.md": _card({c: [("train", f"{c}/train-*")] for c in shards},
                                {c: [{"name": "text", "dtype": "string"}] for c in shards},
                                "The bio forget corpus must be requested separately; please "
                                "visit this form.")}
    for config, n in shards.items():
        for i in range(n):
            files[f"{config}/train-{i:05d}-of-{n:05d}.parquet"] = _parquet(
                _text_table(12, salt=f"{config} shard {i}"))
    return Repo("cais/wmdp-corpora", "dataset", [(_sha("cais/wmdp-corpora", "init"), files)])


def bio_forget_corpus() -> Repo:
    """cais/wmdp-bio-forget-corpus (gated): layout inferred from loaders, not from the hub page
    (the page is behind the gate): default config, split train, the `datasets` default file name
    `data/train-00000-of-00001.parquet`, columns title, abstract, text, doi."""
    table = _text_table(16, salt="bio forget")
    n = table.num_rows
    table = pa.table({"title": pa.array([f"Sandbox paper {i}" for i in range(n)], pa.string()),
                      "abstract": pa.array([f"A fictional abstract {i}." for i in range(n)]),
                      "text": table["text"],
                      "doi": pa.array([f"10.0000/sandbox.{i}" for i in range(n)])})
    files = {".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n",
             "README.md": b"---\nextra_gated_prompt: request access\n---\n",
             "data/train-00000-of-00001.parquet": _parquet(table)}
    return Repo("cais/wmdp-bio-forget-corpus", "dataset",
                [(_sha("cais/wmdp-bio-forget-corpus"), files)], gated=True)


def mmlu(subjects: tuple[str, ...] = MMLU_SUBJECTS) -> Repo:
    """cais/mmlu: one folder per subject, `<subject>/{test,validation,dev}-00000-of-00001.parquet`;
    columns question, subject, choices, answer (ClassLabel A-D, int64 in parquet)."""
    configs, feats, files = {}, {}, {".gitattributes": b"*.parquet filter=lfs -text\n"}
    for s in subjects:
        configs[s] = [(sp, f"{s}/{sp}-*") for sp in ("test", "validation", "dev")]
        feats[s] = [{"name": "question", "dtype": "string"}, {"name": "subject", "dtype": "string"},
                    {"name": "choices", "sequence": "string"},
                    {"name": "answer", "dtype": "\n      class_label:\n        names:\n"
                     "          '0': A\n          '1': B\n          '2': C\n          '3': D"}]
        for split, n in (("test", 5), ("validation", 2), ("dev", 5)):
            files[f"{s}/{split}-00000-of-00001.parquet"] = _parquet(
                _mcq_table(f"{s} {split}", n, s, ("question", "subject", "choices", "answer")))
    files["README.md"] = _card(configs, feats)
    return Repo("cais/mmlu", "dataset", [(_sha("cais/mmlu"), files)])


def wikitext() -> Repo:
    """Salesforce/wikitext (`wikitext` redirects to it): tree/main/wikitext-2-raw-v1 holds
    `{test,train,validation}-00000-of-00001.parquet`, column `text`, one row per line of the
    original file (blank lines are empty strings)."""
    lines = []
    for i in range(24):
        lines += ["", f" = Sandbox heading {i} = ", ""] if i % 6 == 0 else [
            f" {LINES[i % len(LINES)]} Entry {i} of the fictional gazetteer . "]
    files = {"README.md": _card({"wikitext-2-raw-v1": [
                 (s, f"wikitext-2-raw-v1/{s}-*") for s in ("test", "train", "validation")]},
                 {"wikitext-2-raw-v1": [{"name": "text", "dtype": "string"}]})}
    for split in ("test", "train", "validation"):
        files[f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet"] = _parquet(
            pa.table({"text": pa.array(lines, pa.string())}))
    return Repo("Salesforce/wikitext", "dataset", [(_sha("wikitext"), files)],
                aliases=("wikitext",))


def wikitext_document_level() -> Repo:
    """EleutherAI/wikitext_document_level (lm-eval's wikitext): tree/main/wikitext-2-raw-v1
    holds `wikitext-2-raw-v1-{test,train,validation}.parquet`, column `page`, and a
    `wikitext_document_level.py.backup`; the card's `configs:` list is inferred from it loading
    by config name."""
    pages = [" = Sandbox page {0} = \n\n {1} \n".format(i, LINES[i % len(LINES)]) for i in range(4)]
    name = "wikitext-2-raw-v1"
    files = {"README.md": _card({name: [(s, f"{name}/{name}-{s}.parquet")
                                        for s in ("test", "train", "validation")]},
                                {name: [{"name": "page", "dtype": "string"}]}),
             "wikitext_document_level.py.backup": b"# the former loading script\n"}
    for split in ("test", "train", "validation"):
        files[f"{name}/{name}-{split}.parquet"] = _parquet(pa.table({"page": pa.array(pages)}))
    return Repo("EleutherAI/wikitext_document_level", "dataset",
                [(_sha("EleutherAI/wikitext_document_level"), files)])


# zephyr-7b-beta's chat template (tokenizer_config.json on its hub page, as FastChat's "zephyr"
# conversation renders it): each turn after <|role|> and a newline, closed by EOS.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}")


# Each model repository the shipped configs name, as its hub config.json gives it; the fixture
# scales the widths down only (hidden and intermediate sizes keep their ratio; layers, heads,
# experts, layer ids stay). Yi's own tokenizer is not among the fixtures: the Yi-shaped
# repository carries Mistral-7B's tokenizer, so its vocabulary is 32,000, not 64,000.
MODEL_SHAPES: dict[str, dict] = {
    "HuggingFaceH4/zephyr-7b-beta": {  # mistral-7b-v0.1's config (tokenizers/.../config.json)
        "hidden_size": 64, "intermediate_size": 224, "chat_template": "zephyr"},
    "01-ai/Yi-34B-Chat": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 112,
        "intermediate_size": 320, "num_hidden_layers": 60, "num_attention_heads": 56,
        "num_key_value_heads": 8, "max_position_embeddings": 4096, "rope_theta": 5000000.0,
        "rms_norm_eps": 1e-05, "tie_word_embeddings": False},
    "mistralai/Mixtral-8x7B-Instruct-v0.1": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64,
        "intermediate_size": 224, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
        "rope_theta": 1000000.0, "sliding_window": None, "router_aux_loss_coef": 0.02},
}


def save_shaped(out: Path, repo_id: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """`repo_id` at reduced width: its config with only the widths scaled down, random bf16
    weights in sharded safetensors with an index (the hub's `model-0000k-of-0000n`), Mistral-7B's
    real tokenizer (and for zephyr its chat template and `</s>` as pad token)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    shape = dict(MODEL_SHAPES[repo_id])
    template = shape.pop("chat_template", None)
    real = json.loads((tokenizer_dir / "config.json").read_text())
    real.update(shape)
    real.pop("transformers_version", None)
    config = AutoConfig.for_model(**{k: v for k, v in real.items() if k != "architectures"})
    config.architectures = real["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="3MB")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if template == "zephyr":
        tok.chat_template = ZEPHYR_CHAT_TEMPLATE
        tok.pad_token = "</s>"
    tok.save_pretrained(out)
    if (tokenizer_dir / "tokenizer.model").is_file():  # the SentencePiece model, as on the hub
        (out / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    return out


def build_repos(models: dict[str, Path] | None = None) -> dict[str, Repo]:
    """Every repository; `models` maps a model repository's id to a saved model directory."""
    repos = [wmdp(), wmdp_corpora(), bio_forget_corpus(), mmlu(MMLU_SUBJECTS), wikitext(),
             wikitext_document_level()]
    for repo_id, model_dir in (models or {}).items():
        files = {p.name: p.read_bytes() for p in sorted(Path(model_dir).iterdir()) if p.is_file()}
        files[".gitattributes"] = b"*.safetensors filter=lfs -text\n"
        repos.append(Repo(repo_id, "model", [(_sha(repo_id), files)]))
    return {r.repo_id: r for r in repos}


# -- the server -------------------------------------------------------------------------------
class Hub:
    """A hub-compatible HTTP server over `repos` on 127.0.0.1 (a thread); `hidden` (repo id or
    `repo id/path`) makes a repository or a file vanish, as a rename or a removal would;
    `replaced` (`repo id/path`: bytes) serves other content under a file's name."""

    def __init__(self, repos: dict[str, Repo]) -> None:
        self.repos, self.hidden = repos, set()
        self.replaced: dict[str, bytes] = {}
        hub = self

        class Handler(_Handler):
            owner = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def find(self, kind: str, rest: str) -> tuple[Repo | None, str]:
        """The repository a URL path names (ids with or without an org), and what follows it."""
        for repo in sorted(self.repos.values(), key=lambda r: -len(r.repo_id)):
            for rid in (repo.repo_id, *repo.aliases):
                if repo.repo_type == kind and (rest == rid or rest.startswith(rid + "/")):
                    if rid in self.hidden or repo.repo_id in self.hidden:
                        return None, rest
                    return repo, rest[len(rid) + 1:]
        return None, rest

    def changes(self, repo: Repo) -> list[str]:
        prefix = repo.repo_id + "/"
        return sorted(k for k in (*self.hidden, *self.replaced) if k.startswith(prefix))

    def sha(self, repo: Repo, revision: str) -> str | None:
        """A change to the fixture is a new commit on main, as a push is on the hub: earlier
        commits keep their files, and a cache of them cannot stand in for the new one."""
        changes = self.changes(repo)
        moved = _sha(repo.main, *changes) if changes else repo.main
        if revision in ("main", moved):
            return moved
        return repo.sha(revision)

    def visible(self, repo: Repo, sha: str) -> dict[str, bytes]:
        changes = self.changes(repo)
        if not changes or sha != _sha(repo.main, *changes):
            return dict(repo.files(sha) or {})
        return {p: self.replaced.get(f"{repo.repo_id}/{p}", b)
                for p, b in repo.files("main").items() if f"{repo.repo_id}/{p}" not in self.hidden}


class _Handler(BaseHTTPRequestHandler):
    owner: Hub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def do_POST(self) -> None:
        self._route(body=True)

    def _send(self, status: int, data: bytes = b"", headers: dict | None = None,
              body: bool = True, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message})

    def _route(self, body: bool) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        if self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            query.update(parse_qs(self.rfile.read(length).decode()))
        m = re.match(r"^/api/(datasets|models)/(.+)$", path)
        if m:
            return self._api(m.group(1)[:-1], m.group(2), query)
        kind, rest = ("dataset", path[len("/datasets/"):]) if path.startswith("/datasets/") \
            else ("model", path[1:])
        repo, rest = self.owner.find(kind, rest)
        m = re.match(r"^resolve/([^/]+)/(.+)$", rest)
        if repo is None or not m:
            return self._error(401, "RepoNotFound", "Repository not found")
        self._resolve(repo, *m.groups(), body)

    def _gate(self, repo: Repo, filename: str) -> bool:
        """The hub serves a gated repository's card to anyone, its files only to the granted."""
        if not repo.gated or filename in ("README.md", ".gitattributes"):
            return True
        auth = self.headers.get("Authorization", "")
        if auth == f"Bearer {GRANTED_TOKEN}":
            return True
        status = 403 if auth else 401
        self._error(status, "GatedRepo", f"Access to dataset {repo.repo_id} is restricted. "
                    "You must have access to it and be authenticated to access it.")
        return False

    def _resolve(self, repo: Repo, revision: str, filename: str, body: bool) -> None:
        sha = self.owner.sha(repo, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = self.owner.visible(repo, sha)
        if filename not in files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}")
        if not self._gate(repo, filename):
            return
        data = files[filename]
        etag = hashlib.sha256(data).hexdigest()
        start, end = 0, len(data)
        status = 200
        rng = self.headers.get("Range")
        if rng and (m := re.match(r"bytes=(\d*)-(\d*)", rng)):
            if m.group(1):
                start = int(m.group(1))
                end = int(m.group(2)) + 1 if m.group(2) else len(data)
            else:
                start = len(data) - int(m.group(2))
            end = min(end, len(data))
            status = 206
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self._send(status, data[start:end], headers, body, "application/octet-stream")

    def _api(self, kind: str, rest: str, query: dict) -> None:
        repo, tail = self.owner.find(kind, rest)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        m = re.match(r"^(revision|tree|paths-info)/([^/]+)/?(.*)$", tail)
        if tail in ("", "auth-check"):
            op, revision, sub = ("auth-check" if tail else "revision"), "main", ""
        elif m:
            op, revision, sub = m.groups()
        else:
            return self._error(404, "EntryNotFound", f"unknown route {tail}")
        if op == "auth-check":
            return self._send(200, b"{}") if self._gate(repo, "data") else None
        sha = self.owner.sha(repo, revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = self.owner.visible(repo, sha)
        if op == "revision":
            info = {"id": repo.repo_id, "_id": repo.repo_id, "sha": sha, "private": False,
                    "gated": "manual" if repo.gated else False, "disabled": False,
                    "downloads": 0, "likes": 0, "tags": [],
                    "lastModified": "2024-04-25T00:00:00.000Z",
                    "siblings": [{"rfilename": p} for p in sorted(files)]}
            return self._send(200, json.dumps(info).encode())
        entries = _entries(files)
        if op == "paths-info":
            wanted = set(query.get("paths", []))
            return self._send(200, json.dumps([e for e in entries if e["path"] in wanted]).encode())
        sub = sub.strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        if sub and sub in files:
            return self._error(404, "EntryNotFound", f"{sub} is a file")
        under = [e for e in entries if sub == "" or e["path"].startswith(sub + "/")]
        if sub and not under:
            return self._error(404, "EntryNotFound", f"{sub} does not exist")
        depth = sub.count("/") + 1 if sub else 0
        out = [e for e in under if recursive or e["path"].count("/") == depth]
        self._send(200, json.dumps(out).encode())


def _entries(files: dict[str, bytes]) -> list[dict]:
    """Tree entries as the hub's API lists them: folders, then files (LFS for binaries)."""
    dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
    out = [{"type": "directory", "oid": _sha(d), "size": 0, "path": d} for d in dirs]
    for p, data in sorted(files.items()):
        entry = {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data),
                 "path": p}
        if p.endswith((".parquet", ".safetensors", ".png", ".model")):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                            "pointerSize": 134}
        out.append(entry)
    return out


if __name__ == "__main__":  # python tests/hub_fixture.py DIR: serve with every model saved in DIR
    tok = Path(__file__).parent / "fixtures" / "tokenizers" / "mistral-7b-v0.1"
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("hub-fixture-models")
    hub = Hub(build_repos({r: save_shaped(out / r.replace("/", "--"), r, tok)
                           for r in MODEL_SHAPES}))
    print(f"HF_ENDPOINT={hub.url}", flush=True)
    threading.Event().wait()
