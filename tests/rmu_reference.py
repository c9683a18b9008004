"""A naive RMU, written the way the reference code runs it: two full model copies, full
forwards with a hook that caches a layer's output, gradients into every layer, and the legacy
`transformers.AdamW` update written out. Tests compare the engine with it; the speed benchmark
times the engine against it."""

from __future__ import annotations

import math

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


def naive_rmu(updated, frozen, tokenizer, layers_of, mlp_out_of, forget, retain, *, layer_id,
              layer_ids, steering_coeffs, alpha, lr, batch_size, max_num_batches, seed,
              mask_padding=False):
    """Returns (per-step [forget_loss, retain_loss], updated model)."""
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "right"
    updated.train()
    frozen.eval()
    params = [mlp_out_of(updated, i) for i in layer_ids]
    opt = NaiveLegacyAdamW(params, lr)
    g = torch.Generator().manual_seed(seed)
    controls = []
    for coeff in steering_coeffs:
        u = torch.rand(1, 1, updated.config.hidden_size, generator=g)
        controls.append((u / torch.norm(u) * coeff).to(next(updated.parameters()).dtype))
    fb = [[t[i:i + batch_size] for i in range(0, len(t), batch_size)] for t in forget]
    rb = [[t[i:i + batch_size] for i in range(0, len(t), batch_size)] for t in retain]
    n = min(max_num_batches, *map(len, fb), *map(len, rb))
    up_mod, fr_mod = layers_of(updated)[layer_id], layers_of(frozen)[layer_id]
    losses = []

    def mse(a, b, mask):
        if not mask_padding:
            return torch.nn.functional.mse_loss(a, b.expand_as(a))
        m = mask.unsqueeze(-1).to(a.dtype)
        return ((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1])

    for idx in range(n):
        topic, b = idx % len(forget), idx // len(forget)
        f_in = tokenizer(fb[topic][b], return_tensors="pt", padding=True, truncation=True,
                         max_length=512 if topic == 0 else 768)
        h_f = forward_with_cache(updated, f_in, up_mod, no_grad=False)
        forget_loss = mse(h_f, controls[topic], f_in["attention_mask"])
        r_in = tokenizer(rb[topic][b], return_tensors="pt", padding=True, truncation=True,
                         max_length=512)
        h_r = forward_with_cache(updated, r_in, up_mod, no_grad=False)
        h_r0 = forward_with_cache(frozen, r_in, fr_mod, no_grad=True)
        retain_loss = mse(h_r, h_r0, r_in["attention_mask"]) * alpha[topic]
        loss = forget_loss + retain_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append([forget_loss.item(), retain_loss.item()])
    return losses, updated
