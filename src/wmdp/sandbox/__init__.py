"""The offline sandbox: a fictional world with hazard-proxy and general domains, its corpora and
MCQs in the real formats, and a tiny Llama that learns it on a CPU in minutes.

    wmdp sandbox build --output sandbox [--seed N] [--preset default|small]
    wmdp eval --model sandbox/model --data-dir sandbox/data \\
        --tasks sandbox_forget,sandbox_general --output runs/sandbox-eval

    from wmdp.sandbox import build_sandbox, sandbox_config
    manifest = build_sandbox("sandbox", sandbox_config("small", seed=0))

Modules: `world` (facts from a seed, texts, questions), `data` (files on disk), `train`
(tokenizer, model, training loop), `build` (presets, the command, the manifest).
"""

from __future__ import annotations

from wmdp.sandbox.world import DOMAINS, World, WorldConfig, make_world


def __getattr__(name: str):  # lazy: the world needs no torch, the build does
    if name in ("build_sandbox", "sandbox_config", "SandboxConfig", "PRESETS"):
        from wmdp.sandbox import build
        return getattr(build, name)
    if name == "write_data":
        from wmdp.sandbox import data
        return data.write_data
    raise AttributeError(name)


__all__ = ["DOMAINS", "World", "WorldConfig", "make_world", "build_sandbox", "sandbox_config",
           "SandboxConfig", "PRESETS", "write_data"]
