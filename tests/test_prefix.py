"""Prefix-only RMU: loads blocks 0..layer_id from the shards, writes a complete model directory
whose tensors are bitwise those of the full-load path, and never touches the input."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import GPT2_TOK, MISTRAL_TOK, tiny_config
from wmdp.cli import main

WORDS = "the a of virus host server module patch protein route cell byte kernel flaw".split()


def _texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def _sharded_model(tmp_path, arch, tok_dir):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    if arch == "mixtral":
        from transformers import MixtralConfig

        cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                            num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                            num_local_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=512)
    else:
        cfg = tiny_config(arch, len(tok), layers=5)
    model = AutoModelForCausalLM.from_config(cfg)
    path = tmp_path / f"{arch}-base"
    model.save_pretrained(path, max_shard_size="40KB")  # several shards
    tok.save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _digest(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _tensors(path):
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _unlearn(path, out, files, load, *extra):
    return main(["unlearn", "rmu", "--model", str(path), "--output", str(out),
                 "--forget-corpora", files["forget"], "--retain-corpora", files["retain"],
                 "--layer-id", "2", "--layer-ids", "1,2", "--steering-coeffs", "8",
                 "--alpha", "10", "--lr", "1e-3", "--batch-size", "4", "--max-num-batches", "6",
                 "--device", "cpu", "--load", load, *extra])


CASES = [("llama", MISTRAL_TOK), ("mistral", MISTRAL_TOK), ("qwen2", MISTRAL_TOK),
         ("mixtral", MISTRAL_TOK), ("gpt_neox", GPT2_TOK), ("gpt2", GPT2_TOK)]


@pytest.mark.parametrize("arch,tok_dir", CASES, ids=[c[0] for c in CASES])
def test_prefix_output_equals_full_load_output(tmp_path, arch, tok_dir):
    path = _sharded_model(tmp_path, arch, tok_dir)
    files = {}
    for name, seed in (("forget", 1), ("retain", 2)):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(24, seed)))
        files[name] = str(f)
    before = _digest(path)
    extra = ["--dtype", "float32"]
    assert _unlearn(path, tmp_path / "full", files, "full", *extra) == 0
    assert _unlearn(path, tmp_path / "prefix", files, "prefix", *extra) == 0
    assert _digest(path) == before  # the input is untouched
    rec = json.loads((tmp_path / "prefix" / "unlearn_config.json").read_text())["load"]
    assert rec["path"] == "prefix" and rec["tensors_loaded"] < rec["tensors_in_checkpoint"]
    assert json.loads((tmp_path / "full" / "unlearn_config.json").read_text())["load"]["path"] == "full"
    full, prefix = _tensors(tmp_path / "full"), _tensors(tmp_path / "prefix")
    base = _tensors(path)
    assert full.keys() == prefix.keys() == base.keys()
    assert all(torch.equal(full[k], prefix[k]) for k in full)  # bitwise
    assert any(not torch.equal(full[k], base[k]) for k in full)  # and something trained
    index = json.loads((tmp_path / "prefix" / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():  # the index names where each tensor is
        with safe_open(tmp_path / "prefix" / shard, framework="pt") as f:
            assert name in f.keys()
    # both load and score the same
    tok = AutoTokenizer.from_pretrained(tmp_path / "prefix")
    ids = tok(["the virus host module"], return_tensors="pt")
    logits = [AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()(**ids).logits
              for d in ("full", "prefix")]
    assert torch.equal(logits[0], logits[1])


def test_auto_picks_prefix_for_rmu_and_full_where_it_cannot(tmp_path):
    from wmdp.prefix import load_prefix

    path = _sharded_model(tmp_path, "llama", MISTRAL_TOK)
    model, _, plan = load_prefix(str(path), 1, dtype="float32", device="cpu")
    loaded = {n for n, p in model.named_parameters() if p.device.type != "meta"}
    assert loaded == set(plan.loaded)
    assert all(n.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))
               for n in loaded)
    assert len(model.model.layers) == 2 and model.lm_head.weight.device.type == "meta"
    files = {}
    for name, seed in (("forget", 1), ("retain", 2)):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(24, seed)))
        files[name] = str(f)
    assert _unlearn(path, tmp_path / "a", files, "auto") == 0
    assert json.loads((tmp_path / "a" / "unlearn_config.json").read_text())["load"]["path"] == "prefix"
    # layer_ids above layer_id: a block above the prefix would be named, so the whole model loads
    assert _unlearn(path, tmp_path / "b", files, "auto", "--layer-ids", "1,3") == 0
    rec = json.loads((tmp_path / "b" / "unlearn_config.json").read_text())["load"]
    assert rec == {"path": "full", "why": "the method runs the whole model"}


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_prefix_in_another_dtype_equals_full_load(tmp_path, arch):
    """The converting read (float32 shards loaded as bfloat16; Mixtral's experts fused straight
    into a bfloat16 tensor) gives each tensor the full loader gives it, bit for bit."""
    from wmdp.prefix import load_prefix

    path = _sharded_model(tmp_path, arch, MISTRAL_TOK)
    prefix, _, plan = load_prefix(str(path), 1, dtype="bfloat16", device="cpu")
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).state_dict()
    got = prefix.state_dict()
    assert plan.loaded and all(got[n].dtype == torch.bfloat16 for n in plan.loaded)
    assert all(torch.equal(got[n], full[n]) for n in plan.loaded)


def test_read_tensor_maps_aligned_bytes_and_reads_misaligned(tmp_path):
    from wmdp.prefix import map_shard, read_tensor

    values = [1.5, -2.25, 2.0 ** -20]
    data = b"".join(struct.pack("<f", v) for v in values)
    info = {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}
    for pad in (4, 1):  # 4: aligned for float32, mapped; 1: misaligned, read into memory
        f = tmp_path / f"t{pad}.bin"
        f.write_bytes(b"\0" * pad + data)
        mapping = map_shard(f)
        t = read_tensor(f, pad, info, mapping)
        assert t.tolist() == values
        assert (t.data_ptr() == mapping.ctypes.data + pad) == (pad == 4)  # mapped, or a copy
        t[0] = 7.0  # a write to a mapped tensor is private: the file keeps its bytes
        assert f.read_bytes() == b"\0" * pad + data
