"""Data-parallel evaluation under torchrun gives the numbers of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import write_mcq_jsonl


@pytest.mark.slow
def test_two_processes_same_numbers_as_one(llama_mistral_tok, tmp_path):
    qs = write_mcq_jsonl(tmp_path / "q.jsonl", 30)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    common = ["eval", "--model", str(llama_mistral_tok), "--task", f"q={qs}", "--tasks", "q",
              "--dtype", "float32", "--device", "cpu", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "wmdp", *common, "--output", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", "-m", "wmdp",
                          *common, "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert b["config"]["world_size"] == 2 and a["config"]["world_size"] == 1
    assert a["results"]["q"]["acc"] == b["results"]["q"]["acc"]
    sa = [json.loads(x) for x in (tmp_path / "one" / "samples_q.jsonl").read_text().splitlines()]
    sb = [json.loads(x) for x in (tmp_path / "two" / "samples_q.jsonl").read_text().splitlines()]
    for x, y in zip(sa, sb, strict=True):
        assert x["pred"] == y["pred"]
        assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-5)
