"""benchmarks/robustness_sandbox.py's table: every row has the header's cells, and a grid with
retain and general attack text shows each kind's worst case beside the forget text's."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "robustness_sandbox", Path(__file__).parents[1] / "benchmarks" / "robustness_sandbox.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _attack(acc: float, share: float | None) -> dict:
    return {"worst_case": {"forget_acc": acc, "general_acc": 0.9}, "recovered_share": share,
            "retain_ppl_change_after": 0.042}


def _record(kinds: list[str]) -> dict:
    accs = {"forget": (0.5, 0.25), "retain": (0.4, 0.1), "general": (0.3, None)}
    row = {"forget_acc": 0.3, "weakest_general": 0.97, "retain_ppl_change": 0.031,
           "attacks": {k: _attack(*accs[k]) for k in kinds}, "seconds": 40.0, "x_rmu": 2.0,
           "x_build": 0.2, "student_budget": 0.781}
    base = dict(row, seconds=None, x_rmu=None, x_build=None, student_budget=None)
    grid = {"data": kinds, "lrs": [1e-3], "sizes": [8], "methods": ["full"],
            "checkpoints": [10], "seeds": [0]}
    return {"grid_name": "x", "grid": grid, "worlds": {"0": {"rows": {"base": base, "m": row}}}}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_one_kind_one_column_and_three_kinds_three():
    one = bench.table(_record(["forget"])).splitlines()
    three = bench.table(_record(["forget", "retain", "general"])).splitlines()
    for lines, width in ((one, 9), (three, 11)):
        header, rule, *rows = lines[2:]
        assert len(_cells(header)) == len(_cells(rule)) == width
        assert all(len(_cells(r)) == width for r in rows)
    header, _, _, row = three[2:]
    assert "retain text: share (acc)" in header and "general text: share (acc)" in header
    # forget, then general accuracy and retain perplexity after it, then retain and general
    # text's worst cases, then cost (a distilled student's budget beside it)
    cost = "40 (2.0x, 0.20x; student 78% of training)"
    assert _cells(row)[5:] == ["25% (0.500)", "0.900", "+4.2%", "10% (0.400)", "- (0.300)", cost]
    assert _cells(one[5])[5:] == ["25% (0.500)", "0.900", "+4.2%", cost]
