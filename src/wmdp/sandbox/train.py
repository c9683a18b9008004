"""The sandbox's tokenizer and tiny Llama, and the plain PyTorch loop that teaches it the world.

    tokenizer = train_tokenizer(texts, vocab_size=1536)
    trainer = Trainer(ModelConfig(), TrainConfig(), texts, tokenizer, out=Path("sandbox/train"),
                      data_dir=Path("sandbox/data"), seed=0)
    trainer.train()          # resumes from sandbox/train/checkpoint.pt when one is there

Each example is one text (a paragraph or a question-answer line) plus EOS, right-padded in its
batch with the padded positions left out of the loss; no BOS, as the evaluator's prompts carry
none with this tokenizer. The learning rate is a function of the global step and each epoch's
order a function of (seed, epoch), so a resumed run takes exactly the steps an uninterrupted
one would.

`steps_per_epoch` fixes an epoch's length in steps instead of one pass over the texts: the
oracle trains on fewer texts for as many steps as the model (the same schedule, the same
per-epoch checkpoints). Its batches are then read from an endless stream of shuffles, pass p
shuffled by (seed, p), all batches full.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from wmdp.progress import tqdm

from wmdp.io import jsonl_records, write_jsonl

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


@dataclass
class ModelConfig:
    """A Llama-architecture causal LM; defaults are the `default` preset's (~1.2M parameters)."""

    hidden_size: int = 128
    intermediate_size: int = 512      # MLP width, 4x hidden
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 256  # longest training text is ~100 tokens
    tie_word_embeddings: bool = True  # the embedding is most of a tiny model's parameters


@dataclass
class TrainConfig:
    """AdamW with linear warmup and cosine decay; fp32 on CPU; defaults are `default`'s."""

    epochs: int = 16                  # held-out facts are learned by epoch ~10 (800 steps)
    batch_size: int = 32
    lr: float = 3e-3                  # tiny models take a large learning rate
    min_lr: float = 3e-4              # the cosine decays to this at the last step
    warmup_steps: int = 50
    weight_decay: float = 0.0         # memorising facts is the goal, not generalising weights
    grad_clip: float = 1.0
    eval_every: int = 1               # epochs between per-task accuracy checks (and the last)
    eval_batch_size: int = 64
    threads: int = 1                  # torch CPU threads: 1 is bit-reproducible, and on a shared
    #                                   2-core machine 2 threads ran ~6x slower, not faster


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE trained on `texts`, wrapped for transformers: EOS (also BOS) and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOS, eos_token=EOS,
                                   pad_token=PAD,
                                   model_max_length=ModelConfig.max_position_embeddings)


def make_model(config: ModelConfig, tokenizer: Any, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=config.hidden_size,
                     intermediate_size=config.intermediate_size,
                     num_hidden_layers=config.num_hidden_layers,
                     num_attention_heads=config.num_attention_heads,
                     num_key_value_heads=config.num_key_value_heads,
                     max_position_embeddings=config.max_position_embeddings,
                     tie_word_embeddings=config.tie_word_embeddings,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """setup() -> train(): one epoch at a time, a checkpoint and a log line after each."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, texts: list[str],
                 tokenizer: Any, out: Path, data_dir: Path, seed: int,
                 progress: bool = True, steps_per_epoch: int | None = None,
                 label: str = "sandbox") -> None:
        self.model_config, self.config, self.tokenizer = model_config, config, tokenizer
        self.out, self.data_dir, self.seed, self.progress = out, data_dir, seed, progress
        self.label = label  # names the progress bar: the model's or the oracle's training
        eos = tokenizer.eos_token_id
        self.examples = [ids + [eos] for ids in tokenizer(texts)["input_ids"]]
        one_pass = self.one_pass(len(self.examples), config)
        self.streamed = steps_per_epoch is not None and steps_per_epoch != one_pass
        self.steps_per_epoch = steps_per_epoch if self.streamed else one_pass
        self.total_steps = self.steps_per_epoch * config.epochs
        self.setup()

    @staticmethod
    def one_pass(n_texts: int, config: TrainConfig) -> int:
        """Steps in one pass over `n_texts` (the last batch may be short)."""
        return math.ceil(n_texts / config.batch_size)

    def setup(self) -> None:
        self.model = make_model(self.model_config, self.tokenizer, self.seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.lr,
                                           betas=(0.9, 0.95), weight_decay=self.config.weight_decay)
        self.epoch = 0  # epochs done
        ckpt = self.out / CHECKPOINT
        if ckpt.is_file():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.epoch = int(state["epoch"])
        self.log = _read_log(self.out / LOG, upto=self.epoch)

    def _shuffle(self, n_pass: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + n_pass)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def _order(self, epoch: int) -> list[int]:
        """Example indices of one epoch: one shuffle, or its stretch of the streamed shuffles."""
        if not self.streamed:
            return self._shuffle(epoch)
        n, size = len(self.examples), self.steps_per_epoch * self.config.batch_size
        start = epoch * size
        passes = {p: self._shuffle(p) for p in range(start // n, (start + size - 1) // n + 1)}
        return [passes[i // n][i % n] for i in range(start, start + size)]

    def _batches(self, epoch: int) -> list[torch.Tensor]:
        order = self._order(epoch)
        bs, pad = self.config.batch_size, self.tokenizer.pad_token_id
        batches = []
        for i in range(0, len(order), bs):
            rows = [self.examples[j] for j in order[i:i + bs]]
            ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, :len(r)] = torch.tensor(r)
            batches.append(ids)
        return batches

    def _loss_step(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids).logits  # (B, T, V); right padding needs no attention mask
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == self.tokenizer.pad_token_id, -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)

    def train(self) -> list[dict]:
        """Run the remaining epochs; returns the log (one dict per epoch)."""
        cfg = self.config
        bar = tqdm(total=self.total_steps, initial=self.epoch * self.steps_per_epoch,
                   desc=f"{self.label} train", unit="step", disable=not self.progress)
        while self.epoch < cfg.epochs:
            t0, losses = time.perf_counter(), []
            self.model.train()
            for i, ids in enumerate(self._batches(self.epoch)):
                step = self.epoch * self.steps_per_epoch + i
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(step, self.total_steps, cfg)
                loss = self._loss_step(ids)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{loss.item():.3f}")
            self.epoch += 1
            record = {"epoch": self.epoch, "step": self.epoch * self.steps_per_epoch,
                      "loss": sum(losses) / len(losses), "lr": lr_at(step, self.total_steps, cfg),
                      "seconds": round(time.perf_counter() - t0, 2)}
            if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
                record["acc"] = self.evaluate()
            self.log.append(record)  # the log first: a resume drops lines past the checkpoint
            write_jsonl(self.out / LOG, self.log)
            self._save()
            if self.progress:
                bar.write(_describe(record))
        bar.close()
        return self.log

    def evaluate(self) -> dict[str, float]:
        """Cloze accuracy per task, scored by the project's evaluator."""
        from wmdp.evaluate import EvalConfig, evaluate_model
        from wmdp.tasks import Registry

        registry = Registry.build(self.data_dir)
        tasks = [n for n, t in registry.tasks.items() if t.path is not None and t.format == "cloze"]
        self.model.eval()
        res = evaluate_model(self.model, self.tokenizer, tasks, registry, progress=False,
                             config=EvalConfig(batch_size=self.config.eval_batch_size))
        return {n: round(r["acc"], 4) for n, r in res["results"].items()}

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{CHECKPOINT}.tmp"
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "epoch": self.epoch}, tmp)
        os.replace(tmp, self.out / CHECKPOINT)


def _read_log(path: Path, upto: int) -> list[dict]:
    """The log lines of epochs a checkpoint holds (a crash may have left one more)."""
    if not path.is_file():
        return []
    return [r for _, r in jsonl_records(path) if r["epoch"] <= upto]


def _describe(record: dict) -> str:
    text = f"epoch {record['epoch']}: loss {record['loss']:.4f} ({record['seconds']} s)"
    if "acc" in record:
        text += " acc " + " ".join(f"{k.removeprefix('sandbox_')}={v:.2f}"
                                   for k, v in record["acc"].items())
    return text
