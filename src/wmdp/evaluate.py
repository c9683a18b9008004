"""Evaluate a causal LM on multiple-choice tasks; write results.json and samples_<task>.jsonl.

    wmdp eval --model HuggingFaceH4/zephyr-7b-beta --tasks wmdp,mmlu,wikitext --output runs/zephyr

In Python, on a model already in memory (what unlearning and the audit call):

    results = evaluate_model(model, tokenizer, ["wmdp_bio", "mmlu_virology"], registry)
    results["results"]["wmdp_bio"]["acc"]

Metrics are lm-eval's: `acc` is the argmax of summed log-likelihoods, `acc_norm` (cloze tasks)
the argmax after dividing by each choice's length in characters, `acc_stderr` the sample
standard error of the mean; a group's score is the size-weighted mean of its members, its
stderr their pooled sample stderr. Perplexity tasks (`wikitext`, `ppl:<corpus>`) report
lm-eval's rolling-window `word_perplexity`, `byte_perplexity`, `bits_per_byte` and the
token-weighted `token_perplexity` (see `wmdp.perplexity`); a group of them pools the summed
log-likelihoods and counts of its members.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wmdp.data.corpus import Corpus
from wmdp.data.mcq import MCQItem, items_hash
from wmdp.distributed import barrier, is_main, rank_world
from wmdp.errors import WmdpError
from wmdp.io import (library_versions, prepare_output_dir, read_json, sha256_json, write_json,
                     write_jsonl)
from wmdp.model_spec import ModelSpec
from wmdp.models import check_model_source
from wmdp.perplexity import DETOKENIZERS, perplexity_metrics, score_texts
from wmdp.scoring import Request, loglikelihoods
from wmdp.tasks import PROMPT_STYLES, PromptStyle, Registry, Task, build_prompt

RESULTS = "results.json"
PPL_TOTALS = ("loglikelihood", "tokens", "words", "bytes")


def samples_filename(task: str) -> str:
    """`samples_<task>.jsonl`, the name made safe for a file (`ppl:data/x.jsonl` has slashes)."""
    return f"samples_{re.sub(r'[^A-Za-z0-9_-]', '_', task)}.jsonl"


def mean_stderr(values: list[float]) -> float | None:
    """lm-eval's `mean_stderr`: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs: list[float], sizes: list[int]) -> float | None:
    """lm-eval's `pooled_sample_stderr`, how a size-weighted group combines its members."""
    if any(s is None for s in stderrs) or sum(sizes) <= len(sizes):
        return None
    var = sum((n - 1) * s ** 2 * n for n, s in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))


def add_special_tokens_for(style: PromptStyle, model: nn.Module) -> bool | None:
    """BOS handling: the tokenizer's default (current lm-eval) or none (0.4.2, but Gemma)."""
    if style.bos_model_type is not None and \
            getattr(model.config, "model_type", None) == style.bos_model_type:
        return True  # lm-eval 0.4.2 forced BOS for `model_type == "gemma"` (only that type)
    return style.add_bos


def score_task(model: nn.Module, tokenizer: Any, task: Task, items: list[MCQItem],
               style: PromptStyle, batch_size: int | str = "auto",
               progress: bool = True, stats: dict | None = None,
               max_length: int | None = None) -> tuple[dict, list[dict]]:
    """Metrics and per-item samples of one task."""
    requests = [Request(context, tuple(conts))
                for context, conts in (build_prompt(item, task, style) for item in items)]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size,
                         add_special_tokens=add_special_tokens_for(style, model),
                         max_length=max_length,
                         progress=task.name if progress else False,
                         on_batch_size=(lambda bs: stats.__setitem__("batch_size", bs))
                         if stats is not None else None)
    samples, acc, acc_norm = [], [], []
    for doc_id, (item, ll) in enumerate(zip(items, lls)):
        pred = int(np.argmax(ll))
        sample = {"doc_id": doc_id, "gold": item.answer, "pred": pred, "loglikelihoods": ll,
                  "acc": float(pred == item.answer)}
        acc.append(sample["acc"])
        if task.format == "cloze":
            lengths = np.array([float(len(c)) for c in item.choices])
            pred_norm = int(np.argmax(np.array(ll) / lengths))
            sample.update(pred_norm=pred_norm, acc_norm=float(pred_norm == item.answer))
            acc_norm.append(sample["acc_norm"])
        samples.append(sample)
    metrics: dict[str, Any] = {"acc": float(np.mean(acc)), "acc_stderr": mean_stderr(acc)}
    if acc_norm:
        metrics.update(acc_norm=float(np.mean(acc_norm)), acc_norm_stderr=mean_stderr(acc_norm))
    metrics["n"] = len(items)
    return metrics, samples


def score_perplexity_task(model: nn.Module, tokenizer: Any, task: Task, texts: list[str],
                          style: PromptStyle, batch_size: int | str = "auto",
                          progress: bool = True, stats: dict | None = None,
                          max_length: int | None = None) -> tuple[dict, list[dict]]:
    """Metrics and per-text samples of one perplexity task (BOS handling and the first token's
    prefix as the prompt style: 0.4.2 predicted it from EOS, current lm-eval from BOS)."""
    return score_texts(model, tokenizer, texts, batch_size=batch_size,
                       add_special_tokens=add_special_tokens_for(style, model),
                       prefix=style.rolling_prefix,
                       max_length=max_length, progress=task.name if progress else False,
                       stats=stats, detokenize=DETOKENIZERS[task.detokenizer]
                       if task.detokenizer else None)


def aggregate_groups(results: dict[str, dict], groups: dict[str, list[str]]) -> dict[str, dict]:
    """Size-weighted group scores with pooled stderrs, nested groups first (lm-eval's way)."""
    out: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name in results:
            return results[name]
        if name not in out:
            members = [get(m) for m in groups[name]]
            sizes = [m["n"] for m in members]
            g: dict[str, Any] = {}
            for metric in ("acc", "acc_norm"):
                if all(metric in m for m in members):
                    g[metric] = sum(m[metric] * n for m, n in zip(members, sizes)) / sum(sizes)
                    g[f"{metric}_stderr"] = pooled_stderr(
                        [m[f"{metric}_stderr"] for m in members], sizes)
            if all(m.get("kind") == "perplexity" for m in members):  # pool the corpus totals
                totals = {k: sum(m[k] for m in members) for k in PPL_TOTALS}
                g.update(perplexity_metrics(*(totals[k] for k in PPL_TOTALS)), **totals,
                         kind="perplexity")
            g["n"] = sum(sizes)
            g["members"] = list(groups[name])
            out[name] = g
        return out[name]

    for name in groups:
        get(name)
    return out


@dataclass
class EvalConfig(ModelSpec):
    """Everything that can change a number, recorded in results.json (the model fields are
    ModelSpec's)."""

    model: str = "<in-memory>"      # hub id or local directory ("<in-memory>": passed in code)
    batch_size: int | str = "auto"
    max_length: int | None = None   # context length; None: the model's (lm-eval's default)
    prompt_style: str = "lmeval"
    format: str | None = None       # force every task to "letter" or "cloze"
    limit: int | None = None
    data_dir: str | None = None
    task_files: dict[str, str] = field(default_factory=dict)
    data_revision: str | None = None  # hub question sets read at this revision (None: main)
    seed: int = 1234                # scoring is deterministic; recorded for completeness

    def fingerprint(self) -> str:
        """A hash of the settings that change numbers (not batch size: padding cannot)."""
        keys = ("model", "revision", "dtype", "prompt_style", "format", "limit", "data_dir",
                "task_files") + tuple(k for k in ("max_length", "data_revision")
                                      if getattr(self, k) is not None)
        return sha256_json({k: getattr(self, k) for k in keys})

    def validate(self) -> None:
        """Settings no run can use: one line, before anything is read or written."""
        _style(self.prompt_style)
        if self.batch_size != "auto" and not (str(self.batch_size).isdigit()
                                              and int(self.batch_size) >= 1):
            raise WmdpError(f"--batch-size is {self.batch_size!r}, expected a positive "
                            "integer or 'auto'")
        for flag, value in (("--max-length", self.max_length), ("--limit", self.limit)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise WmdpError(f"{flag} is {value}, expected a positive number"
                                + (" of tokens" if flag == "--max-length" else " of questions"))


def _style(name: str) -> PromptStyle:
    if name not in PROMPT_STYLES:
        raise WmdpError(f"prompt style {name!r} is not one of {', '.join(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def run_record(model: nn.Module, config: EvalConfig, stats: dict) -> dict:
    params = next(model.parameters())
    device_count = torch.cuda.device_count() if params.device.type == "cuda" else 0
    return {
        **{k: v for k, v in config.__dict__.items()},
        "batch_size_used": stats.get("batch_size"),
        "model_dtype": str(params.dtype).removeprefix("torch."),
        "model_type": getattr(model.config, "model_type", None),
        "commit_hash": getattr(model.config, "_commit_hash", None),
        "padding_side": "right",
        "device_used": str(params.device),
        "device_count": device_count,
        "world_size": rank_world()[1],
        "prompt_template": {"letter": build_prompt(
            MCQItem("{question}", ("{c0}", "{c1}", "{c2}", "{c3}"), 0),
            Task("{task}", "{topic}"), _style(config.prompt_style))[0]},
        "versions": library_versions(),
    }


def evaluate_model(model: nn.Module, tokenizer: Any, tasks: list[str],
                   registry: Registry | None = None, *, config: EvalConfig | None = None,
                   output: Path | None = None, progress: bool = True,
                   items: dict[str, list[MCQItem] | Corpus | list[str]] | None = None,
                   provenance: dict[str, dict] | None = None) -> dict:
    """Score `tasks` (names or groups); with `output`, write files and resume finished tasks.

    `items` holds data already loaded (by task name): question sets, or for perplexity tasks a
    Corpus or a list of texts; others are loaded here. `provenance`: what exactly each of those
    was read from (see `Task.load_with_provenance`), recorded under "sources". Without `output`,
    the returned dict also holds the per-item samples under "samples". With `output`, tasks
    already in its results.json (same configuration) stay there: a rerun with other tasks
    merges into it, and groups are computed from every task present.
    """
    config = config or EvalConfig()
    config.validate()
    registry = registry or Registry.build(config.data_dir, config.task_files, config.format,
                                          config.data_revision)
    style = _style(config.prompt_style)
    names = registry.expand(tasks)
    _check_distinct_files(names)
    previous = _previous_results(output, config)
    results: dict[str, dict] = dict(previous.get("results", {}))
    sources: dict[str, dict] = dict(previous.get("sources", {}))
    samples: dict[str, list[dict]] = {}
    stats: dict = {}
    for name in names:
        if name in results and output is not None and (output / samples_filename(name)).is_file():
            continue
        task = registry.tasks[name]
        data, record = (((items or {})[name], (provenance or {}).get(name, {}))
                        if (items or {}).get(name) else task.load_with_provenance())
        t0 = time.perf_counter()
        score = _score_corpus if task.kind == "perplexity" else _score_questions
        results[name], samples[name], sources[name] = score(model, tokenizer, task, data, style,
                                                            config, progress, stats)
        sources[name].update(record)
        results[name]["seconds"] = round(time.perf_counter() - t0, 3)
        if output is not None and is_main():  # each task lands on disk as it finishes
            write_jsonl(output / samples_filename(name), samples.pop(name))
            write_json(output / RESULTS, _summary(results, sources, registry, model, config, stats))
    summary = _summary(results, sources, registry, model, config, stats)
    if output is not None and is_main():
        write_json(output / RESULTS, summary)
    else:
        summary["samples"] = samples
    return summary


def _previous_results(output: Path | None, config: EvalConfig) -> dict:
    """The results.json a rerun merges into: only one written under the same configuration."""
    if output is None or not (output / RESULTS).is_file():
        return {}
    previous = read_json(output / RESULTS)
    if previous.get("fingerprint") != config.fingerprint():
        raise WmdpError(f"{output}: output directory holds results of a different configuration "
                        "(use --overwrite to replace them, or another --output)")
    return previous


def _check_finite(task: str, values: list[float], what: str) -> None:
    """An accuracy or perplexity from NaN/inf scores would look like a real result."""
    bad = sum(not math.isfinite(v) for v in values)
    if bad:
        raise WmdpError(f"task {task}: {bad} of {len(values)} {what} have non-finite "
                        "log-likelihoods (NaN or inf); the model's weights or activations are "
                        "not finite, so no score is reported")


def _score_questions(model: nn.Module, tokenizer: Any, task: Task, items: list[MCQItem],
                     style: PromptStyle, config: EvalConfig, progress: bool,
                     stats: dict) -> tuple[dict, list[dict], dict]:
    """An MCQ task's results entry, samples and source record."""
    items = items[:config.limit] if config.limit is not None else items
    metrics, samples = score_task(model, tokenizer, task, items, style, config.batch_size,
                                  progress, stats, max_length=config.max_length)
    # a question's sum is non-finite when any of its choices' log-likelihoods is
    _check_finite(task.name, [sum(s["loglikelihoods"]) for s in samples], "questions")
    return ({**metrics, "format": task.format}, samples,
            {"source": task.source, "sha256": items_hash(items), "n": len(items)})


def _score_corpus(model: nn.Module, tokenizer: Any, task: Task, data: Corpus | list[str],
                  style: PromptStyle, config: EvalConfig, progress: bool,
                  stats: dict) -> tuple[dict, list[dict], dict]:
    """A perplexity task's results entry, samples and source record."""
    corpus = data if isinstance(data, Corpus) else Corpus(task.name, list(data), "<in-memory>")
    if config.limit is not None:
        corpus = Corpus(corpus.name, corpus.texts[:config.limit], corpus.source)
    metrics, samples = score_perplexity_task(model, tokenizer, task, corpus.texts, style,
                                             config.batch_size, progress, stats,
                                             max_length=config.max_length)
    _check_finite(task.name, [s["loglikelihood"] for s in samples], "texts")
    return ({**metrics, "kind": "perplexity"}, samples,
            {"source": corpus.source, "sha256": corpus.sha256, "n": len(corpus.texts)})


def _check_distinct_files(names: list[str]) -> None:
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(samples_filename(name), name)
        if other != name:
            raise WmdpError(f"tasks {other!r} and {name!r} would share the samples file "
                            f"{samples_filename(name)}; rename one")


def _summary(results: dict, sources: dict, registry: Registry, model: nn.Module,
             config: EvalConfig, stats: dict) -> dict:
    return {"results": results, "groups": aggregate_groups(results, registry.groups_of(list(results))),
            "sources": sources, "config": run_record(model, config, stats),
            "fingerprint": config.fingerprint()}


def run_eval(config: EvalConfig, tasks: list[str], output: str | Path,
             overwrite: bool = False, progress: bool = True) -> dict:
    """The `wmdp eval` command: load, check the output directory, evaluate, write."""
    config.validate()
    registry = Registry.build(config.data_dir, config.task_files, config.format,
                              config.data_revision)
    if not registry.expand(tasks):  # unknown names fail here, before anything is written
        raise WmdpError("--tasks names no task (give --tasks NAME[,NAME...] or --task NAME=PATH)")
    check_model_source(config.model)
    out = Path(output)
    existed = out.exists()
    if is_main():
        prepare_output_dir(output, overwrite, RESULTS, config.fingerprint(), inputs={
            "--model": config.model, "--data-dir": config.data_dir,
            **{f"--task {n}": p for n, p in config.task_files.items()}})
    barrier()  # the other processes read the directory rank 0 prepared
    # bad data fails before the (possibly large) model loads, leaving no directory behind
    done = read_json(out / RESULTS).get("results", {}) if (out / RESULTS).is_file() else {}
    try:
        loaded = {n: registry.tasks[n].load_with_provenance()
                  for n in registry.expand(tasks) if n not in done}
    except WmdpError:
        if is_main() and not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    model, tokenizer = config.load_model()
    return evaluate_model(model, tokenizer, tasks, registry, config=config, output=out,
                          progress=progress, items={n: d for n, (d, _) in loaded.items()},
                          provenance={n: r for n, (_, r) in loaded.items()})


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def format_table(results: dict) -> str:
    """Markdown tables of every task and group: accuracy (MCQ), then perplexity."""
    rows = [(n, r) for part in ("groups", "results") for n, r in results[part].items()]
    lines = ["| task | n | acc | ± stderr | acc_norm |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['n']} | {r['acc']:.4f} | {_num(r.get('acc_stderr'))} | "
              f"{_num(r.get('acc_norm'))} |" for n, r in rows if "acc" in r]
    ppl = [(n, r) for n, r in rows if r.get("kind") == "perplexity"]
    if not ppl:
        return "\n".join(lines)
    table = ["| task | n | tokens | word_perplexity | byte_perplexity | bits_per_byte | "
             "token_perplexity |", "|---|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {n} | {r['n']} | {r['tokens']} | {_num(r['word_perplexity'])} | "
              f"{_num(r['byte_perplexity'])} | {_num(r['bits_per_byte'])} | "
              f"{_num(r['token_perplexity'])} |" for n, r in ppl]
    return "\n".join(table if len(lines) == 2 else lines + [""] + table)


def results_summary(results: dict, metric: str = "acc") -> dict[str, float]:
    """{task or group: metric} for those that report it: the flat view reports and comparisons
    use (`acc`, or e.g. `word_perplexity` for perplexity tasks)."""
    return {n: r[metric] for part in ("groups", "results") for n, r in results[part].items()
            if metric in r}


__all__ = ["EvalConfig", "evaluate_model", "run_eval", "score_task", "score_perplexity_task",
           "samples_filename", "aggregate_groups",
           "mean_stderr", "pooled_stderr", "format_table", "results_summary"]
