"""Run the published RMU reference (centerforaisafety/wmdp, rmu/ at commit bc5e1ba) as it ran,
under the transformers it pins (4.38.2), and write the golden file `wmdp unlearn rmu` is tested
against (tests/test_rmu_reference.py).

    bash scripts/rmu_reference_golden.sh            # makes the environment, then runs this

This file runs inside that environment (transformers 4.38.2), so it imports nothing from wmdp.
The reference's code is imported from its own files, unmodified. What is patched, and only that:
- `rmu.utils.AutoModelForCausalLM`: `load_model` asks for float16 on a machine without CUDA
  and for `device_map="auto"` (which needs accelerate); the patch loads the same directory in
  float32 on the CPU, every other argument as given. The tokenizer lines of `load_model` run as
  published (slow tokenizer, EOS as pad, padding on the left).
- Recording only: `torch.nn.functional.mse_loss` is wrapped to record each value it returns (run_rmu
  prints 4 digits), a forward pre-hook records each batch's input_ids, and a forward hook on block
  `layer_id` of the updated model records step 0's forget activations. The control vectors are
  drawn by run_rmu from torch's global RNG; this driver draws the same `torch.rand(1, 1, d)` calls
  from a copy of that RNG state first and writes them out: they are the one input the wmdp run is
  given (`rmu.control_vectors`), everything else it computes itself.

Inputs it makes itself: a tiny Mistral (4 blocks, width 32, the real Mistral-7B vocabulary and
tokenizer from tests/fixtures/tokenizers/mistral-7b-v0.1), its weights set by
tests/rmu_reference.py's `init_weights` (a seeded recipe that does not depend on the transformers
version; the test builds the model with it and checks the hashes recorded here), and four corpora of fictional texts of mixed lengths (data/*.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from rmu_reference import init_weights, weight_hashes  # noqa: E402  (the test builds it alike)

WORDS = ("the a of zorblat quend mirrow vestal pline orrin gastle tumbrel fennick saltry "
         "ombre pellow quarn drisk").split()
HP = dict(layer_id=2, layer_ids=[1, 2], param_ids=[6], steering_coeffs=[6.5, 20.0],
          alpha=[100.0, 50.0], lr=1e-3, batch_size=4, max_num_batches=20, seed=42)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
CORPORA = ("bio-forget-corpus", "cyber-forget-corpus", "bio-retain-corpus", "cyber-retain-corpus")


def write_corpora(data: Path) -> None:
    """84 texts a corpus (run_rmu's step count is bounded by each corpus's number of batches),
    2 to 100 words, a few long; JSON lines as the reference's data/ holds them."""
    data.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(CORPORA):
        rng = random.Random(c)
        lines = []
        for i in range(84):
            k = 400 if i % 17 == 3 else rng.randint(2, 100)
            lines.append(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(k)),
                                     "id": i}))
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_model(tokenizer_dir: Path, path: Path) -> dict[str, torch.Tensor]:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig.from_pretrained(tokenizer_dir, **TINY)
    model = MistralForCausalLM(config).float()
    init_weights(model)
    model.save_pretrained(path, safe_serialization=True)
    for f in ("tokenizer.model", "tokenizer.json", "special_tokens_map.json"):
        shutil.copyfile(tokenizer_dir / f, path / f)
    # The fixture's tokenizer_config.json was written by a newer transformers, which adds
    # "add_prefix_space": null; 4.38.2's slow LlamaTokenizer (legacy false) then drops the "▁"
    # before each text's first word ("om bre" for "▁o mbre"), unlike the fast tokenizer. The key
    # is left out here (4.38.2's default: True), so both sides encode every text alike.
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("add_prefix_space", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Float32OnCPU:
    """Stands in for rmu.utils.AutoModelForCausalLM: float32, no device_map."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        from transformers import AutoModelForCausalLM

        kwargs.pop("device_map", None)
        kwargs["torch_dtype"] = torch.float32
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True, type=Path, help="folder holding rmu/")
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="the golden folder")
    ap.add_argument("--work", required=True, type=Path, help="scratch folder")
    args = ap.parse_args()
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    out, work = args.out.resolve(), args.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    write_corpora(out / "data")
    initial = make_model(args.tokenizer.resolve(), work / "model")
    for f in ("config.json", "tokenizer_config.json"):
        shutil.copyfile(work / "model" / f, out / f)

    sys.path.insert(0, str(args.reference.resolve()))
    import rmu.unlearn as ref_unlearn
    import rmu.utils as ref_utils

    ref_utils.AutoModelForCausalLM = Float32OnCPU  # the one I/O patch (see the docstring)
    # as rmu/unlearn.py's __main__: seeds, two loads, get_data (run from the corpora's parent)
    torch.manual_seed(HP["seed"])
    import numpy as np

    np.random.seed(HP["seed"])
    frozen_model, tokenizer = ref_utils.load_model(str(work / "model"))
    updated_model, tokenizer = ref_utils.load_model(str(work / "model"))
    os.chdir(out)
    forget_data, retain_data = ref_utils.get_data(list(CORPORA[:2]), list(CORPORA[2:]), 0, 2000,
                                                  HP["batch_size"])

    d = updated_model.config.hidden_size
    rng = torch.get_rng_state()  # the draws run_rmu is about to make, recorded
    draws = [torch.rand(1, 1, d, dtype=updated_model.dtype) for _ in forget_data]
    torch.set_rng_state(rng)

    mse_values: list[float] = []
    mse_loss = torch.nn.functional.mse_loss

    def recording_mse(*a, **k):
        value = mse_loss(*a, **k)
        mse_values.append(value.item())
        return value

    torch.nn.functional.mse_loss = recording_mse
    ids: list[torch.Tensor] = []
    updated_model.register_forward_pre_hook(
        lambda m, a, k: ids.append(k["input_ids"].clone()), with_kwargs=True)
    first: dict[str, torch.Tensor] = {}

    def keep_first(module, inputs, output):
        first.setdefault("h", output[0].detach().clone())

    updated_model.model.layers[HP["layer_id"]].register_forward_hook(keep_first)
    step0 = tokenizer(forget_data[0][0], return_tensors="pt", padding=True, truncation=True,
                      max_length=512)

    ns = Namespace(model_name_or_path=str(work / "model"),
                   module_str="{model_name}.model.layers[{layer_id}]",
                   output_dir=str(work / "ref-out"), retain_corpora=list(CORPORA[2:]),
                   forget_corpora=list(CORPORA[:2]), alpha=HP["alpha"],
                   steering_coeff_list=HP["steering_coeffs"], lr=HP["lr"], min_len=0,
                   max_len=2000, batch_size=HP["batch_size"],
                   max_num_batches=HP["max_num_batches"], layer_id=HP["layer_id"],
                   layer_ids=HP["layer_ids"], param_ids=HP["param_ids"], seed=HP["seed"],
                   verbose=False)
    ref_unlearn.run_rmu(updated_model, frozen_model, tokenizer, forget_data, retain_data, ns)
    torch.nn.functional.mse_loss = mse_loss

    steps = HP["max_num_batches"]
    assert len(mse_values) == 2 * steps and len(ids) == 2 * steps, (len(mse_values), len(ids))
    final = load_file(work / "ref-out" / "model.safetensors")
    trained = [f"model.layers.{i}.mlp.down_proj.weight" for i in HP["layer_ids"]]
    moved = sorted(k for k in final if not torch.equal(final[k], initial[k]))
    assert moved == trained, moved
    mask = step0["attention_mask"]
    tensors = {"step0_forget_h": first["h"].contiguous(),
               "step0_forget_attention_mask": mask.to(torch.int32).contiguous(),
               **{f"final/{k}": final[k].contiguous() for k in trained},
               **{f"input_ids/{i}": x.to(torch.int32).contiguous() for i, x in enumerate(ids)}}
    save_file(tensors, str(out / "golden.safetensors"))
    save_file({f"topic_{i}": u.contiguous() for i, u in enumerate(draws)},
              str(out / "control_vectors.safetensors"))
    import transformers

    golden = {
        "hparams": HP, "tiny_model": TINY,
        "attn_implementation": updated_model.config._attn_implementation,
        "forget_mse": mse_values[0::2], "retain_mse": mse_values[1::2],
        "pad_fraction_step0_forget": round(1 - mask.float().mean().item(), 4),
        "initial_weight_sha256_16": weight_hashes(initial),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
    }
    (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}: {steps} steps, forget_mse[0]={mse_values[0]:.6g}, "
          f"pads {golden['pad_fraction_step0_forget']:.0%} of step 0's forget batch")


if __name__ == "__main__":
    main()
