"""Full fine-tuning on 2 processes (torch FSDP2 over gloo, on CPU) ends at the weights of one
process with the same global batch, and resumes after an interruption.

What is compared with what: the command `wmdp unlearn npo` (its forget term, a mean over texts
of a function of each text's log-likelihood, plus its retain term, a mean over tokens; AdamW
under the linear warmup-then-decay schedule; 4 steps of a global batch of 4 texts) run as one
process, against the same command run by 2 processes in one process group (each rank trains on
2 of the 4 texts; weights, gradients and AdamW state sharded by FSDP): every tensor of the
written model.safetensors agrees within 1e-5 in float32, and so does each logged loss. The two
shares of every batch hold very different token counts, so the mean of the two ranks' own means
is not the global mean: the same 2-process run with that naive per-rank mean ends more than 1e-5
away (the test can fail). Resume: stopped by a KeyboardInterrupt at step 3 (after the step-2
checkpoint), the rerun of the same command computes steps 2 and 3 only and ends at the
1-process weights.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, save_tiny_model

TOL = 1e-5
SHORT, LONG = "abed bead", "cafe dace face fade faced decaf beef caged abed bead cafe dace face"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tiny float32 Llama over a byte-level tokenizer, and corpora whose batches of 4 put two
    short texts in the first half (rank 0's share) and two long ones in the second (rank 1's)."""
    root = tmp_path_factory.mktemp("dp")
    model = save_tiny_model(root / "model", "llama", tokenizer=char_tokenizer())
    files = {}
    for name, batch in (("forget", [SHORT, SHORT[:6], LONG, LONG[5:]]),
                        ("retain", [LONG[3:], LONG, SHORT[2:], SHORT])):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n"
                                for i in range(4) for t in batch))
        files[name] = str(path)
    return model, files


def _args(model: Path, files: dict[str, str], out: Path, method: str = "npo") -> list[str]:
    # UNDO: a teacher made already; every other row read after BOS, by its index in the global
    # batch: batches of 6 split 3 + 3, so rank 1's local and global row parities differ
    extra = ["--teacher", str(model), "--bos-prefix", "true", "--batch-size", "6"] \
        if method == "undo" else []
    return ["unlearn", method, "--model", str(model), "--output", str(out),
            "--forget-corpora", files["forget"], "--retain-corpora", files["retain"],
            "--batch-size", "4", "--max-num-batches", "4", "--max-length", "64",
            "--dtype", "float32", "--device", "cpu", "--lr", "1e-3", "--checkpoint-every", "2",
            *extra]


def _rank_jobs(rank: int, model: Path, files: dict[str, str], root: Path) -> None:
    """What each of the 2 processes runs, in one process group: the plain run, the run with a
    naive per-rank mean, and an interrupted run resumed."""
    from wmdp.cli import main
    from wmdp.unlearn import lm, npo

    assert main(_args(model, files, root / "two")) == 0
    naive = lambda total, count: total / torch.as_tensor(count).clamp(min=1.0)  # noqa: E731
    real_mean, real_loss = lm.global_mean, npo.NPO.loss
    lm.global_mean = npo.global_mean = naive
    assert main(_args(model, files, root / "naive")) == 0
    lm.global_mean = npo.global_mean = real_mean

    def interrupted(self, step):
        if step.idx == 3:
            raise KeyboardInterrupt
        return real_loss(self, step)

    npo.NPO.loss = interrupted
    assert main(_args(model, files, root / "resumed")) == 130
    assert rank != 0 or (root / "resumed" / "checkpoints" / "last.pt").is_file()
    computed = []

    def recorded(self, step):
        computed.append(step.idx)
        return real_loss(self, step)

    npo.NPO.loss = recorded
    assert main(_args(model, files, root / "resumed")) == 0
    assert computed == [2, 3], computed


def _other_methods(rank: int, model: Path, files: dict[str, str], root: Path) -> None:
    import contextlib
    import io

    from wmdp.cli import main

    for method in OTHERS:
        assert main(_args(model, files, root / f"two-{method}", method)) == 0
    for method, flags in (("rmu", []), ("ssd", []), ("ga", ["--batch-size", "1"]), ("undo", [])):
        args = ["unlearn", method, "--model", str(model), "--output", str(root / f"bad-{method}"),
                "--forget-corpora", files["forget"], "--retain-corpora", files["retain"],
                "--dtype", "float32", "--device", "cpu", *flags]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):  # one line, exit 2, on every rank; nothing kept
            assert main(args) == 2
        assert err.getvalue().count("\n") == 1, err.getvalue()
        want = {"ga": "cannot be split over 2 processes", "undo": "needs --teacher DIR"}
        assert want.get(method, "does not run data-parallel") in err.getvalue(), err.getvalue()
        # refused on every rank before rank 0 makes the output directory (else a rank could
        # look while rank 0 is still cleaning up)
        assert not (root / f"bad-{method}").exists()


def _worker(rank: int, port: int, model: Path, files: dict[str, str], root: Path,
            jobs=_rank_jobs) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        jobs(rank, model, files, root)
    except BaseException:  # noqa: BLE001 - reported to the parent through a file
        (root / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)  # no pytest teardown in a forked child


def _two_processes(jobs, model: Path, files: dict[str, str], root: Path) -> None:
    """`jobs` on 2 forked processes (they inherit the imports: no second interpreter start)."""
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, model, files, root, jobs))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    errors = [(root / f"rank{r}.err") for r in (0, 1)]
    assert all(p.exitcode == 0 for p in procs), "\n".join(
        e.read_text() for e in errors if e.is_file()) or [p.exitcode for p in procs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _losses(path: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_take_the_one_process_update_and_resume(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from wmdp.cli import main

    model, files = setup
    tok = char_tokenizer()  # the shares' token counts differ (else the naive mean is exact)
    counts = [len(tok(t)["input_ids"]) for t in [SHORT, SHORT[:6], LONG, LONG[5:]]]
    assert sum(counts[:2]) * 2 < sum(counts[2:])
    assert main(_args(model, files, tmp_path / "one")) == 0
    _two_processes(_rank_jobs, model, files, tmp_path)

    one, base = _weights(tmp_path / "one"), _weights(model)
    assert _max_diff(one, base) > 1e-3  # the run moved the weights
    assert _max_diff(_weights(tmp_path / "two"), one) < TOL
    assert _max_diff(_weights(tmp_path / "resumed"), one) < TOL
    assert _max_diff(_weights(tmp_path / "naive"), one) > TOL  # the pitfall the weighting avoids
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert [json.loads(x)["step"] for x in
            (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    record = json.loads((tmp_path / "two" / "unlearn_config.json").read_text())
    assert record["world_size"] == 2
    assert not (tmp_path / "two" / "checkpoints").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two", dtype=torch.float32)
    assert type(loaded).__name__ == "LlamaForCausalLM"  # the saved config names the HF class
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in _weights(tmp_path / "two").items())


OTHERS = ("ga", "graddiff", "llmu", "scrub", "undo")


def test_other_methods_take_the_one_process_update(setup, tmp_path):
    """GA and GradDiff (token means), LLMU (a mean over texts, random completions, a KL to the
    original weights), SCRUB (a max step inside its loss, a KL to the original weights) and
    UNDO (shrink-perturb of the sharded weights, distillation from the loaded weights): each
    method's 2-process model agrees with its 1-process model within 1e-5, and moved. RMU and SSD
    (one prefix tensor; no steps) and a batch smaller than the process count are one-line
    errors on 2 processes."""
    from wmdp.cli import main

    model, files = setup
    for method in OTHERS:
        assert main(_args(model, files, tmp_path / f"one-{method}", method)) == 0
    _two_processes(_other_methods, model, files, tmp_path)
    base = _weights(model)
    for method in OTHERS:
        one = _weights(tmp_path / f"one-{method}")
        assert _max_diff(one, base) > 1e-3, method
        assert _max_diff(_weights(tmp_path / f"two-{method}"), one) < TOL, method


def test_accelerate_launch_runs_the_same_command_on_two_processes(setup, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m wmdp unlearn npo ...` (accelerate's
    own launcher, which starts the processes through torch's elastic launcher; on a host
    without GPUs the group is gloo's) writes a model within 1e-5 of the one-process run's,
    recording 2 processes."""
    import subprocess
    import sys

    from wmdp.cli import main

    model, files = setup
    assert main(_args(model, files, tmp_path / "one")) == 0
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "wmdp", *_args(model, files, tmp_path / "two")]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _max_diff(_weights(tmp_path / "two"), _weights(tmp_path / "one")) < TOL
    record = json.loads((tmp_path / "two" / "unlearn_config.json").read_text())
    assert record["world_size"] == 2
