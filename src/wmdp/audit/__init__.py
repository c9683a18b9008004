"""The robustness audit: can knowledge an unlearning method removed be recovered?

    from wmdp.audit import AuditConfig, run_audit
    record = run_audit(AuditConfig(model="runs/rmu", base="sandbox/model", tasks=["sandbox_bio"],
                                   data_dir="sandbox/data", attacks=["probe", "fewshot"],
                                   output="runs/audit"))
    record["verdicts"]["probe"]

One module per attack: `probe` (linear probes on activations), `relearn` (fine-tuning on a few
texts), `gcg` (adversarial suffixes), `fewshot` (in-context examples, an expert system prompt),
`activations` (activation norms on forget vs retain text). `run` ties them together.
"""

from wmdp.audit.run import ATTACKS, PRESETS, AuditConfig, audit_config, run_audit

__all__ = ["ATTACKS", "PRESETS", "AuditConfig", "audit_config", "run_audit"]
