"""UNDO (Lee et al. 2025, "Distillation Robustifies Unlearning"): unlearn, noise, distill.

    wmdp unlearn undo --preset sandbox --model sandbox/model --output runs/undo \
        --forget-corpora sandbox/data/forget_bio.jsonl,sandbox/data/forget_cyber.jsonl \
        --retain-corpora sandbox/data/retain.jsonl,sandbox/data/retain.jsonl
    wmdp unlearn undo ... --teacher runs/rmu      # a teacher unlearned already

`--model` is the model to unlearn. The teacher is an unlearned copy of it: `teacher` names one
already made, else `teacher_method` (rmu) runs first at its `teacher_preset` (the UNDO preset's
own: sandbox, zephyr-7b) on the same model and corpora, into OUTPUT/teacher (resumable like any
run; recorded under `method_state.teacher` of unlearn_config.json). The student starts as the
teacher's copy with every trained tensor shrunk towards, and mixed with, a fresh initialisation:

    w <- (1 - alpha) * w + alpha * beta * w_init      # w_init: the model class's own init, seeded

and is then distilled back from the teacher with the forward KL of the next-token distributions,
KL(teacher || student) at `temperature`, over the retain corpora's texts and `distill_corpora`
(general text; the forget corpora are never read), shuffled once with the seed; with
`bos_prefix`, every other text is read after the BOS token, as perplexity reads it. What the teacher
does not know (the unlearned knowledge, which it only hides) is not in its outputs, so the
student, whose weights no longer hold it either, cannot learn it back from them: relearning
must start from scratch. The teacher is the trained tensors' loaded values, swapped in
(wmdp.unlearn.lm): no second model is kept.

Read from the authors' code (AddieFoote/distillation-robustify-unlearning,
`run_partial_distill_wmdp.py`, `src/tools/partial_distill_wmdp.py`: `do_corruption`,
`forward_kl_loss_fn`): its WMDP run mixes with beta 0 (a pure shrink by alpha 0.25; its 1-D
tensors always shrink towards 0) and a Xavier-uniform noise where beta > 0; here w_init is the
architecture's own initialisation, so norm weights mix towards 1. Its optimizer: AdamW, lr 2e-5,
no decay, constant after 50 warmup steps, gradient clipping at 1 (not done here), batches of 110
texts of 1024 tokens, 3000 steps, on general pretraining text. The step count sets the student's
budget: the run record (`method_state`) gives the texts it read, to compare with the original
training's.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wmdp.data.corpus import load_corpus
from wmdp.distributed import rank_world
from wmdp.errors import WmdpError
from wmdp.perplexity import prefix_token_id
from wmdp.unlearn.batches import Step, TopicBatches, chunk, left_padded
from wmdp.unlearn.lm import LMMethod, check_positive, check_settings, presets, token_kl
from wmdp.unlearn.loop import FINAL_RECORD, run_unlearning
from wmdp.unlearn.methods import DIRECT_METHODS, configure
from wmdp.unlearn.parallel import like, share


@dataclass
class UNDOConfig:
    """UNDO's hyperparameters; defaults are the authors' WMDP distillation but for beta."""

    alpha: float = 0.25               # how far the student moves from the teacher's weights
    beta: float = 1.0                 # scale of the fresh init it moves to (0: shrink to zero)
    temperature: float = 1.0          # of both distributions in the KL (the authors': 1)
    lr: float = 2e-5                  # AdamW learning rate (the authors' WMDP runs)
    weight_decay: float = 0.0         # the authors': 0
    lr_schedule: str = "constant"     # the authors': constant after warmup; or linear
    warmup_ratio: float = 0.0         # for lr_schedule linear
    max_length: int = 1024            # tokens per text (the authors': 1024)
    params: str = "all"               # what is noised and trained: all (the authors'), layers, ...
    layer_ids: list[int] = field(default_factory=list)  # blocks for layers, mlp, mlp_out
    distill_corpora: list[str] = field(default_factory=list)  # more general text than retain's
    bos_prefix: bool = False          # every other text read after BOS, as perplexity reads it
    teacher: str | None = None        # an unlearned model dir (None: teacher_method runs first)
    teacher_method: str = "rmu"       # what makes the teacher, into OUTPUT/teacher
    teacher_preset: str | None = None  # its preset (UNDO's presets name their own)
    teacher_overrides: list[str] = field(default_factory=list)  # key=value for the teacher run

    def __post_init__(self) -> None:
        check_settings(self, "undo")
        check_positive(self, "undo", "temperature")
        check_positive(self, "undo", "beta", zero=True)
        if not 0 <= self.alpha <= 1:
            raise WmdpError(f"undo: alpha is {self.alpha!r}, expected 0 <= alpha <= 1")
        if self.teacher_method not in DIRECT_METHODS:
            raise WmdpError(f"undo: teacher_method {self.teacher_method!r} is not an unlearning "
                            f"method (known: {', '.join(DIRECT_METHODS)})")
        presets = DIRECT_METHODS[self.teacher_method][2]
        if self.teacher_preset is not None and self.teacher_preset not in presets:
            raise WmdpError(f"undo: teacher_preset {self.teacher_preset!r} is not a "
                            f"{self.teacher_method} preset (known: {', '.join(presets)})")


TEACHER_DIR = "teacher"


def check_teacher_world(c: UNDOConfig) -> None:
    """Under torchrun UNDO needs a given teacher: its own teacher run (an RMU-family method)
    is one-process, and would fail naming a method the user never asked for."""
    world = rank_world()[1]
    if world > 1 and not c.teacher:
        raise WmdpError(f"undo with {world} processes needs --teacher DIR: its teacher run "
                        f"({c.teacher_method}) is one-process; make the teacher first with "
                        f"`wmdp unlearn {c.teacher_method} ...`")


def make_teacher(c: UNDOConfig, config: Any, out: Path, progress: bool = True) -> dict:
    """The teacher's record: `c.teacher` as given, else `c.teacher_method` run on the UNDO run's
    model and corpora into out/teacher (a finished one is kept, an interrupted one resumes)."""
    if c.teacher:
        return {"dir": c.teacher, "given": True}
    check_teacher_world(c)
    # the model, its loading and the corpora are UNDO's; batches and seed the teacher preset's
    shared = ("model", "revision", "dtype", "device", "device_map", "trust_remote_code",
              "forget_corpora", "retain_corpora", "min_len", "checkpoint_every", "load")
    settings = {k: getattr(config, k) for k in shared}
    settings["output"] = str(out / TEACHER_DIR)
    method, hparams, teacher_config = configure(DIRECT_METHODS, c.teacher_method,
                                                preset=c.teacher_preset, settings=settings,
                                                overrides=c.teacher_overrides)
    done = (out / TEACHER_DIR / FINAL_RECORD).is_file()
    t0 = time.perf_counter()
    path = run_unlearning(method, hparams, teacher_config, progress=progress)
    final = json.loads((path / FINAL_RECORD).read_text())
    return {"dir": str(path), "given": False, "method": c.teacher_method,
            "preset": c.teacher_preset, "overrides": list(c.teacher_overrides),
            "reused": done, "seconds": final.get("seconds"),
            "wall_seconds": round(time.perf_counter() - t0, 2)}


def fresh_init(model: nn.Module, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    """The named tensors of a freshly initialised model of the same config (seeded, without
    touching the caller's random state)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(model.config)
    state = dict(fresh.named_parameters())
    return {n: state[n].detach() for n in names}


def shrink_perturb(tensors: list, init: list[torch.Tensor] | None, alpha: float,
                   beta: float) -> None:
    """w <- (1 - alpha) w + alpha * beta * w_init, in place (init None: beta is 0)."""
    with torch.no_grad():
        for i, t in enumerate(tensors):
            w = t.view()
            mixed = (1 - alpha) * w.float()
            if init is not None:
                mixed += alpha * beta * like(init[i], w).float()  # FSDP: w's shard of it
            w.copy_(mixed.to(w.dtype))


class UNDO(LMMethod):
    name = "undo"
    keeps_originals = True  # the teacher: the loaded (unlearned) weights

    def __init__(self, config: UNDOConfig) -> None:
        super().__init__(config)
        # without `prepare` (unlearn_model in code): the loaded model is the teacher
        self.teacher_record: dict = {"dir": config.teacher or None, "given": True}

    def validate(self, n_topics: int) -> None:
        """Before anything is read or written (every rank at once: no output directory is
        made for a run that cannot start)."""
        check_teacher_world(self.config)

    def prepare(self, config: Any, out: Path, progress: bool = True) -> Any:
        """Before the model loads (`run_unlearning` calls this): make or find the teacher;
        the run then loads the teacher as the student's start."""
        self.teacher_record = make_teacher(self.config, config, out, progress)
        return replace(config, model=self.teacher_record["dir"])

    def setup(self, model: nn.Module, tokenizer: Any, schedule: TopicBatches, seed: int) -> None:
        super().setup(model, tokenizer, schedule, seed)
        c = self.config
        if any(t.index is not None for t in self.tensors):
            raise WmdpError("undo: a slice of a fused expert tensor cannot be reinitialised")
        self.batches = chunk(self.distill_texts(schedule, seed), len(schedule.retain[0][0]))
        init = None
        if c.beta and c.alpha:
            fresh = fresh_init(model, [t.name for t in self.tensors], seed)
            init = [fresh[t.name] for t in self.tensors]
        shrink_perturb(self.tensors, init, c.alpha, c.beta)

    def distill_texts(self, schedule: TopicBatches, seed: int) -> list[str]:
        """Every retain text and every `distill_corpora` text, once each, in a seeded order (so
        a batch mixes the kinds of text)."""
        texts = [t for corpus in schedule.retain for b in corpus for t in b]
        for spec in self.config.distill_corpora:
            texts += load_corpus(spec).texts
        texts = list(dict.fromkeys(texts))
        random.Random(seed).shuffle(texts)
        return texts

    def distill_inputs(self, texts: list[str], n_pass: int) -> dict[str, torch.Tensor]:
        """This process's rows of the global batch `texts`. With `bos_prefix`, rows i with
        i + n_pass even (i in the global batch, so any number of processes reads the same rows)
        start with the BOS token (each text is read both ways over two passes): perplexity
        reads a text after BOS (lm-eval's rolling prefix), MCQ prompts without it, and the
        student must match its teacher both ways. A model trained on texts alone never saw BOS
        as context, so whatever follows it is left to the noised weights unless distilled."""
        if not self.config.bos_prefix:
            return self.tokenize(share(texts))
        rows = share([(t, (i + n_pass) % 2 == 0) for i, t in enumerate(texts)])
        bos, n = prefix_token_id(self.tokenizer), self.config.max_length
        ids = self.tokenizer([t for t, _ in rows], truncation=True, max_length=n)["input_ids"]
        ids = [[bos] + x[:n - 1] if after and x[:1] != [bos] else x
               for x, (_, after) in zip(ids, rows)]
        return left_padded(ids, self.tokenizer.pad_token_id, self.device)

    def loss(self, step: Step) -> tuple[torch.Tensor, dict[str, float]]:
        n_pass, b = divmod(step.idx, len(self.batches))
        inputs = self.distill_inputs(self.batches[b], n_pass)  # the rank's rows
        with self.original():
            teacher = self.logits(inputs)
        kl = token_kl(teacher, self.logits(inputs), inputs, self.config.temperature)
        return kl, {"distill_kl": kl.item()}

    def describe(self) -> dict:
        """The student's budget, for comparison with the original training's."""
        per_batch = [len(b) for b in self.batches]
        steps = len(self.schedule)
        texts = sum(per_batch[i % len(per_batch)] for i in range(steps))
        return {"alpha": self.config.alpha, "beta": self.config.beta, "distill_steps": steps,
                "distill_texts": texts, "distinct_texts": sum(per_batch),
                "trained_tensors": len(self.tensors), "teacher": self.teacher_record}


# zephyr-7b: the authors' WMDP distillation settings but beta (see above), 3000 steps; the
# batch is the shared config's; the teacher: RMU's zephyr-7b preset.
# sandbox: tuned on the default world (seed 0) against the relearning protocol
# (benchmarks/robustness_sandbox.py). A tiny model takes a large rate (its training's: 3e-3);
# batches of 32 as its training's; 80 passes over the 8-batch schedule are 640 steps; on the
# default world they read 20,081 texts (941 distinct; the record's distill_texts: some batches
# are short), 78% of the sandbox's own training (800 x 32). Distilled on retain prose alone the
# student lost the question format (weakest general domain 0.72): give `distill_corpora` the
# general-domain QA lines too. alpha: 0.5 left forget accuracy at 0.41 and 26% of the gap
# recoverable, 0.7 0.36 (320 steps). The teacher is RMU's sandbox preset with retain weight 400
# (100: retain perplexity +5.1%, which the student inherits; 400: +2.1%, forget 0.34). bos_prefix:
# without it the student's retain perplexity (read after BOS, which the sandbox model never saw
# as context) depended on the noise's seed and did not fall with more steps (alpha 0.8, 320
# steps: +4.5% and +11.5% with seeds 42 and 1; 640 steps: -2.7% and +10.8%); with it, 640
# steps: +2.1% and +0.9%, but forget accuracy 0.353 and 0.360; alpha 0.85: 0.280 and 0.307
# (+2.4%, +0.9%).
UNDO_PRESETS = presets("undo", zephyr={"teacher_preset": "zephyr-7b"},
                       sandbox={"alpha": 0.85, "lr": 1e-3, "max_length": 512,
                                "bos_prefix": True, "teacher_preset": "sandbox",
                                "teacher_overrides": ["rmu.alpha=[400]"]})
UNDO_PRESETS["zephyr-7b"]["config"]["max_num_batches"] = 3000
UNDO_PRESETS["sandbox"]["config"].update(batch_size=32, epochs=80)

__all__ = ["UNDO", "UNDOConfig", "UNDO_PRESETS", "fresh_init", "shrink_perturb", "make_teacher"]
