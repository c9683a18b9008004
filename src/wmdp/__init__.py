"""wmdp: measure hazardous knowledge in causal LMs (WMDP), remove it by unlearning (RMU and
baselines), and prove that general ability survives.

    from wmdp import load_model, evaluate_model
    model, tok = load_model("HuggingFaceH4/zephyr-7b-beta", dtype="bfloat16")
    results = evaluate_model(model, tok, ["wmdp_bio", "mmlu_college_biology"])
"""

from wmdp.errors import DataError, WmdpError

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import wmdp` stays cheap, torch loads on first use
    if name in ("load_model", "decoder_layers", "mlp_out_tensor"):
        from wmdp import models
        return getattr(models, name)
    if name in ("evaluate_model", "EvalConfig", "run_eval"):
        from wmdp import evaluate
        return getattr(evaluate, name)
    if name in ("Registry", "Task"):
        from wmdp import tasks
        return getattr(tasks, name)
    raise AttributeError(name)


__all__ = ["DataError", "WmdpError", "load_model", "decoder_layers", "mlp_out_tensor",
           "evaluate_model", "EvalConfig", "run_eval", "Registry", "Task"]
