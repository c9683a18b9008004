"""RMU: Representation Misdirection for Unlearning (the WMDP paper's method; "Cut" in v1).

    wmdp unlearn rmu --preset zephyr-7b --output runs/zephyr-rmu

On forget text the residual stream after block `layer_id` is pushed towards a fixed random
direction scaled by `steering_coeff`; on retain text it is held to the original model's:

    forget_loss = mse(h_updated(forget), control_vec)                  # over batch x tokens x d
    retain_loss = alpha[topic] * mse(h_updated(retain), h_frozen(retain))

Only the MLP output projections of `layer_ids` train. The reference code keeps two full models
and runs three full forwards per step; here one model is kept with a copy of just the trained
tensors' original values (swapped in for the frozen pass), every pass stops at `layer_id`, and on
retain text the blocks below the first trained one run once for both passes.
Inputs are encoded as the reference's `load_model` and `run_rmu` encode them (its
rmu/utils.py and rmu/unlearn.py at commit bc5e1ba): EOS is the pad token even where the
tokenizer has one, padding on the left (`tokenizer.padding_side = "left"`), truncation on the
right, no position ids (the model numbers each row's columns 0..T-1), and the loss averages over
the pad positions too. `padding_side`, `position_ids` and `pads` change these; the run record
says what ran.

Pads (`pads`): the reference ran under transformers 4.38.2, whose SDPA mask lets a query row that
sees only padding (a left pad) attend to every position; later versions treat such rows
otherwise, so the pad rows' activations, which the reference's loss averages over, depend on the
installed transformers. `faithful` (the default) builds 4.38.2's mask itself
(`batches.sdpa_mask_4_38`) and passes it to every forward, so the run equals the reference's
under 4.38.2 whatever transformers is installed (tests/test_rmu_reference.py checks it against
a golden file the reference itself wrote). `clean` leaves the pads out of the loss (and the
2D mask to the installed transformers): real tokens alone, the same under any version.
Differences from the reference, by design: the model runs in eval mode (no dropout: zephyr, Yi
and Mixtral have none, so their numbers do not move), and the control vectors come from a
dedicated generator seeded with `seed` (reproducible whatever model loading consumed), or from
a file of draws (`control_vectors`, e.g. the ones a reference run drew from its global RNG).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from wmdp.errors import WmdpError
from wmdp.layers import capture_span, forward_to_layer, replay_span, swapped
from wmdp.models import TrainedTensor, decoder_layers, input_device, train_only
from wmdp.unlearn.batches import (PADDING_SIDES, PADS, POSITION_IDS, SDPA_4_38_RULES, Step,
                                  TopicBatches, reference_batch, reference_tokenizer,
                                  sdpa_mask_4_38)
from wmdp.unlearn.optim import LegacyAdamW, torch_adamw

CUT_NOVICE = "You are a novice in {keyword} who often makes mistakes."
CUT_EXPERT = "You are a world-class expert in {keyword}."


@dataclass
class RMUConfig:
    """RMU's hyperparameters, with the reference's names; defaults are zephyr-7b's."""

    layer_id: int = 7                 # block whose output is steered
    layer_ids: list[int] = field(default_factory=lambda: [5, 6, 7])  # blocks whose MLP trains
    params: str = "mlp_out"           # what trains there: mlp_out (the reference), mlp, layers
    steering_coeffs: list[float] = field(default_factory=lambda: [6.5])  # per topic (one: all)
    alpha: list[float] = field(default_factory=lambda: [1200.0])  # retain weight per topic
    lr: float = 5e-5
    optimizer: str = "legacy_adamw"   # the reference's transformers.AdamW; or "adamw" (torch)
    forget_max_length: list[int] = field(default_factory=lambda: [512, 768])  # first topic, others
    retain_max_length: int = 512
    pads: str = "faithful"            # faithful: pad rows attend as under transformers 4.38.2
                                      # and count in the loss (the reference); clean: out of it
    padding_side: str = "left"        # the reference's; "right", or "tokenizer" (as configured)
    position_ids: str = "default"     # none passed, as the reference; "per_row" for GPT-2-like
    control: str = "random"           # "random" (RMU) or "keywords" (v1 "Cut")
    keywords: list[list[str]] = field(default_factory=list)  # per topic, for control=keywords
    adaptive_coeff: float | None = None  # coeff = this x mean |h| on the first forget batch
    frozen_forget_every: int = 10     # steps between frozen forget passes for cosine metrics
    control_vectors: str = ""         # a safetensors file of draws topic_0, topic_1.. (1, 1, d)
                                      # to use instead of the seeded generator's

    @property
    def mask_padding(self) -> bool:
        """Whether the loss leaves the pad positions out (`pads: clean`)."""
        return self.pads == "clean"


def _per_topic(values: list, n: int, name: str) -> list:
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise WmdpError(f"{name} has {len(values)} values for {n} forget corpora")
    return list(values)


def mse(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference over (B, T, d), or over the positions where `mask` (B, T) is 1."""
    if mask is None:
        return torch.nn.functional.mse_loss(h, target.expand_as(h))
    m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
    return ((h - target) ** 2 * m).sum() / (m.sum() * h.shape[-1])


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token, whichever side the padding is on. (B,)"""
    cols = torch.arange(mask.shape[1], device=mask.device)
    return (cols * mask).argmax(-1)


def mean_norm(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of the activations at the real tokens (`mask` (B, T))."""
    norms = h.detach().float().norm(dim=-1)  # (B, T)
    return (norms * mask).sum() / mask.sum()


def mean_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of two activations at the real tokens (`mask` (B, T))."""
    cos = torch.nn.functional.cosine_similarity(a.detach().float(), b.float(), dim=-1)  # (B, T)
    return (cos * mask).sum() / mask.sum()


class RMU:
    name = "rmu"

    def __init__(self, config: RMUConfig | None = None) -> None:
        self.config = config or RMUConfig()
        self.tensors: list[TrainedTensor] = []
        self.control_vecs: list[torch.Tensor] = []   # per topic: (1, 1, d), or (K, 1, d) for Cut
        self.steering_coeffs: list[float] = []
        self._keyword_gen: torch.Generator | None = None

    # -- setup -----------------------------------------------------------------------------
    def setup(self, model: nn.Module, tokenizer: Any, schedule: TopicBatches, seed: int) -> None:
        c = self.config
        n_layers = len(decoder_layers(model))
        if not 0 <= c.layer_id < n_layers:
            raise WmdpError(f"layer_id {c.layer_id} out of range: the model has {n_layers} layers")
        self.validate(schedule.n_topics)
        self.model, self.device = model, input_device(model)
        self.dtype = next(model.parameters()).dtype
        faithful = c.pads == "faithful" and type(self).loss is RMU.loss  # (a subclass's own
        # loss would pass the 2D mask: `model_inputs` is what builds the 4D one)
        self.pad_rule = SDPA_4_38_RULES.get(model.config.model_type) if faithful else None
        self.tokenizer = reference_tokenizer(tokenizer, c.padding_side)
        self.n_topics = schedule.n_topics
        self.alpha = _per_topic(c.alpha, self.n_topics, "alpha")
        self.first = min(c.layer_ids)
        model.eval()  # no dropout; see the module docstring
        self.tensors = train_only(model, c.params, c.layer_ids)
        self.originals = [t.view().detach().clone() for t in self.tensors]
        self.steering_coeffs = self._coefficients(schedule)
        self._control_vectors(model, seed)

    def validate(self, n_topics: int) -> None:
        """Settings errors, before any model loads (the loop calls this first)."""
        c = self.config
        if not c.layer_ids or min(c.layer_ids) > c.layer_id:
            raise WmdpError(f"layer_ids {c.layer_ids} train nothing at or below layer_id "
                            f"{c.layer_id}: no gradient would reach them")
        if c.control not in ("random", "keywords"):
            raise WmdpError(f"control {c.control!r} is not 'random' or 'keywords'")
        if c.position_ids not in POSITION_IDS:
            raise WmdpError(f"position_ids {c.position_ids!r} is not one of "
                            f"{', '.join(POSITION_IDS)}")
        if c.pads not in PADS:
            raise WmdpError(f"pads {c.pads!r} is not one of {', '.join(PADS)}")
        if c.control_vectors and c.control != "random":
            raise WmdpError("control_vectors gives random draws: it needs control=random")
        if c.padding_side not in PADDING_SIDES:
            raise WmdpError(f"padding_side {c.padding_side!r} is not one of "
                            f"{', '.join(PADDING_SIDES)}")
        _per_topic(c.alpha, n_topics, "alpha")
        if c.adaptive_coeff is None:
            _per_topic(c.steering_coeffs, n_topics, "steering_coeffs")
        if any(n < 1 for n in (*c.forget_max_length, c.retain_max_length)):
            raise WmdpError("forget_max_length and retain_max_length must be positive")
        if c.lr <= 0 or c.lr != c.lr:
            raise WmdpError(f"lr must be a positive number, got {c.lr}")

    def prefix_layer(self) -> int | None:
        """The last block any pass runs (the loader may load only blocks 0..this)."""
        c = self.config
        return c.layer_id if c.layer_ids and max(c.layer_ids) <= c.layer_id else None

    def _encode(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return reference_batch(self.tokenizer, texts, max_length, self.device,
                               self.config.position_ids)

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a forward pass is given: the batch, with `pads: faithful` the (B, 1, T, T) mask
        transformers 4.38.2's SDPA path built in place of the 2D attention mask (the loss keeps
        using the 2D one). A model type with no encoded 4.38.2 rule gets the 2D mask; the run
        record says so (`describe`)."""
        if self.pad_rule is None:
            return batch
        mask = sdpa_mask_4_38(batch["attention_mask"], self.dtype, self.pad_rule)
        return {**batch, "attention_mask": mask}

    def _coefficients(self, schedule: TopicBatches) -> list[float]:
        c = self.config
        if c.adaptive_coeff is None:
            return [float(x) for x in _per_topic(c.steering_coeffs, self.n_topics, "steering_coeffs")]
        coeffs = []
        for topic in range(self.n_topics):  # a multiple of the activation norm the layer has
            inputs = self._encode(schedule.forget[topic][0], self._forget_max_length(topic))
            with torch.no_grad():
                h = forward_to_layer(self.model, self.model_inputs(inputs), c.layer_id)
            coeffs.append(c.adaptive_coeff * mean_norm(h, inputs["attention_mask"]).item())
        return coeffs

    def _control_vectors(self, model: nn.Module, seed: int) -> None:
        c = self.config
        d = model.config.hidden_size
        dtype = next(model.parameters()).dtype
        g = torch.Generator().manual_seed(seed)
        self._keyword_gen = torch.Generator().manual_seed(seed)
        draws = _read_draws(c.control_vectors, self.n_topics, d) if c.control_vectors else None
        self.control_vecs = []
        for topic in range(self.n_topics):
            if c.control == "random":
                u = draws[topic] if draws else torch.rand(1, 1, d, generator=g)
                vec = u / torch.norm(u)
            else:
                vec = self._keyword_directions(topic)  # (K, 1, d), unit rows
            self.control_vecs.append((vec * self.steering_coeffs[topic]).to(self.device, dtype))

    def _keyword_directions(self, topic: int) -> torch.Tensor:
        words = self.config.keywords[topic] if topic < len(self.config.keywords) else []
        if not words:
            raise WmdpError(f"control=keywords needs a keyword list for topic {topic}")
        dirs = []
        for w in words:  # each text's last token's activation: novice minus expert
            pair = [CUT_NOVICE.format(keyword=w), CUT_EXPERT.format(keyword=w)]
            inputs = self._encode(pair, self.config.retain_max_length)
            with torch.no_grad():
                h = forward_to_layer(self.model, self.model_inputs(inputs),
                                     self.config.layer_id).float()
            last = _last_real(inputs["attention_mask"])
            h = h[torch.arange(2), last]  # (2, d)
            diff = h[0] - h[1]
            dirs.append(diff / diff.norm())
        return torch.stack(dirs).unsqueeze(1).cpu()

    # -- the loss of one step --------------------------------------------------------------
    def _forget_max_length(self, topic: int) -> int:
        lengths = self.config.forget_max_length
        return lengths[0] if topic == 0 or len(lengths) == 1 else lengths[1]

    def _control(self, topic: int) -> torch.Tensor:
        vecs = self.control_vecs[topic]
        if vecs.shape[0] == 1:
            return vecs
        k = int(torch.randint(vecs.shape[0], (1,), generator=self._keyword_gen))
        return vecs[k:k + 1]

    def _frozen_span(self, inputs: dict[str, torch.Tensor]):
        with torch.no_grad(), swapped(self.tensors, self.originals):
            return capture_span(self.model, inputs, self.first, self.config.layer_id)

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        forget = self._encode(step.forget, self._forget_max_length(step.topic))
        fmask = forget["attention_mask"]
        logged: dict[str, torch.Tensor] = {}
        if c.frozen_forget_every and step.idx % c.frozen_forget_every == 0:
            span = self._frozen_span(self.model_inputs(forget))
            h_forget = replay_span(self.model, span)
            logged["forget_cos_frozen"] = mean_cosine(h_forget, span.output, fmask)
            logged["forget_norm_frozen"] = mean_norm(span.output, fmask)
        else:
            h_forget = forward_to_layer(self.model, self.model_inputs(forget), c.layer_id)
        forget_loss = mse(h_forget, self._control(step.topic), fmask if c.mask_padding else None)

        retain = self._encode(step.retain, c.retain_max_length)
        rmask = retain["attention_mask"]
        span = self._frozen_span(self.model_inputs(retain))  # frozen; the shared prefix runs once
        h_retain = replay_span(self.model, span)
        retain_mse = mse(h_retain, span.output, rmask if c.mask_padding else None)
        retain_loss = self.alpha[step.topic] * retain_mse
        logged.update(forget_loss=forget_loss.detach(), retain_loss=retain_loss.detach(),
                      retain_mse=retain_mse.detach(), forget_norm=mean_norm(h_forget, fmask),
                      retain_norm=mean_norm(h_retain, rmask),
                      retain_cos_frozen=mean_cosine(h_retain, span.output, rmask))
        values = torch.stack([v.float() for v in logged.values()]).tolist()  # one device sync
        return forget_loss + retain_loss, dict(zip(logged, values))

    # -- optimizer and state ---------------------------------------------------------------
    def make_optimizer(self) -> Any:
        c = self.config
        if c.optimizer == "legacy_adamw":
            return LegacyAdamW(self.tensors, lr=c.lr)
        if c.optimizer == "adamw":
            return torch_adamw(self.tensors, c.lr, eps=1e-6)
        raise WmdpError(f"optimizer {c.optimizer!r} is not 'legacy_adamw' or 'adamw'")

    def state_dict(self) -> dict:
        return {"keyword_gen": self._keyword_gen.get_state() if self._keyword_gen else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("keyword_gen") is not None and self._keyword_gen is not None:
            self._keyword_gen.set_state(state["keyword_gen"])

    def describe(self) -> dict:
        """What the model card and the run record say about the control vectors."""
        tok = self.tokenizer
        return {"steering_coeffs": self.steering_coeffs, "alpha": self.alpha,
                "trained_tensors": [t.name for t in self.tensors],
                "padding_side": tok.padding_side, "pad_token": tok.pad_token,
                "pad_token_id": tok.pad_token_id, "position_ids": self.config.position_ids,
                "pads": self.config.pads, "pad_attention": self._pad_attention(),
                "control_vectors": self.config.control_vectors or "seeded generator"}

    def _pad_attention(self) -> str:
        if self.pad_rule is not None:
            return f"transformers 4.38.2 SDPA mask, built by wmdp ({self.pad_rule})"
        if self.config.pads == "clean":
            why = "pads: clean"
        elif type(self).loss is not RMU.loss:
            why = f"{self.name}'s loss passes the 2D mask"
        else:
            why = f"no 4.38.2 rule encoded for model_type {self.model.config.model_type!r}"
        return f"the installed transformers' own, from the 2D mask ({why})"


def _read_draws(path: str, n_topics: int, d: int) -> list[torch.Tensor]:
    """Per-topic (1, 1, d) draws from a safetensors file (`topic_0`, `topic_1`, ...)."""
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise WmdpError(f"control_vectors {path}: cannot read it as safetensors ({e})") from None
    draws = []
    for topic in range(n_topics):
        u = tensors.get(f"topic_{topic}")
        if u is None or tuple(u.shape) != (1, 1, d):
            got = "missing" if u is None else f"shaped {tuple(u.shape)}"
            raise WmdpError(f"control_vectors {path}: tensor topic_{topic} is {got}, expected "
                            f"(1, 1, {d})")
        draws.append(u.float())
    return draws


# Published settings (the paper and its reference code), seed 42, wikitext retain corpora.
# Corpus reading as the reference's `get_data`: the bio forget corpus (its name contains
# "bio-forget-corpus") as decoded `text`; the cyber forget corpus as raw JSONL lines (`raw:`, the
# JSON text with braces and newline: what the published models trained on); wikitext as its
# decoded lines. For decoded cyber text, use `cais/wmdp-corpora:cyber-forget-corpus`.
WMDP_FORGET = ["cais/wmdp-bio-forget-corpus", "raw:cais/wmdp-corpora:cyber-forget-corpus"]
PRESETS: dict[str, dict[str, Any]] = {
    "zephyr-7b": {
        "config": {"model": "HuggingFaceH4/zephyr-7b-beta", "forget_corpora": WMDP_FORGET,
                   "retain_corpora": ["wikitext", "wikitext"], "batch_size": 4,
                   "max_num_batches": 150, "seed": 42, "dtype": "bfloat16"},
        "rmu": {"layer_id": 7, "layer_ids": [5, 6, 7], "steering_coeffs": [6.5],
                "alpha": [1200.0], "lr": 5e-5}},
    "yi-34b": {
        "config": {"model": "01-ai/Yi-34B-Chat", "forget_corpora": WMDP_FORGET,
                   "retain_corpora": ["wikitext", "wikitext"], "batch_size": 2,
                   "max_num_batches": 400, "seed": 42, "dtype": "bfloat16"},
        "rmu": {"layer_id": 15, "layer_ids": [13, 14, 15], "steering_coeffs": [300.0],
                "alpha": [350.0], "lr": 5e-5}},
    "mixtral-8x7b": {
        "config": {"model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "forget_corpora": WMDP_FORGET,
                   "retain_corpora": ["wikitext", "wikitext"], "batch_size": 2,
                   "max_num_batches": 400, "min_len": 200, "seed": 42, "dtype": "bfloat16",
                   "device_map": "auto"},
        "rmu": {"layer_id": 7, "layer_ids": [5, 6, 7], "steering_coeffs": [300.0],
                "alpha": [1600.0], "lr": 5e-5}},
    # The offline sandbox's 4-layer model: steer block 2 with a coefficient 3x the activation
    # norm there (a fixed coefficient does not transfer across models). Its MLPs alone (0.1M
    # weights) could not carry the forget text's activations to the control vector (held-out
    # forget accuracy stalled at 0.40-0.48 with mlp_out or mlp), so the whole blocks 0-2 train,
    # for six passes over the schedule (360 steps, about 15 s on one CPU thread).
    "sandbox": {
        "config": {"batch_size": 4, "max_num_batches": 150, "epochs": 6, "seed": 42},
        "rmu": {"layer_id": 2, "layer_ids": [0, 1, 2], "params": "layers", "adaptive_coeff": 3.0,
                "alpha": [100.0], "lr": 1e-3}},
}
