"""The RMU reference procedure, encoded from the published code (centerforaisafety/wmdp,
rmu/utils.py and rmu/unlearn.py at commit bc5e1ba) independently of wmdp's engine: two full
model copies, full forwards with a hook that caches a layer's output, gradients into every
layer, and the legacy `transformers.AdamW` update written out. Its input pipeline is the
reference's, not wmdp's:

- `reference_tokenizer`: `load_model`'s `tokenizer.pad_token_id = tokenizer.eos_token_id` and
  `tokenizer.padding_side = "left"` (the published code sets both; `set_left=False` leaves the
  side as the tokenizer is configured), and `run_rmu`'s `truncation_side = "right"`;
- `reference_get_data`: `get_data` reading `data/{name}.jsonl`: `json.loads(line)['text']` when
  the name contains "bio-forget-corpus", else the raw line; kept when `len(...) > min_len`;
  chunked into batches of `batch_size`;
- each step: `tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
  max_length=512 if topic_idx == 0 else 768)` for forget, 512 for retain; `model(**inputs)`
  (input_ids and attention_mask, no position ids); `mse_loss` over every position, padding too.

What the test supplies from wmdp's side, and says so: the control vectors (wmdp draws them from
its own seeded generator, a documented difference from the reference's global RNG).
Tests compare the engine with it; the speed benchmark times the engine against it. It runs under
the installed transformers, so it shares wmdp's assumptions about what the model does with
padding: it checks the procedure (inputs, schedule, loss, optimizer), not fidelity at the pads.
Fidelity to the reference as it ran is checked against the golden file the reference's own code
wrote under transformers 4.38.2 (tests/fixtures/rmu_golden; `init_weights` below builds its
tiny model).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch


def forward_with_cache(model, inputs, module, no_grad):
    cache = []

    def hook(mod, args, output):
        cache.append(output[0] if isinstance(output, tuple) else output)

    handle = module.register_forward_hook(hook)
    if no_grad:
        with torch.no_grad():
            model(**inputs)
    else:
        model(**inputs)
    handle.remove()
    return cache[0]


class NaiveLegacyAdamW:
    """transformers.AdamW as it was: bias correction in the step size, eps outside."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6):
        self.params, self.lr, self.betas, self.eps, self.t = list(params), lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        size = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, v.sqrt() + self.eps, value=-size)


def reference_tokenizer(path, set_left: bool = True):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token_id = tokenizer.eos_token_id
    if set_left:
        tokenizer.padding_side = "left"
    tokenizer.truncation_side = "right"
    return tokenizer


def reference_get_data(paths: list[Path], min_len: int, batch_size: int) -> list[list[list[str]]]:
    out = []
    for path in paths:
        data = []
        for line in open(path):  # text mode: universal newlines, each line with its "\n"
            raw_text = json.loads(line)["text"] if "bio-forget-corpus" in path.stem else line
            if len(raw_text) > min_len:
                data.append(str(raw_text))
        out.append([data[i:i + batch_size] for i in range(0, len(data), batch_size)])
    return out


def reference_run_rmu(updated, frozen, tokenizer, forget_data, retain_data, *, params_of,
                      module_of, control_vecs, alpha, lr, max_num_batches, mask_padding=False,
                      attention_mask_of=None):
    """`run_rmu`'s loop. Returns (per-step [forget_loss, retain_loss], updated model).
    `attention_mask_of(mask_2d)`, if given, is what the model gets as its attention mask (the
    loss still masks with the 2D one where `mask_padding`)."""
    updated.train()
    params = [p for layer_params in params_of(updated) for p in layer_params]
    opt = NaiveLegacyAdamW(params, lr)
    up_mod, fr_mod = module_of(updated), module_of(frozen)
    n = min(max_num_batches, min(len(f) for f in forget_data), min(len(r) for r in retain_data))

    def mse(a, b, mask):
        if not mask_padding:
            return torch.nn.functional.mse_loss(a, b.expand_as(a))
        m = mask.unsqueeze(-1).to(a.dtype)
        return ((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1])

    losses = []
    for idx in range(n):
        topic, b = idx % len(forget_data), idx // len(forget_data)
        f_in = tokenizer(forget_data[topic][b], return_tensors="pt", padding=True,
                         truncation=True, max_length=512 if topic == 0 else 768)
        h_f = forward_with_cache(updated, _masked(f_in, attention_mask_of), up_mod, no_grad=False)
        forget_loss = mse(h_f, control_vecs[topic], f_in["attention_mask"])
        r_in = tokenizer(retain_data[topic][b], return_tensors="pt", padding=True,
                         truncation=True, max_length=512)
        h_r = forward_with_cache(updated, _masked(r_in, attention_mask_of), up_mod, no_grad=False)
        h_r0 = forward_with_cache(frozen, _masked(r_in, attention_mask_of), fr_mod, no_grad=True)
        retain_loss = mse(h_r, h_r0, r_in["attention_mask"]) * alpha[topic]
        loss = forget_loss + retain_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append([forget_loss.item(), retain_loss.item()])
    return losses, updated


def _masked(inputs, attention_mask_of):
    if attention_mask_of is None:
        return inputs
    return {**inputs, "attention_mask": attention_mask_of(inputs["attention_mask"])}


def seeded_control_vecs(seed: int, hidden: int, coeffs: list[float], dtype=torch.float32):
    """The control vectors wmdp draws: uniform [0, 1) from a generator seeded with `seed`,
    normalised, times the topic's coefficient (the reference: the same from the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for coeff in coeffs:
        u = torch.rand(1, 1, hidden, generator=g)
        out.append((u / torch.norm(u) * coeff).to(dtype))
    return out


def naive_rmu(updated, frozen, tokenizer, layers_of, mlp_out_of, forget, retain, *, layer_id,
              layer_ids, steering_coeffs, alpha, lr, batch_size, max_num_batches, seed,
              mask_padding=False, attention_mask_of=None):
    """The reference procedure on in-memory texts (for the speed benchmark and the engine's
    arithmetic test): the caller's tokenizer gets the reference's settings."""
    tokenizer.pad_token_id = tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "right"
    chunk = lambda t: [t[i:i + batch_size] for i in range(0, len(t), batch_size)]  # noqa: E731
    return reference_run_rmu(
        updated, frozen, tokenizer, [chunk(t) for t in forget], [chunk(t) for t in retain],
        params_of=lambda m: [[mlp_out_of(m, i)] for i in layer_ids],
        module_of=lambda m: layers_of(m)[layer_id],
        control_vecs=seeded_control_vecs(seed, updated.config.hidden_size, steering_coeffs,
                                         next(updated.parameters()).dtype),
        alpha=alpha, lr=lr, max_num_batches=max_num_batches, mask_padding=mask_padding,
        attention_mask_of=attention_mask_of)


def init_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """The golden run's tiny model (scripts/rmu_reference_golden.py): every parameter from one
    seeded generator in sorted-name order: norms 1, embeddings N(0, 1), every other matrix
    N(0, 0.05^2). The same under any transformers version that names the parameters alike."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = 1.0 if "embed_tokens" in name else 0.05
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def weight_hashes(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The first 16 hex digits of each tensor's float32 bytes' sha256."""
    return {k: hashlib.sha256(v.float().contiguous().numpy().tobytes()).hexdigest()[:16]
            for k, v in sorted(state.items())}
