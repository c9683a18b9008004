"""Selective Synaptic Dampening (SSD): Foster et al. 2024, "Fast Machine Unlearning Without
Retraining Through Selective Synaptic Dampening" (AAAI 2024, arXiv 2308.07707).

    wmdp unlearn ssd --preset sandbox --model sandbox/model --output runs/ssd ...

No training: one edit of the weights. Each parameter's importance is the diagonal of the Fisher
information, the mean over batches of the squared gradient of the LM loss (the authors' code,
if-loops/selective-synaptic-dampening `ssd.py`, `calc_importance`), on the forget corpus (f) and on
the retain corpus (r). Parameters far more important to the forget data are dampened:

    selected  = f > alpha * r
    theta    *= min(dampening * r / f, 1)       where selected; unchanged elsewhere

Published defaults: alpha (selection weighting) 10, lambda (dampening constant) 1. The paper's
r is the importance on the full training set D (forget included); `original: full` uses every
forget and retain batch for it, `retain` (the default here, as the WMDP paper's setting of
forget vs retain corpora) only the retain batches. Batches are the schedule's (`batch_size`,
`max_num_batches`), one backward pass each.

Memory: two float32 importance tensors per selected parameter (for `params: all`, twice the
model's size in float32); `params: layers|mlp_out` with `layer_ids` restricts both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from wmdp.progress import tqdm

from wmdp.errors import WmdpError
from wmdp.unlearn.lm import LMMethod, check_positive, check_settings, mean_nll, presets


@dataclass
class SSDConfig:
    """SSD's hyperparameters; defaults are the paper's."""

    alpha: float = 10.0               # selection weighting: dampen where f > alpha * r
    dampening: float = 1.0            # dampening constant lambda: factor min(lambda * r / f, 1)
    original: str = "retain"          # r's data: retain batches, or full (retain and forget)
    max_length: int = 512             # tokens per text (longer ones are cut)
    params: str = "all"               # what can be dampened: all, or layers, mlp, mlp_out
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out (empty: all)

    def __post_init__(self) -> None:
        check_settings(self, "ssd")
        check_positive(self, "ssd", "alpha", "dampening")
        if self.original not in ("retain", "full"):
            raise WmdpError(f"original {self.original!r} is not 'retain' or 'full'")


class SSD(LMMethod):
    name = "ssd"
    one_shot = True   # the loop calls apply() once instead of training steps

    def importance(self, batches: list[list[str]], progress: bool = False,
                   desc: str = "") -> list[torch.Tensor]:
        """Per tensor: the mean over `batches` of the squared gradient of the mean LM loss."""
        imp = [torch.zeros_like(t.view(), dtype=torch.float32) for t in self.tensors]
        for texts in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            for t in self.tensors:
                t.param.grad = None
            inputs = self.tokenize(texts)
            mean_nll(self.logits(inputs), inputs).backward()
            for acc, t in zip(imp, self.tensors):
                if t.param.grad is not None:
                    g = t.param.grad if t.index is None else t.param.grad[t.index]
                    acc += g.float() ** 2
        for t in self.tensors:
            t.param.grad = None
        return [acc / len(batches) for acc in imp]

    def apply(self, progress: bool = False) -> dict[str, Any]:
        c = self.config
        steps = [self.schedule[i] for i in range(self.schedule.num_batches)]  # one epoch
        forget = [s.forget for s in steps]
        retain = [s.retain for s in steps]
        f_imp = self.importance(forget, progress, "ssd: forget importance")
        r_imp = self.importance(retain, progress, "ssd: retain importance")
        if c.original == "full":  # the mean over retain and forget batches together
            r_imp = [(len(retain) * r + len(forget) * f) / (len(retain) + len(forget))
                     for r, f in zip(r_imp, f_imp)]
        reference = retain + (forget if c.original == "full" else [])
        if not all(torch.isfinite(x).all() for x in f_imp + r_imp):
            raise WmdpError("importance is not finite (NaN or inf gradients); "
                            "no weight was changed")
        selected = total = 0
        with torch.no_grad():
            for t, f, r in zip(self.tensors, f_imp, r_imp):
                mask = f > c.alpha * r
                ratio = c.dampening * r / f.clamp(min=torch.finfo(f.dtype).tiny)  # f=0: unselected
                factor = torch.where(mask, ratio.clamp(max=1.0), torch.ones_like(f))
                t.view().mul_(factor.to(t.param.dtype))
                selected += int(mask.sum())
                total += mask.numel()
        return {"selected": selected, "parameters": total,
                "selected_fraction": selected / max(total, 1),
                "forget_batches": len(forget), "reference_batches": len(reference)}

    def make_optimizer(self) -> Any:
        raise WmdpError("ssd trains nothing: it has no optimizer")


PRESETS = presets("ssd", zephyr={}, sandbox={"alpha": 1000.0})
