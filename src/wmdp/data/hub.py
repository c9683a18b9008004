"""Hub datasets: one way to read a split, resolve it without reading, and say what went wrong.

    rows, commit = read_hub_split("cais/wmdp", "wmdp-bio", "test", None, fix="...")
    splits = resolve_hub_splits("cais/wmdp", None, [("wmdp-bio", "test")], fix="...")  # no rows

Both go through `datasets`' own resolution (the card's `configs:` list, the config folders of
parquet files), so what the preflight finds is what a load reads. Errors become one line that
says what to do: a gated dataset names its access page and HF_TOKEN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wmdp.errors import WmdpError

HUB_PAGE = "https://huggingface.co/datasets/{}"


def hub_where(dataset: str, config: str | None, split: str, revision: str | None = None) -> str:
    return f"hub:{dataset}" + (f"/{config}" if config else "") + f" [{split}]" + \
        (f" @{revision}" if revision else "")


def hub_error(where: str, repo: str, e: BaseException, fix: str,
              kind: str = "dataset") -> WmdpError:
    """One line for a failed hub access (`kind`: dataset or model): gated, missing, a bad
    revision, offline, or anything else with its first line."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import (GatedRepoError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    page = HUB_PAGE.format(repo) if kind == "dataset" else f"https://huggingface.co/{repo}"
    gated = (f"{where}: gated {kind} ({{}}): request access with the form on {page}, then set "
             "HF_TOKEN to a token of that account (or run `hf auth login`)")
    revision = (f"{where}: revision not found on the hub; give a branch, tag or full commit "
                f"of {page}")
    missing = f"{where}: {kind} not found on the hub (renamed or private?); check {page}, or {fix}"
    chain, cause = [], e
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for c in chain:
        text = str(c)
        if isinstance(c, GatedRepoError):
            status = getattr(getattr(c, "response", None), "status_code", None)
            return WmdpError(gated.format(NOT_GRANTED if status == 403 else NO_TOKEN))
        if isinstance(c, DatasetNotFoundError) and "gated" in text:  # datasets drops the cause
            return WmdpError(gated.format(NO_TOKEN if "authenticated" in text else NOT_GRANTED))
        if isinstance(c, RevisionNotFoundError) or (isinstance(c, DatasetNotFoundError)
                                                    and text.startswith("Revision")):
            return WmdpError(revision)
        if isinstance(c, (RepositoryNotFoundError, DatasetNotFoundError)):
            return WmdpError(missing)
        if isinstance(c, OfflineModeIsEnabled) or "OfflineModeIsEnabled" in text:
            return WmdpError(f"{where}: not in the local cache and HF_HUB_OFFLINE=1; run once "
                             f"online to cache it, or {fix}")
    return WmdpError(f"{where}: cannot load {kind} ({first_line(e)}); {fix}")


NO_TOKEN = "no token was sent"
NOT_GRANTED = "your token has not been granted access yet"


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def read_hub_split(dataset: str, config: str | None, split: str, revision: str | None,
                   fix: str) -> tuple[Any, str | None]:
    """A hub split as a `datasets.Dataset`, and the commit it was read at.

    `load_dataset` in two steps, so the builder can say which commit `revision` (None: the
    default branch) resolved to: the datasets library pins one commit per load (`builder.hash`,
    also the name of its cache directory), so later pushes cannot mix into a run.
    """
    import datasets

    where = hub_where(dataset, config, split, revision)
    try:
        builder = datasets.load_dataset_builder(dataset, config, revision=revision)
        builder.download_and_prepare()
        ds = builder.as_dataset(split=split)
    except Exception as e:  # noqa: BLE001 - network, auth and missing-config errors alike
        raise hub_error(where, dataset, e, fix) from e
    commit = getattr(builder, "hash", None)
    return ds, commit if isinstance(commit, str) else None


@dataclass(frozen=True)
class HubSplit:
    """Where one split of a hub dataset lies, resolved without reading its rows."""

    dataset: str
    config: str | None
    split: str
    commit: str | None
    patterns: Any           # the card's data_files patterns for the split (or resolved files)
    base_path: str          # hf://datasets/<dataset>@<commit>, what the patterns are under

    def files(self, fix: str) -> list[str]:
        """The split's data files (hf:// URLs), the card's patterns resolved as the builder
        resolves them; an error when they match nothing."""
        where = hub_where(self.dataset, self.config, self.split, self.commit)
        try:
            files = self.patterns.resolve(self.base_path) if hasattr(self.patterns, "resolve") \
                else self.patterns
        except Exception as e:  # noqa: BLE001 - a pattern matching no file, gating
            raise hub_error(where, self.dataset, e, fix) from e
        if not files:
            raise WmdpError(f"{where}: the card's data files for this split match no file "
                            f"in the repository; {fix}")
        return [str(f) for f in files]


def resolve_hub_splits(dataset: str, revision: str | None,
                       wanted: list[tuple[str | None, str]], fix: str) -> list[HubSplit]:
    """Resolve each (config, split) of one hub dataset as `datasets` would load it: one
    module resolution per repository (its card), no rows read, no files listed yet."""
    import datasets
    from datasets.load import dataset_module_factory
    from huggingface_hub import HfApi

    where = hub_where(dataset, None, wanted[0][1] if wanted else "", revision)
    try:
        if not datasets.config.HF_HUB_OFFLINE:  # the hub's own answer: datasets would fall
            HfApi().dataset_info(dataset, revision=revision)  # back to an old local copy
        module = dataset_module_factory(dataset, revision=revision)
    except Exception as e:  # noqa: BLE001
        raise hub_error(where, dataset, e, fix) from e
    if module.hash == "auto":  # offline: datasets' prepared cache, the configs it holds
        return [_cached_split(dataset, config, split, revision, fix) for config, split in wanted]
    params = module.builder_configs_parameters
    configs = {c.name: c for c in (params.builder_configs or [])}
    commit = module.hash if module.hash not in (None, "auto") else None
    out = []
    for config, split in wanted:
        where = hub_where(dataset, config, split, revision)
        name = config or params.default_config_name or \
            (next(iter(configs)) if len(configs) == 1 else None)
        if name not in configs:
            known = ", ".join(sorted(configs)) or "none"
            raise WmdpError(f"{where}: no config {config!r} (the hub has: {known}); {fix}")
        data_files = configs[name].data_files or {}
        if split not in data_files:
            raise WmdpError(f"{where}: no split {split!r} (the hub has: "
                            f"{', '.join(data_files) or 'none'}); {fix}")
        out.append(HubSplit(dataset, config, split, commit, data_files[split],
                            module.builder_kwargs.get("base_path", "")))
    return out


def _cached_split(dataset: str, config: str | None, split: str, revision: str | None,
                  fix: str) -> HubSplit:
    """Offline: the split as datasets' prepared cache holds it (no files to check)."""
    import datasets

    where = hub_where(dataset, config, split, revision)
    try:
        builder = datasets.load_dataset_builder(dataset, config, revision=revision)
    except Exception as e:  # noqa: BLE001
        raise hub_error(where, dataset, e, fix) from e
    if builder.info.splits is not None and split not in builder.info.splits:
        raise WmdpError(f"{where}: the local cache holds no split {split!r}; run once online "
                        f"to cache it, or {fix}")
    return HubSplit(dataset, config, split, None, None, "")


def check_hub_split(split: HubSplit, columns: tuple[str, ...], fix: str) -> int:
    """Files listed, download access (a gated repository refuses here) and, for parquet, the
    columns of the first file (its footer); the number of files."""
    import pyarrow.parquet as pq
    from huggingface_hub import HfFileSystem, get_hf_file_metadata, hf_hub_url

    where = hub_where(split.dataset, split.config, split.split, split.commit)
    if split.patterns is None:  # offline, from datasets' prepared cache
        return 0
    files = split.files(fix)
    fs = HfFileSystem()
    try:
        resolved = fs.resolve_path(files[0])
        get_hf_file_metadata(hf_hub_url(resolved.repo_id, resolved.path_in_repo,
                                        repo_type=resolved.repo_type,
                                        revision=resolved.revision))
        if not files[0].endswith(".parquet"):
            return len(files)
        with fs.open(files[0], "rb") as f:
            names = pq.read_schema(f).names
    except Exception as e:  # noqa: BLE001
        raise hub_error(where, split.dataset, e, fix) from e
    missing = [c for c in columns if c not in names]
    if missing:
        raise WmdpError(f"{where}: {files[0].rsplit('/', 1)[-1]} has no column {missing[0]!r} "
                        f"(columns: {', '.join(names)}); {fix}")
    return len(files)


def hub_file_exists(dataset: str, filename: str, where: str, fix: str) -> bool:
    """Whether the dataset repository serves `filename` at main (a HEAD; False offline)."""
    import datasets
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    if datasets.config.HF_HUB_OFFLINE:
        return False
    try:
        get_hf_file_metadata(hf_hub_url(dataset, filename, repo_type="dataset"))
    except EntryNotFoundError:
        return False
    except Exception as e:  # noqa: BLE001 - gated, renamed, network
        raise hub_error(where, dataset, e, fix) from e
    return True
