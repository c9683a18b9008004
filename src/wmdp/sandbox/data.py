"""The sandbox world on disk, in the formats every other command reads.

    write_data(make_world(WorldConfig(), seed=0), Path("sandbox/data"))

Writes into the data directory:
- `forget_bio.jsonl`, `forget_cyber.jsonl`: the hazard-proxy corpora (`text` per line: prose
  paragraphs, each stating all facts of one entity);
- `retain_<domain>.jsonl` per general domain, and `retain.jsonl` holding them all;
- `train_qa.jsonl`: the seen facts as question-answer lines in the evaluator's cloze prompt
  (`text` per line), the only questions the model trains on;
- `sandbox_<domain>.jsonl` (held-out facts) and `sandbox_<domain>_seen.jsonl` (seen facts):
  MCQs in the WMDP schema (`question`, `choices`, `answer`, `subject`);
- `tasks.json`: the tasks and groups for `wmdp eval --data-dir`;
- `world.json`: every entity, attribute pool and fact, with its seen/held-out split.
"""

from __future__ import annotations

import random
from pathlib import Path

from wmdp.io import write_json, write_jsonl
from wmdp.sandbox.world import CLOZE_TEMPLATE, World, description, domain_corpus, mcq, qa_text

TRAIN_QA = "train_qa.jsonl"
TRAIN_LETTER = "train_letter.jsonl"  # only with world.letter_variants > 0


def _rng(world: World, purpose: str) -> random.Random:
    """An independent random stream per purpose (str seeds hash the same in every process)."""
    return random.Random(f"{world.seed}:{purpose}")


def corpus_file(domain: str, role: str) -> str:
    return f"{'forget' if role == 'forget' else 'retain'}_{domain}.jsonl"


def task_name(domain: str, variant: str = "") -> str:
    """`sandbox_bio` (held-out, cloze), `sandbox_bio_seen`, `sandbox_bio_letter`."""
    return f"sandbox_{domain}" + (f"_{variant}" if variant else "")


def corpora(world: World) -> dict[str, list[str]]:
    """File name -> texts: one corpus per domain, `retain.jsonl`, and the seen QA lines."""
    out: dict[str, list[str]] = {}
    for d in world.domains:
        out[corpus_file(d.name, d.role)] = domain_corpus(world, d.name,
                                                         _rng(world, f"corpus:{d.name}"))
    retain = [t for d in world.domains if d.role == "general"
              for t in out[corpus_file(d.name, d.role)]]
    _rng(world, "retain").shuffle(retain)
    out["retain.jsonl"] = retain
    qa = [qa_text(f, world.domain(f.domain)) for f in world.facts if f.seen]
    _rng(world, "qa").shuffle(qa)
    out[TRAIN_QA] = qa
    if world.config.letter_variants:
        out[TRAIN_LETTER] = letter_texts(world, world.config.letter_variants)
    return out


def letter_texts(world: World, variants: int) -> list[str]:
    """Seen facts as letter-format MCQs with their answer letter, `variants` shuffles each:
    the evaluator's own letter prompt (lm-eval's current style), then " A".." D"."""
    from wmdp.data.mcq import MCQItem
    from wmdp.tasks import PROMPT_STYLES, Task, build_prompt

    rng = _rng(world, "letter")
    out = []
    for f in (f for f in world.facts if f.seen):
        topic = world.domain(f.domain).topic
        for _ in range(variants):
            rec = mcq(f, world, rng)
            item = MCQItem(rec["question"], tuple(rec["choices"]), rec["answer"])
            context, letters = build_prompt(item, Task("sandbox", topic), PROMPT_STYLES["lmeval"])
            out.append(context + letters[item.answer])
    rng.shuffle(out)
    return out


def questions(world: World) -> dict[str, list[dict]]:
    """Task name -> MCQ records: held-out facts and seen facts of each domain."""
    out: dict[str, list[dict]] = {}
    for d in world.domains:
        rng = _rng(world, f"mcq:{d.name}")
        facts = [f for f in world.facts if f.domain == d.name]
        out[task_name(d.name)] = [mcq(f, world, rng) for f in facts if not f.seen]
        out[task_name(d.name, "seen")] = [mcq(f, world, rng) for f in facts if f.seen]
    return out


def tasks_manifest(world: World) -> dict:
    """`tasks.json`: cloze tasks (the sandbox's default), letter versions, and their groups.

    A cloze task's description is set explicitly (the same text lm-eval's cloze prompt would
    build from its topic), so the prompt the model trained on does not depend on
    `--prompt-style`. Letter tasks leave it to the evaluator ("multiple choice questions").
    """
    tasks: dict[str, dict] = {}
    groups: dict[str, list[str]] = {}
    for d in world.domains:
        cloze = {"topic": d.topic, "format": "cloze", "description": description(d.topic),
                 "cloze_template": CLOZE_TEMPLATE}
        tasks[task_name(d.name)] = {"file": f"{task_name(d.name)}.jsonl", **cloze}
        tasks[task_name(d.name, "seen")] = {"file": f"{task_name(d.name, 'seen')}.jsonl", **cloze}
        tasks[task_name(d.name, "letter")] = {"file": f"{task_name(d.name)}.jsonl",
                                              "topic": d.topic, "format": "letter"}
        for variant, suffix in (("", ""), ("seen", "_seen"), ("letter", "_letter")):
            groups.setdefault(f"sandbox_{d.role}{suffix}", []).append(task_name(d.name, variant))
    groups["sandbox_seen"] = ["sandbox_forget_seen", "sandbox_general_seen"]
    groups["sandbox_letter"] = ["sandbox_forget_letter", "sandbox_general_letter"]
    groups["sandbox"] = ["sandbox_forget", "sandbox_general", "sandbox_seen"]
    return {"tasks": tasks, "groups": groups}


def write_data(world: World, data_dir: Path) -> list[str]:
    """Write every data file of `world` into `data_dir`; returns the file names written."""
    written = []
    for name, texts in corpora(world).items():
        write_jsonl(data_dir / name, ({"text": t} for t in texts))
        written.append(name)
    for name, records in questions(world).items():
        write_jsonl(data_dir / f"{name}.jsonl", records)
        written.append(f"{name}.jsonl")
    write_json(data_dir / "tasks.json", tasks_manifest(world))
    write_json(data_dir / "world.json", world.to_dict())
    return written + ["tasks.json", "world.json"]


def training_texts(data_dir: Path, qa_repeats: int) -> list[str]:
    """What the model trains on, read back from disk: every corpus and the seen QA lines."""
    from wmdp.data.corpus import load_corpus

    texts: list[str] = []
    for path in sorted(data_dir.glob("forget_*.jsonl")) + [data_dir / "retain.jsonl"]:
        texts += load_corpus(path).texts
    texts += load_corpus(data_dir / TRAIN_QA).texts * qa_repeats
    if (data_dir / TRAIN_LETTER).is_file():
        texts += load_corpus(data_dir / TRAIN_LETTER).texts
    return texts


def oracle_texts(world: World, data_dir: Path, qa_repeats: int) -> tuple[list[str], dict]:
    """What the oracle trains on: `training_texts` without the forget domains' prose and
    without every question-answer (and letter) line that asks about a forget-domain fact.

    Returns the texts and what was left out (counts per kind). A line is left out when it holds
    a forget fact's question verbatim; the QA and letter lines each carry exactly one question.
    """
    from wmdp.data.corpus import load_corpus

    forget = {f.question(world.domain(f.domain).kind) for f in world.facts
              if world.domain(f.domain).role == "forget"}
    texts = list(load_corpus(data_dir / "retain.jsonl").texts)
    left_out = {"forget_prose": sum(len(load_corpus(p).texts)
                                    for p in data_dir.glob("forget_*.jsonl"))}
    files = [(TRAIN_QA, qa_repeats)] + ([(TRAIN_LETTER, 1)]
                                        if (data_dir / TRAIN_LETTER).is_file() else [])
    for name, repeats in files:
        lines = load_corpus(data_dir / name).texts
        kept = [t for t in lines if not any(q in t for q in forget)]
        texts += kept * repeats
        left_out[name.removesuffix(".jsonl")] = (len(lines) - len(kept)) * repeats
    return texts, left_out


def general_qa_texts(data_dir: Path) -> list[str]:
    """The seen QA lines that ask no forget-domain question: general text the model trained on
    (the oracle's QA lines), which UNDO distils on beside retain prose (on retain prose alone the
    student loses the question format). Read from the built files only: the forget domains are
    those with a `forget_<domain>.jsonl`, their questions those of `sandbox_<domain>[_seen].jsonl`."""
    import json

    from wmdp.data.corpus import load_corpus

    domains = [p.stem.removeprefix("forget_") for p in sorted(data_dir.glob("forget_*.jsonl"))]
    forget = {json.loads(line)["question"] for d in domains for suffix in ("", "_seen")
              for line in (data_dir / f"{task_name(d)}{suffix}.jsonl").read_text().splitlines()
              if line.strip()}
    return [t for t in load_corpus(data_dir / TRAIN_QA).texts if not any(q in t for q in forget)]
