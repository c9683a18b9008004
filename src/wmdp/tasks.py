"""Task registry and the one MCQ prompt builder.

A task is a named question set, where to read it (the hub or a local file), the topic of its
description, and its format:

- `letter` (WMDP's and MMLU's, lm-eval's default): the options are listed and the continuations
  are ` A`..` D`;
- `cloze` (lm-eval's "continuation" MMLU variant): the question alone, each choice's text is a
  continuation; `acc_norm` divides by the choice's length in characters.

Names follow lm-eval: `wmdp`, `wmdp_bio`, `wmdp_cyber`, `wmdp_chem`, `mmlu`, `mmlu_stem`,
`mmlu_<subject>`. A data directory may add tasks and groups with a `tasks.json` manifest:

    {"tasks": {"sandbox_bio": {"file": "sandbox_bio.jsonl", "topic": "biology",
                               "format": "cloze"}},
     "groups": {"sandbox_forget": ["sandbox_bio", "sandbox_cyber"]}}

Perplexity tasks (kind `perplexity`, scored by `wmdp.perplexity`) read a text corpus instead:
`wikitext` (lm-eval's task: wikitext-2-raw-v1 test documents, detokenized, words and bytes
counted on the original), `ppl:wikitext` (the same split line by line, RMU's retain text),
`ppl:<corpus spec>` for any corpus `wmdp.data.corpus.load_corpus` reads (a `.jsonl` with a
`text` field, a `.txt`, `wikitext`, a hub dataset `org/name:config@split`), `--task
ppl_<name>=FILE`, or a manifest entry `{"file": "retain.jsonl", "kind": "perplexity"}` (or
`{"corpus": "org/name:config", "kind": "perplexity"}`).
"""

from __future__ import annotations

import difflib
import json
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from wmdp.data.corpus import Corpus, load_corpus
from wmdp.data.mcq import FORMATS, LETTERS, MCQItem, load_mcq_file, read_hub_mcq
from wmdp.errors import WmdpError
from wmdp.io import read_text, sha256_file

MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": ("abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics",
             "computer_security", "conceptual_physics", "electrical_engineering",
             "elementary_mathematics", "high_school_biology", "high_school_chemistry",
             "high_school_computer_science", "high_school_mathematics", "high_school_physics",
             "high_school_statistics", "machine_learning"),
    "other": ("business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
              "human_aging", "management", "marketing", "medical_genetics", "miscellaneous",
              "nutrition", "professional_accounting", "professional_medicine", "virology"),
    "social_sciences": ("econometrics", "high_school_geography",
                        "high_school_government_and_politics", "high_school_macroeconomics",
                        "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations",
                        "security_studies", "sociology", "us_foreign_policy"),
    "humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence",
                   "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
                   "prehistory", "professional_law", "world_religions"),
}
MMLU_SUBJECTS = tuple(sorted(s for subs in MMLU_CATEGORIES.values() for s in subs))
WMDP_TOPICS = {"bio": "biology", "chem": "chemistry", "cyber": "cybersecurity"}
TASK_FORMATS = ("letter", "cloze")
TASK_KINDS = ("mcq", "perplexity")
PPL_PREFIX = "ppl:"           # `ppl:<corpus spec>` names a perplexity task on that corpus
CORPUS_SUFFIXES = (".jsonl", ".txt")


@dataclass(frozen=True)
class PromptStyle:
    """How lm-eval renders and tokenises a prompt; its versions differ in these details."""

    name: str
    blank_line: bool         # "...about biology.\n\n" (current) or ".\n" (0.4.2's Jinja trims one)
    add_bos: bool | None     # None: the tokenizer's default (current); False: never (0.4.2)
    # the token that predicts a text's first token in rolling log-likelihood (perplexity):
    # "bos" (current `prefix_token_id`: BOS, else EOS) or "eos" (0.4.2's `eot_token_id`)
    rolling_prefix: str = "bos"
    # 0.4.2 forced BOS for `model_type == "gemma"` exactly (not gemma2, gemma3, ...)
    bos_model_type: str | None = None


PROMPT_STYLES = {
    "lmeval": PromptStyle("lmeval", blank_line=True, add_bos=None),
    "lmeval-0.4.2": PromptStyle("lmeval-0.4.2", blank_line=False, add_bos=False,
                                rolling_prefix="eos", bos_model_type="gemma"),
}


@dataclass(frozen=True)
class Task:
    name: str
    topic: str
    hub: tuple[str, str | None, str] | None = None  # (dataset, config, split)
    path: Path | None = None
    format: str = "letter"
    description: str | None = None  # overrides the one built from `topic` ("" for none)
    cloze_template: str = "Question: {question}\nAnswer:"
    kind: str = "mcq"               # "mcq" or "perplexity"
    corpus: str | None = None       # perplexity: a corpus spec, where `path` is not given
    text_field: str = "text"        # perplexity: the hub dataset's text column
    detokenizer: str | None = None  # perplexity: "wikitext" (lm-eval's), applied before scoring
    revision: str | None = None     # hub question sets: the dataset revision to read (None: main)

    @property
    def source(self) -> str:
        if self.path is not None:
            return str(self.path)
        if self.corpus is not None:
            return f"corpus:{self.corpus}"
        assert self.hub is not None
        dataset, config, split = self.hub
        return f"hub:{dataset}" + (f"/{config}" if config else "") + f" [{split}]"

    def load_items(self) -> list[MCQItem]:
        return self.load_items_with_provenance()[0]

    def load_items_with_provenance(self) -> tuple[list[MCQItem], dict]:
        """The questions and what exactly was read: a local file's sha256, or the hub
        dataset's resolved commit (and the revision asked for)."""
        if self.path is not None:
            items = load_mcq_file(self.path)
            return items, {"file_sha256": sha256_file(self.path), "questions": len(items)}
        if self.hub is None:
            raise WmdpError(f"task {self.name}: no data source (give --data-dir or --task)")
        items, commit = read_hub_mcq(*self.hub, revision=self.revision)
        return items, {"revision": commit, "revision_requested": self.revision,
                       "questions": len(items)}

    def load_texts(self) -> Corpus:
        """A perplexity task's corpus (every non-empty text)."""
        if self.path is not None and not self.path.is_file():
            raise WmdpError(f"{self.path}: corpus file not found (task {self.name})")
        spec = self.path if self.path is not None else self.corpus
        if spec is None:
            raise WmdpError(f"task {self.name}: no corpus (give --data-dir or --task)")
        return load_corpus(spec, text_field=self.text_field)

    def load(self) -> list[MCQItem] | Corpus:
        return self.load_with_provenance()[0]

    def load_with_provenance(self) -> tuple[list[MCQItem] | Corpus, dict]:
        if self.kind != "perplexity":
            return self.load_items_with_provenance()
        corpus = self.load_texts()
        record = {"file_sha256": sha256_file(self.path)} if self.path is not None else {}
        return corpus, {**record, "texts": len(corpus.texts)}


def build_prompt(item: MCQItem, task: Task, style: PromptStyle, fewshot: Sequence[MCQItem] = (),
                 system: str | None = None) -> tuple[str, list[str]]:
    """The context and the four continuations lm-eval scores for one question.

    `fewshot`: solved examples placed before the question, lm-eval's way (each example's text,
    its answer after a space, examples separated by a blank line). `system`: an instruction
    placed before the description, as lm-eval's `--system_instruction` is without a chat template.
    """
    end = "\n\n" if style.blank_line else "\n"
    if task.description is not None:
        description = task.description
    elif task.format == "letter":
        description = f"The following are multiple choice questions (with answers) about {task.topic}.{end}"
    else:
        description = f"The following are questions (with answers) about {task.topic}.{end}"
    if system:
        description = system + ("" if system[-1].isspace() or not description or
                                description[0].isspace() else "\n\n") + description
    shots = "".join(f"{_doc_text(ex, task)}{_answer_text(ex, task)}\n\n" for ex in fewshot)
    continuations = ([f" {x}" for x in LETTERS] if task.format == "letter"
                     else [f" {c}" for c in item.choices])
    return description + shots + _doc_text(item, task), continuations


def _doc_text(item: MCQItem, task: Task) -> str:
    if task.format == "letter":
        options = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, item.choices))
        return f"{item.question.strip()}{options}\nAnswer:"
    return task.cloze_template.format(question=item.question.strip())


def _answer_text(item: MCQItem, task: Task) -> str:
    return f" {LETTERS[item.answer]}" if task.format == "letter" else f" {item.choices[item.answer]}"


def builtin_tasks() -> dict[str, Task]:
    tasks = {f"wmdp_{k}": Task(f"wmdp_{k}", topic, hub=("cais/wmdp", f"wmdp-{k}", "test"))
             for k, topic in WMDP_TOPICS.items()}
    for s in MMLU_SUBJECTS:
        tasks[f"mmlu_{s}"] = Task(f"mmlu_{s}", s.replace("_", " "), hub=("cais/mmlu", s, "test"))
    tasks["wikitext"] = Task("wikitext", "wikitext", kind="perplexity",
                             corpus="EleutherAI/wikitext_document_level:wikitext-2-raw-v1@test",
                             text_field="page", detokenizer="wikitext")
    return tasks


def builtin_groups() -> dict[str, list[str]]:
    groups = {"wmdp": [f"wmdp_{k}" for k in ("bio", "chem", "cyber")],
              "mmlu": [f"mmlu_{c}" for c in ("stem", "other", "social_sciences", "humanities")]}
    for cat, subjects in MMLU_CATEGORIES.items():
        groups[f"mmlu_{cat}"] = [f"mmlu_{s}" for s in subjects]
    return groups


@dataclass
class Registry:
    """Tasks and groups known for one run: the built-ins, a data dir's, the user's files."""

    tasks: dict[str, Task] = field(default_factory=builtin_tasks)
    groups: dict[str, list[str]] = field(default_factory=builtin_groups)

    @classmethod
    def build(cls, data_dir: str | Path | None = None,
              task_files: dict[str, str] | None = None, fmt: str | None = None,
              data_revision: str | None = None) -> Registry:
        """`data_revision` pins the hub revision (branch, tag, commit) of every hub question
        set, or with `DATASET@REV` (`cais/wmdp@8b85378...`) of that dataset's only (WMDP shrank
        from 4,157 to 3,668 questions in April 2024)."""
        reg = cls()
        if data_revision is not None:
            only, at, revision = data_revision.rpartition("@")
            known = sorted({t.hub[0] for t in reg.tasks.values() if t.hub is not None})
            if at and only not in known:
                raise WmdpError(f"data_revision {data_revision!r}: no task reads {only!r} "
                                f"(hub datasets: {', '.join(known)})")
            reg.tasks = {n: replace(t, revision=revision)
                         if t.hub is not None and (not at or t.hub[0] == only) else t
                         for n, t in reg.tasks.items()}
        if data_dir is not None:
            reg.add_data_dir(Path(data_dir))
        for name, path in (task_files or {}).items():
            reg.add_file(name, Path(path))
        if fmt is not None:
            if fmt not in TASK_FORMATS:
                raise WmdpError(f"format {fmt!r} is not one of {', '.join(TASK_FORMATS)}")
            reg.tasks = {n: replace(t, format=fmt) if t.kind == "mcq" else t
                         for n, t in reg.tasks.items()}
        return reg

    def add_file(self, name: str, path: Path) -> None:
        if not path.is_file():
            raise WmdpError(f"{path}: file not found (task {name})")
        if name in self.groups:
            raise WmdpError(f"--task {name}={path}: {name} is a group; name one task")
        if name in self.tasks:
            self.tasks[name] = replace(self.tasks[name], path=path, hub=None, corpus=None)
        elif name.startswith("ppl_"):  # a corpus to score by perplexity
            self.tasks[name] = Task(name, name[len("ppl_"):], path=path, kind="perplexity")
        else:
            self.tasks[name] = Task(name, name.replace("_", " "), path=path)

    def add_data_dir(self, data_dir: Path) -> None:
        if not data_dir.is_dir():
            raise WmdpError(f"{data_dir}: data directory not found")
        manifest = data_dir / "tasks.json"
        if manifest.is_file():
            self._add_manifest(manifest)
        for name, task in list(self.tasks.items()):
            if task.path is None and (found := _find_local(data_dir, name, task.kind)) is not None:
                self.tasks[name] = replace(task, path=found, hub=None, corpus=None)

    def _add_manifest(self, manifest: Path) -> None:
        spec = read_manifest(manifest)
        allowed = {"file", "topic", "format", "description", "cloze_template", "kind", "corpus"}
        for name, t in spec["tasks"].items():
            where = f'{manifest}: task "{name}"'
            if not isinstance(t, dict):
                raise WmdpError(f"{where}: expected an object of fields, found a JSON "
                                f"{_json_type(t)}")
            unknown = set(t) - allowed
            if unknown:
                raise WmdpError(f"{where}: unknown field {sorted(unknown)[0]!r}")
            wrong = sorted(k for k, v in t.items() if not isinstance(v, str))
            if wrong:
                raise WmdpError(f'{where}: field "{wrong[0]}" is {t[wrong[0]]!r}, expected a '
                                "string")
            kind = t.get("kind", "mcq")
            if kind not in TASK_KINDS:
                raise WmdpError(f'{where}: field "kind" is {kind!r}, expected one of '
                                f"{', '.join(TASK_KINDS)}")
            if kind == "perplexity":
                self.tasks[name] = _manifest_corpus_task(name, t, manifest.parent, where)
                continue
            if "corpus" in t or "file" not in t:
                raise WmdpError(f"{where}: " + ('field "corpus" is for kind "perplexity"'
                                                if "corpus" in t else 'field "file" is missing'))
            fmt = t.get("format", "letter")
            if fmt not in TASK_FORMATS:
                raise WmdpError(f'{manifest}: task "{name}": field "format" is {fmt!r}, '
                                f"expected one of {', '.join(TASK_FORMATS)}")
            template = t.get("cloze_template", Task.cloze_template)
            check_cloze_template(template, where)
            self.tasks[name] = Task(name, t.get("topic", name.replace("_", " ")),
                                    path=manifest.parent / t["file"], format=fmt,
                                    description=t.get("description"),
                                    cloze_template=template)
        for name, members in spec["groups"].items():
            if not (isinstance(members, list) and all(isinstance(m, str) for m in members)):
                raise WmdpError(f'{manifest}: group "{name}": expected a list of task names')
            self.groups[name] = list(members)
        for name in spec["groups"]:
            self._check_acyclic(name, (), manifest)

    def _check_acyclic(self, name: str, path: tuple[str, ...], manifest: Path) -> None:
        """No group contains itself, through any chain of groups."""
        if name in path:
            chain = " -> ".join((*path[path.index(name):], name))
            raise WmdpError(f"{manifest}: groups form a cycle ({chain})")
        for member in self.groups.get(name, ()):
            self._check_acyclic(member, (*path, name), manifest)

    def expand(self, names: list[str]) -> list[str]:
        """Task and group names to the ordered, de-duplicated list of tasks to run."""
        out: list[str] = []
        for name in names:
            if name.startswith(PPL_PREFIX) and name not in self.tasks:
                spec = name[len(PPL_PREFIX):]
                if not spec:
                    raise WmdpError(f"task {name!r}: name a corpus after 'ppl:' "
                                    "(a .jsonl/.txt file, wikitext, or org/name:config@split)")
                self.tasks[name] = Task(name, spec, kind="perplexity", corpus=spec)
            for t in self._leaves(name):
                if t not in out:
                    out.append(t)
        return out

    def _leaves(self, name: str) -> list[str]:
        if name in self.groups:
            return [t for member in self.groups[name] for t in self._leaves(member)]
        if name in self.tasks:
            return [name]
        raise WmdpError(self._unknown(name))

    def _unknown(self, name: str) -> str:
        """`unknown task` with the closest names and the tasks a data dir or --task added."""
        known = [*self.groups, *self.tasks]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        builtin = set(builtin_tasks()) | set(builtin_groups())
        local = [n for n in known if n not in builtin]
        mine = f"; the data dir and --task give: {', '.join(local)}" if local else ""
        return (f"unknown task {name!r}{hint}{mine} (built in: wmdp, wmdp_bio, wmdp_cyber, "
                "wmdp_chem, mmlu, mmlu_<subject>, wikitext, ppl:<corpus>)")

    def groups_of(self, tasks: list[str]) -> dict[str, list[str]]:
        """Groups whose every leaf was run, with their direct members (for aggregation)."""
        done = set(tasks)
        return {g: members for g, members in self.groups.items()
                if all(t in done for t in self._leaves(g))}


def read_manifest(manifest: Path) -> dict:
    """A data directory's `tasks.json`: an object with a "tasks" and a "groups" object, no key
    given twice (JSON keeps the last of a duplicate silently)."""
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        seen: dict = {}
        for key, value in pairs:
            if key in seen:
                raise WmdpError(f"{manifest}: key {key!r} is given twice in one object")
            seen[key] = value
        return seen

    try:
        spec = json.loads(read_text(manifest), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise WmdpError(f"{manifest} line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(spec, dict):
        raise WmdpError(f'{manifest}: expected an object with "tasks" and "groups", found '
                        f"a JSON {_json_type(spec)}")
    unknown = sorted(set(spec) - {"tasks", "groups"})
    if unknown:
        raise WmdpError(f'{manifest}: unknown key {unknown[0]!r} (known: tasks, groups)')
    for key in ("tasks", "groups"):
        spec.setdefault(key, {})
        if not isinstance(spec[key], dict):
            raise WmdpError(f'{manifest}: "{key}" is a JSON {_json_type(spec[key])}, expected '
                            "an object of names")
    return spec


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_cloze_template(template: str, where: str) -> None:
    """A cloze template names only the field `{question}` (str.format's syntax; `{{` for a
    brace)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise WmdpError(f'{where}: field "cloze_template" is not a format string ({e})') from None
    bad = [f for f in names if f != "question"]
    if bad:
        raise WmdpError(f'{where}: field "cloze_template" names {{{bad[0]}}}; the only field '
                        "is {question} (write {{ and }} for braces)")


def _manifest_corpus_task(name: str, t: dict, root: Path, where: str) -> Task:
    """A manifest's perplexity task: a `file` beside the manifest or any `corpus` spec."""
    if ("file" in t) == ("corpus" in t):
        raise WmdpError(f'{where}: give one of field "file" or field "corpus"')
    extra = sorted(set(t) & {"format", "description", "cloze_template"})
    if extra:
        raise WmdpError(f'{where}: field "{extra[0]}" does not apply to kind "perplexity"')
    topic = t.get("topic", name.replace("_", " "))
    if "file" in t:
        return Task(name, topic, path=root / t["file"], kind="perplexity")
    return Task(name, topic, kind="perplexity", corpus=str(t["corpus"]))


def _find_local(data_dir: Path, name: str, kind: str = "mcq") -> Path | None:
    """A local file for a built-in task: `wmdp_bio.jsonl`, `wmdp-bio.csv`, MMLU's
    `<subject>_test.csv` (also under `test/`), `mmlu_<subject>.parquet`, ...; for a
    perplexity task `<name>.jsonl` or `<name>.txt`."""
    if kind == "perplexity":
        found = [data_dir / f"{name}{ext}" for ext in CORPUS_SUFFIXES]
        return next((p for p in found if p.is_file()), None)
    stems = [name, name.replace("_", "-")]
    if name.startswith("mmlu_"):
        subject = name[len("mmlu_"):]
        stems += [subject, f"{subject}_test", f"test/{subject}_test", f"test/{subject}"]
    for stem in stems:
        for ext in FORMATS:
            p = data_dir / f"{stem}{ext}"
            if p.is_file():
                return p
    return None
