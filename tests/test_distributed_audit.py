"""The audit's relearning attack on 2 processes (both models sharded by torch FSDP2 over gloo,
on CPU) gives the one-process figures; scoring a sharded model keeps every rank in step.

What is compared with what:
- scoring: `loglikelihoods` of 5 requests in batches of 2 on a model sharded over 2 processes
  (rank 0 scores 3 rows in 2 forwards, rank 1 2 rows in 1: it must run one more, or rank 0
  waits forever inside the sharded forward) against the same call on the unsharded model in
  one process: every score within 1e-5.
- relearning: `wmdp audit --attacks relearn --set relearn.method=full` (AdamW on every weight,
  a token-mean causal-LM loss, re-evaluations between steps, the weights put back after each
  curve) as one process against the same command on 2 processes, whose shares of each batch
  hold very different token counts: the same per-question correctness at every evaluated step,
  the same reference accuracies, and each logged loss within 1e-5 (relative).
- refusals: on 2 processes, an attack that runs as one process, and LoRA relearning, stop with
  one line and exit 2 on every rank, before anything is written.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import traceback
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, save_tiny_model, write_mcq_jsonl
from test_distributed_train import _free_port

LONG = "cafe dace face fade faced decaf beef caged abed bead cafe dace face"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dp-audit")
    files = {"base": str(save_tiny_model(root / "base", "llama", tokenizer=char_tokenizer())),
             "unlearned": str(save_tiny_model(root / "unlearned", "llama",
                                              tokenizer=char_tokenizer(), seed=1)),
             "quiz": str(write_mcq_jsonl(root / "quiz.jsonl", 9))}
    # batches of 4 in a seeded order: 5, 10, 20 and 40 characters (byte tokens), so whatever
    # the order, the two shares of 2 texts hold different token counts
    for name, texts in (("forget", [LONG[:5], LONG[:10], LONG[:20], LONG[:40]]),
                        ("retain", [LONG[20:25], LONG[10:20], LONG[5:25], LONG[:40]])):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        files[name] = str(path)
    return files


def _audit_args(files: dict[str, str], out: Path, attacks: str = "relearn",
                method: str = "full") -> list[str]:
    return ["audit", "--model", files["unlearned"], "--base", files["base"],
            "--task", f"quiz={files['quiz']}", "--tasks", "quiz", "--output", str(out),
            "--dtype", "float32", "--device", "cpu", "--batch-size", "3",
            "--forget-corpora", files["forget"], "--retain-corpora", files["retain"],
            "--attacks", attacks, "--set", f"relearn.method={method}",
            "--set", "relearn.num_texts=4", "--set", "relearn.batch_size=4",
            "--set", "relearn.steps=4", "--set", "relearn.eval_every=2",
            "--set", "relearn.lr=3e-2", "--set", "relearn.disjoint=false"]


REQUESTS = [("the quiz asks", [" abed"]), ("beef", [" caged"]),
            ("a longer context for the third request", [" face fade decaf"]),
            ("x", [" y"]), ("bead cafe", [" dace face fade"])]  # 5 rows


def _requests():
    from wmdp.scoring import Request

    return [Request(context, tuple(conts)) for context, conts in REQUESTS]


def _jobs(rank: int, files: dict[str, str], root: Path) -> None:
    import contextlib
    import io

    from wmdp.cli import main
    from wmdp.distributed import init_from_env
    from wmdp.models import load_model
    from wmdp.scoring import loglikelihoods
    from wmdp.unlearn.parallel import shard_model

    init_from_env()
    model, tok = load_model(files["base"], dtype="float32", device="cpu")
    shard_model(model, "cpu")
    with torch.no_grad():
        lls = loglikelihoods(model, tok, _requests(), batch_size=2, progress=False)
    if rank == 0:
        (root / "sharded_lls.json").write_text(json.dumps(lls))

    assert main(_audit_args(files, root / "two")) == 0
    for attacks, method, want in (("relearn,probe", "full", "the probe attack runs as one"),
                                  ("relearn", "lora", "relearn.method=lora runs as one")):
        out = root / f"bad-{attacks}-{method}"
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(_audit_args(files, out, attacks, method)) == 2
        assert err.getvalue().count("\n") == 1 and want in err.getvalue(), err.getvalue()
        assert not out.exists()  # refused on every rank before rank 0 made the directory


def _worker(rank: int, port: int, files: dict[str, str], root: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        _jobs(rank, files, root)
    except BaseException:  # noqa: BLE001 - reported to the parent through a file
        (root / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)  # no pytest teardown in a forked child


def test_relearning_on_two_processes_gives_the_one_process_figures(setup, tmp_path):
    from wmdp.cli import main
    from wmdp.models import load_model
    from wmdp.scoring import build_rows, encode_requests, loglikelihoods

    tok = char_tokenizer()
    for name in ("forget", "retain"):  # no split into 2 + 2 texts has equal token counts
        counts = [len(tok(json.loads(x)["text"])["input_ids"])
                  for x in Path(setup[name]).read_text().splitlines()]
        assert sorted(counts) == [5, 10, 20, 40], counts
    model, tok = load_model(setup["base"], dtype="float32", device="cpu")
    rows = build_rows(encode_requests(tok, _requests(), None), 512)
    assert len(rows) == 5  # 3 rows (2 batches) on rank 0, 2 (1 batch) on rank 1
    with torch.no_grad():
        one_lls = loglikelihoods(model, tok, _requests(), batch_size=2, progress=False)
    assert main(_audit_args(setup, tmp_path / "one")) == 0

    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, setup, tmp_path)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    errors = [tmp_path / f"rank{r}.err" for r in (0, 1)]
    assert all(p.exitcode == 0 for p in procs), "\n".join(
        e.read_text() for e in errors if e.is_file()) or [p.exitcode for p in procs]

    two_lls = json.loads((tmp_path / "sharded_lls.json").read_text())
    assert [len(x) for x in two_lls] == [len(x) for x in one_lls]
    assert max(abs(a - b) for x, y in zip(two_lls, one_lls) for a, b in zip(x, y)) < 1e-5

    one, two = (json.loads((tmp_path / d / "audit.json").read_text()) for d in ("one", "two"))
    assert two["reference"] == one["reference"]
    r1, r2 = one["attacks"]["relearn"], two["attacks"]["relearn"]
    curves = [k for k in r1["tasks"]["quiz"] if k.endswith(("_forget", "_retain"))]
    assert len(curves) == 4
    for key in curves:
        a, b = r1["tasks"]["quiz"][key], r2["tasks"]["quiz"][key]
        assert b["acc"] == a["acc"], key
        assert b["loss"][0] is None and b["loss"][1:] == pytest.approx(a["loss"][1:], rel=1e-5)
    assert r1["tasks"]["quiz"]["steps"] == [0, 2, 4]
    # the attack moved the weights (the loss fell), and each curve started from the same
    # weights (restored after the one before): the base's two curves start from one accuracy
    base_f = r1["tasks"]["quiz"]["base_forget"]
    assert base_f["loss"][2] < base_f["loss"][1]
    assert r2["recovery"] == r1["recovery"]
    assert (tmp_path / "two" / "verdicts.md").is_file()
