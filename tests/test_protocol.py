"""The relearning protocol: relearn and the protocol run one attack loop, and a grid point at
relearn's settings is relearn's curve; the worst case, the curve and the recovered share are
what the runs say; every model is put back."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from conftest import FIXTURES
from test_sandbox import one_thread  # noqa: F401 (autouse: 1 thread)
from wmdp.audit.attack import finetune
from wmdp.audit.common import AuditContext, Subject, task_accuracy
from wmdp.audit.protocol import (ProtocolConfig, attack_run, plan_attacks, run_protocol,
                                 sandbox_inputs, worst_case)
from wmdp.audit.relearn import RelearnConfig, relearn_curve
from wmdp.errors import WmdpError
from wmdp.robustness import protocol_table
from wmdp.tasks import PROMPT_STYLES

SANDBOX = FIXTURES / "sandbox-small"


@pytest.fixture(scope="module")
def inputs():
    """The small sandbox's model as base; the same architecture freshly initialised as the
    'unlearned' model (it knows nothing: a large gap to recover)."""
    from transformers import AutoModelForCausalLM

    got = sandbox_inputs(SANDBOX, SANDBOX / "model")
    base, tok = got.models["base"]
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(base.config)).eval()
    got.models["unlearned"] = (fresh, tok)
    return got


def _callers(fn, run):
    """What `run()` returns, and the name of each function that called `fn` meanwhile (seen by
    the profiler: `fn` itself is not replaced)."""
    callers = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is fn.__code__:
            callers.append(frame.f_back.f_code.co_name)

    sys.setprofile(profile)
    try:
        return run(), callers
    finally:
        sys.setprofile(None)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_relearn_and_the_protocol_run_the_one_attack_loop(inputs, method):
    """relearn's curve and a protocol grid point at relearn's settings each call
    `wmdp.audit.attack.finetune` once, and agree loss for loss and question for question."""
    model, tok = inputs.models["base"]
    tasks = {"sandbox_bio": inputs.forget_tasks["sandbox_bio"]}
    items = {"sandbox_bio": inputs.items["sandbox_bio"]}
    texts = [t for c in inputs.corpora["forget"] for t in c.texts[:4]]
    ref = task_accuracy(model, tok, tasks, items, "lmeval", 64)["sandbox_bio"]["correct"]
    ctx = AuditContext({"base": Subject("base", model, tok)}, tasks, items,
                       PROMPT_STYLES["lmeval"], {"base": {"sandbox_bio": ref}}, seed=2,
                       batch_size=64, progress=False)
    expected, callers = _callers(finetune, lambda: relearn_curve(
        ctx.subjects["base"], texts, ctx, RelearnConfig(num_texts=8, steps=6, eval_every=3,
                                                        lr=3e-3, method=method), "reference"))
    assert callers == ["relearn_curve"]
    evaluate = lambda m: {"correct": task_accuracy(  # noqa: E731
        m, tok, tasks, items, "lmeval", 64)["sandbox_bio"]["correct"]}
    got, callers = _callers(finetune, lambda: attack_run(
        model, tok, texts, 3e-3, method, 2, ProtocolConfig(checkpoints=[3, 6]), evaluate))
    assert callers == ["attack_run"]
    assert [p["step"] for p in got] == [3, 6]
    assert [p["correct"] for p in got] == [p["correct"]["sandbox_bio"] for p in expected[1:]]
    assert [p["loss"] for p in got] == pytest.approx([p["loss"] for p in expected[1:]],
                                                     rel=1e-6)


def test_the_grid_worst_case_curve_share_and_models_put_back(inputs):
    before = {r: copy.deepcopy(m.state_dict()) for r, (m, _) in inputs.models.items()}
    config = ProtocolConfig(data=["forget", "retain"], lrs=[3e-3], checkpoints=[2, 4],
                            sizes=[4, 8], methods=["full", "lora"], seeds=[0, 1], ppl_texts=8)
    record = run_protocol(inputs, config, progress=False)
    for role, (m, _) in inputs.models.items():
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before[role].items()), role
    base_plain = record["models"]["base"]["plain"]["forget_acc"]
    assert base_plain > 0.8 and record["models"]["unlearned"]["plain"]["forget_acc"] < 0.5
    for role, m in record["models"].items():
        assert len(m["runs"]) == 2 * 1 * 2 * 2 * 2
        for kind, attack in m["attacks"].items():
            points = [(p["forget_acc"], p) for r in m["runs"] if r["data"] == kind
                      for p in r["curve"]]
            assert len(points) == 8 * 2
            best = max(a for a, _ in points)
            w = attack["worst_case"]
            assert w["forget_acc"] == best and w["step"] in (2, 4)
            plain = m["plain"]["forget_acc"]
            if role == "unlearned":  # the literature's (attack - unlearned) / (base - unlearned)
                assert attack["recovered_share"] == pytest.approx(
                    (best - plain) / (base_plain - plain))
            if role == "base":
                assert attack["recovered_share"] is None  # no gap to recover
            for c in attack["curve"]:
                at = [a for a, p in points if p["step"] == c["step"]]
                assert c["best"] == max(at) and c["mean"] == pytest.approx(sum(at) / len(at))
            assert 0 <= w["general_acc"] <= 1 and w["retain_ppl"] > 1
    assert record["ppl_texts"] == 8
    table = protocol_table(record)
    assert table.count("\n") == 1 + 2 * 2 and "| forget | unlearned |" in table
    json.dumps(record)  # the record is plain JSON


def test_forget_attack_texts_never_name_a_measured_question(inputs):
    config = ProtocolConfig(sizes=[4, 16])
    plan = plan_attacks(inputs, config)
    texts, keep = plan.texts, plan.keep
    assert len(texts["forget"]) == 16
    for task, idx in keep.items():
        assert idx, f"every {task} question was left out"
        for i in idx:
            entity = inputs.items[task][i].question.rstrip("?").split()[-1]
            assert not any(entity in t for t in texts["forget"]), entity


def test_worst_case_is_the_attackers_best_point_not_the_average():
    runs = [{"data": "forget", "lr": lr, "size": 8, "method": "full", "seed": s,
             "curve": [{"step": 10, "forget_acc": a, "general_acc": 0.9, "retain_ppl": 2.0},
                       {"step": 30, "forget_acc": b, "general_acc": g, "retain_ppl": 3.0}]}
            for lr, s, a, b, g in [(1e-4, 0, 0.3, 0.35, 0.95), (1e-3, 0, 0.4, 0.8, 0.5),
                                   (1e-3, 1, 0.3, 0.3, 0.9)]]
    model = {"plain": {"forget_acc": 0.3}, "runs": runs}
    got = worst_case(model, "forget", base_plain=0.9,
                     config=ProtocolConfig(checkpoints=[10, 30]))
    assert got["worst_case"]["forget_acc"] == 0.8 and got["worst_case"]["lr"] == 1e-3
    assert got["worst_case"]["general_acc"] == 0.5  # the ability at that point, not the best
    assert got["recovered_share"] == pytest.approx((0.8 - 0.3) / (0.9 - 0.3))
    assert got["curve"] == [{"step": 10, "mean": pytest.approx(1.0 / 3), "best": 0.4},
                            {"step": 30, "mean": pytest.approx(1.45 / 3), "best": 0.8}]


@pytest.mark.parametrize("change,message", [
    ({"data": ["forget", "wiki"]}, "data must be among"),
    ({"checkpoints": [0, 10]}, "checkpoints must be positive"),
    ({"methods": ["qlora"]}, "methods must be full or lora"),
    ({"seeds": []}, "an empty grid axis"),
])
def test_bad_grid_is_refused(inputs, change, message):
    with pytest.raises(WmdpError, match=message):
        run_protocol(inputs, ProtocolConfig(**change), progress=False)


# -- inside `wmdp audit` ------------------------------------------------------------------------
def test_the_protocol_is_opt_in_and_its_grid_is_checked_before_models_load():
    from wmdp.audit.run import ATTACKS, AuditConfig, check_audit_config

    assert "protocol" in ATTACKS and "protocol" not in AuditConfig().attacks
    config = AuditConfig(tasks=["sandbox_bio"], attacks=["protocol"], forget_corpora=["f"],
                         retain_corpora=["r"], protocol=ProtocolConfig(lrs=[]))
    with pytest.raises(WmdpError, match="an empty grid axis"):
        check_audit_config(config)


def test_the_oracle_is_found_beside_a_sandbox_base_model(tmp_path):
    from wmdp.audit.oracle import find_oracle

    (tmp_path / "build" / "model").mkdir(parents=True)
    base = str(tmp_path / "build" / "model")
    assert find_oracle(ProtocolConfig(), base) is None  # not built
    (tmp_path / "build" / "oracle" / "model").mkdir(parents=True)
    (tmp_path / "build" / "oracle" / "model" / "config.json").write_text("{}")
    assert find_oracle(ProtocolConfig(), base) == str(tmp_path / "build" / "oracle" / "model")
    assert find_oracle(ProtocolConfig(oracle="none"), base) is None
    assert find_oracle(ProtocolConfig(oracle="elsewhere"), base) == "elsewhere"
    assert find_oracle(ProtocolConfig(), "") is None  # a model built in memory


def test_the_protocol_inside_the_audit(inputs, tmp_path, monkeypatch):
    """The smallest grid on the small sandbox: base, a knows-nothing 'unlearned' model and a
    saved fresh 'oracle'; general tasks and out-of-domain text found from the sandbox; the
    verdict's shares are the record's; a rerun resumes; the audit's models are put back."""
    from transformers import AutoModelForCausalLM

    from wmdp.audit import protocol_audit
    from wmdp.audit.run import AuditConfig, run_audit

    base, tok = inputs.models["base"]
    torch.manual_seed(1)
    oracle_dir = tmp_path / "oracle"
    AutoModelForCausalLM.from_config(copy.deepcopy(base.config)).save_pretrained(oracle_dir)
    tok.save_pretrained(oracle_dir)
    data = SANDBOX / "data"
    grid = ProtocolConfig(data=["forget", "general"], lrs=[3e-3], checkpoints=[2], sizes=[4],
                          methods=["full"], seeds=[0], ppl_texts=8, oracle=str(oracle_dir))
    config = AuditConfig(tasks=["sandbox_bio", "sandbox_cyber"], data_dir=str(data),
                         attacks=["protocol"], batch_size=64, output=str(tmp_path / "audit"),
                         forget_corpora=[str(data / "forget_bio.jsonl"),
                                         str(data / "forget_cyber.jsonl")],
                         retain_corpora=[str(data / "retain.jsonl")], protocol=grid)
    pairs = {r: inputs.models[r] for r in ("base", "unlearned")}
    before = copy.deepcopy(base.state_dict())
    record = run_audit(config, models=pairs, progress=False)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    result = record["attacks"]["protocol"]
    assert set(result["models"]) == {"base", "unlearned", "oracle"}
    assert result["sources"]["oracle"] == str(oracle_dir)
    assert result["sources"]["general_tasks"] == ["sandbox_botany", "sandbox_software",
                                                  "sandbox_geography"]
    assert result["sources"]["corpora"]["general"][0]["source"].endswith("retain_geography.jsonl")
    for role, m in result["models"].items():
        assert len(m["runs"]) == 2 and set(m["attacks"]) == {"forget", "general"}
        assert set(m["plain"]["general"]) == {"sandbox_botany", "sandbox_software",
                                              "sandbox_geography"}
    v, models = result["verdict"], result["models"]
    base_plain = models["base"]["plain"]["forget_acc"]
    for who, fig in (("unlearned", v), ("oracle", v["oracle"])):
        plain = models[who]["plain"]["forget_acc"]
        for kind, key in (("forget", ""), ("general", "_general")):
            best = max(p["forget_acc"] for r in models[who]["runs"] if r["data"] == kind
                       for p in r["curve"])
            assert fig[f"attacked{key}"] == best
            assert fig[f"recovered_fraction{key}"] == pytest.approx(
                (best - plain) / (base_plain - plain))
    assert v["base"] == base_plain and v["unlearned"] == models["unlearned"]["plain"]["forget_acc"]
    assert "oracle" in record["verdicts"]["protocol"]
    assert record["plots"]["protocol"] == "protocol.png"
    assert (tmp_path / "audit" / "protocol.png").is_file()
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["attacks"]["protocol"]["verdict"] == v
    monkeypatch.setattr(protocol_audit, "run_protocol", lambda *a, **k: 1 / 0)
    again = run_audit(config, models=pairs, progress=False)  # finished: not run again
    assert again["attacks"]["protocol"]["verdict"] == v


def test_outside_the_sandbox_the_general_tasks_must_be_named(inputs, tmp_path):
    from wmdp.audit.common import AuditContext, Subject
    from wmdp.audit.protocol_audit import audit_inputs
    from wmdp.tasks import Task

    base, tok = inputs.models["base"]
    ctx = AuditContext({"base": Subject("base", base, tok)},
                       {"wmdp_bio": Task("wmdp_bio", "biology", path=tmp_path / "wmdp_bio.jsonl")},
                       {}, PROMPT_STYLES["lmeval"], {})
    with pytest.raises(WmdpError, match="protocol.general_tasks names no task"):
        audit_inputs(ctx, ProtocolConfig())
    with pytest.raises(WmdpError, match="protocol.general_corpora names no corpus"):
        audit_inputs(ctx, ProtocolConfig(general_tasks=["mmlu_virology"]))


def test_audit_control_leaves_out_the_out_of_domain_text():
    """In an audit the control data is the retain corpora; a sandbox's retain.jsonl also holds
    its far domain's prose (the general attack's text), which the control leaves out: what is
    left is exactly the near domains' files, and a corpus with nothing left is dropped."""
    from wmdp.audit.protocol_audit import control_corpora
    from wmdp.data.corpus import load_corpus

    data = SANDBOX / "data"
    retain, far = load_corpus(data / "retain.jsonl"), load_corpus(data / "retain_geography.jsonl")
    near = [load_corpus(data / f"retain_{d}.jsonl") for d in ("botany", "software")]
    control = control_corpora([retain], [far])
    assert len(control) == 1 and not set(control[0].texts) & set(far.texts)
    assert sorted(control[0].texts) == sorted(t for c in near for t in c.texts)
    assert control_corpora(near, [far]) == near and control_corpora([far], [far]) == []
