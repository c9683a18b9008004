"""Preflight: every source a run reads, resolved before any weights load.

    wmdp run configs/zephyr-7b-rmu.yaml      # runs this first, then the stages

A run on a real model reads a dozen hub repositories and local files over hours; one missing,
gated, renamed or malformed source should not surface after the base model's evaluation. This
resolves, without loading weights or rows:

- every task: a hub question set's config, split, revision (to its commit), download access
  (a gated repository refuses here) and columns (the parquet footer); a local file, read whole;
- every corpus the unlearning and the audit read, the same way (`text` column, or the file);
- the model: its config and tokenizer loaded, its safetensors weights listed (not read);
- the output directory: creatable, writable, not another run's.

The first problem raises one `WmdpError` line naming the source and what to do (exit 2 from the
CLI); nothing is written. On success `Preflight.record()` lists what each source resolved to.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wmdp.data.corpus import hub_corpus_location, load_corpus
from wmdp.data.hub import (HubSplit, check_hub_split, hub_error, hub_file_exists,
                            resolve_hub_splits)
from wmdp.data.mcq import HUB_FIX, MCQ_COLUMNS, load_mcq_file
from wmdp.errors import WmdpError
from wmdp.io import check_apart, read_json
from wmdp.tasks import Task

LOCAL_READ_LIMIT = 64 << 20  # local files above this are checked for existence only
CORPUS_FIX = "download the corpus and give a local .jsonl file"


@dataclass
class HubNeed:
    """One split of a hub dataset the run reads, and the columns it needs."""

    dataset: str
    config: str | None
    split: str
    revision: str | None
    columns: tuple[str, ...]
    used_by: str      # the task or corpus spec, for the message
    fix: str


@dataclass
class Preflight:
    """What one run reads and writes; `run()` resolves it all or raises the first problem."""

    model: str
    model_revision: str | None = None
    trust_remote_code: bool = False
    output: str | None = None
    expected_fingerprint: str | None = None
    overwrite: bool = False
    inputs: dict[str, Any] = field(default_factory=dict)
    tasks: list[Task] = field(default_factory=list)
    corpora: list[tuple[str, str]] = field(default_factory=list)  # (spec, text column)
    resolved: list[dict] = field(default_factory=list)

    def run(self) -> float:
        """Resolve every source; the seconds it took."""
        t0 = time.perf_counter()
        with _quiet_hub():
            self.check_output()
            needs = self.local_sources()
            self.check_hub(needs)
            self.check_model()
        return time.perf_counter() - t0

    # -- outputs ---------------------------------------------------------------------------
    def check_output(self) -> None:
        if self.output is None:
            return
        path = Path(self.output).expanduser()
        check_apart(path, self.inputs)
        if path.exists() and not path.is_dir():
            raise WmdpError(f"{path}: output path exists and is not a directory")
        if path.is_dir() and any(path.iterdir()) and not self.overwrite:
            marker = path / "run.json"
            found = None
            if marker.is_file():
                try:
                    found = read_json(marker).get("fingerprint")
                except (OSError, ValueError, AttributeError, WmdpError):
                    found = None
            if found != self.expected_fingerprint:
                raise WmdpError(f"{path}: output directory holds other files or a run with a "
                                "different configuration (use --overwrite to replace it, or "
                                "another output)")
        parent = path
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            raise WmdpError(f"{path}: cannot write here ({parent} is not writable); choose "
                            "another output")
        self.resolved.append({"output": str(path)})

    # -- tasks and corpora -----------------------------------------------------------------
    def local_sources(self) -> list[HubNeed]:
        """Read every local source (they are small); return the hub splits to resolve."""
        needs: list[HubNeed] = []
        for spec, column in self.corpora:  # first: a gated corpus fails before 57 subjects
            needs += self._corpus(spec, column, f"corpus {spec}")
        for task in self.tasks:
            if task.kind == "perplexity":
                spec = str(task.path) if task.path is not None else task.corpus
                if spec is None:
                    raise WmdpError(f"task {task.name}: no corpus (give --data-dir or --task)")
                needs += self._corpus(spec, task.text_field, f"task {task.name}")
            elif task.path is not None:
                if _small(task.path):
                    items = load_mcq_file(task.path)
                    self.resolved.append({"task": task.name, "file": str(task.path),
                                          "questions": len(items)})
            elif task.hub is not None:
                dataset, config, split = task.hub
                needs.append(HubNeed(dataset, config, split, task.revision, MCQ_COLUMNS,
                                     f"task {task.name}", HUB_FIX))
            else:
                raise WmdpError(f"task {task.name}: no data source (give --data-dir or --task)")
        return needs

    def _corpus(self, spec: str, column: str, used_by: str) -> list[HubNeed]:
        hub = hub_corpus_location(spec, column)
        if hub is None:
            path = Path(spec.removeprefix("raw:")).expanduser()
            if not path.is_file():
                raise WmdpError(f"{path}: corpus file not found ({used_by})")
            if _small(path):
                corpus = load_corpus(spec, text_field=column)
                self.resolved.append({"corpus": spec, "source": corpus.source,
                                      "texts": len(corpus.texts)})
            return []
        dataset, config, split, column, raw = hub
        jsonl = f"{config or dataset.split('/')[-1]}.jsonl"
        if raw and hub_file_exists(dataset, jsonl, f"hub:{dataset}/{jsonl}", CORPUS_FIX):
            self.resolved.append({"corpus": spec, "hub": dataset, "file": jsonl})
            return []  # the repository serves the raw lines themselves
        return [HubNeed(dataset, config, split, None, (column,), used_by, CORPUS_FIX)]

    def check_hub(self, needs: list[HubNeed]) -> None:
        """One card per (dataset, revision); then, in threads, every split's files, download
        access and columns (a listing, a HEAD and a parquet footer each)."""
        by_repo: dict[tuple[str, str | None], list[HubNeed]] = {}
        for n in needs:
            by_repo.setdefault((n.dataset, n.revision), []).append(n)
        checks: list[tuple[HubSplit, HubNeed]] = []
        for (dataset, revision), group in by_repo.items():
            wanted = list(dict.fromkeys((n.config, n.split) for n in group))
            splits = resolve_hub_splits(dataset, revision, wanted,
                                        f"{group[0].fix} ({group[0].used_by})")
            found = {(s.config, s.split): s for s in splits}
            checks += [(found[(n.config, n.split)], n) for n in group]
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(_checked, checks))
        for (s, n), result in zip(checks, results):
            if isinstance(result, WmdpError):
                raise result
            self.resolved.append({"source": n.used_by, "hub": s.dataset, "config": s.config,
                                  "split": s.split, "revision_requested": n.revision,
                                  "commit": s.commit, "files": result})

    # -- the model -------------------------------------------------------------------------
    def check_model(self) -> None:
        """Config and tokenizer loaded; safetensors weights present (listed, not read)."""
        from transformers import AutoConfig

        from wmdp.models import check_model_source, load_tokenizer

        name = check_model_source(self.model)
        try:
            config = AutoConfig.from_pretrained(name, revision=self.model_revision,
                                                trust_remote_code=self.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - transformers raises many types
            raise _model_error(name, "config", e) from e
        if not Path(name).is_dir():
            self.check_hub_weights(name)
        try:
            tokenizer = load_tokenizer(name, self.model_revision, self.trust_remote_code)
        except WmdpError as e:
            raise WmdpError(f"{str(e).rstrip(':')}; the model needs its tokenizer files "
                            "(tokenizer.json or tokenizer.model, and tokenizer_config.json)"
                            ) from e
        self.resolved.append({"model": name, "revision": self.model_revision,
                              "model_type": config.model_type,
                              "tokenizer": type(tokenizer).__name__})

    def check_hub_weights(self, name: str) -> None:
        """The hub repository lists safetensors weights; offline, the cache holds them."""
        from huggingface_hub import HfApi, constants, try_to_load_from_cache

        if constants.HF_HUB_OFFLINE:
            cached = [try_to_load_from_cache(name, f, revision=self.model_revision)
                      for f in ("model.safetensors.index.json", "model.safetensors")]
            if not any(isinstance(p, str) for p in cached):
                raise WmdpError(f"{name}: its safetensors weights are not in the local cache "
                                "and HF_HUB_OFFLINE=1; download them once online (`hf download "
                                f"{name}`), or give a local model directory")
            return
        try:
            files = [s.rfilename for s in
                     HfApi().model_info(name, revision=self.model_revision).siblings or []]
        except Exception as e:  # noqa: BLE001
            raise _model_error(name, "file list", e) from e
        if not any(f.endswith(".safetensors") for f in files):
            raise WmdpError(f"{name}: the hub repository has no .safetensors weights "
                            "(pickled weights are not loaded); convert them or give a "
                            "local directory")

    def summary(self, seconds: float) -> str:
        hub = {r["hub"] for r in self.resolved if "hub" in r}
        files = sum(1 for r in self.resolved  # a raw: hub corpus names its .jsonl file too
                    if "texts" in r or ("file" in r and "hub" not in r))
        return (f"wmdp: preflight: model {self.model} (config, tokenizer, weights listed), "
                f"{len(self.tasks)} tasks and {len(self.corpora)} corpora from {len(hub)} hub "
                f"datasets and {files} local files, output {self.output}: resolved in "
                f"{seconds:.1f} s")

    def record(self) -> list[dict]:
        return list(self.resolved)


def _small(path: Path) -> bool:
    return path.is_file() and path.stat().st_size <= LOCAL_READ_LIMIT


def _checked(check: tuple[HubSplit, HubNeed]) -> int | WmdpError:
    split, need = check
    try:
        return check_hub_split(split, need.columns, f"{need.fix} ({need.used_by})")
    except WmdpError as e:
        return e


def _model_error(name: str, what: str, e: BaseException) -> WmdpError:
    return hub_error(f"{name}: cannot load the model's {what}", name, e,
                     "give a local model directory", kind="model")


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """No download bars or info logs while resolving: the preflight prints one line."""
    import datasets
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars)

    bars, ds_bars = are_progress_bars_disabled(), datasets.utils.logging.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    disable_progress_bars()
    datasets.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        if not bars:
            enable_progress_bars()
        if ds_bars:
            datasets.utils.logging.enable_progress_bar()
        datasets.logging.set_verbosity(verbosity)
