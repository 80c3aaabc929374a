"""`RetrainConfig` (every knob of a `shortllm.retrain` run, and its LR schedule) and `RetrainResult`."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from shortllm.errors import RetrainConfigError

_DEFAULT_LR = {"lora": 1e-4, "cpt": 5e-5}


@dataclass
class RetrainConfig:
    """Every knob of a retraining run; JSON-able via `to_dict` / `from_dict`.

    ``lr=None`` means 1e-4 for LoRA (the seed's setting) and 5e-5 for CPT; ``warmup_steps=None`` means
    5% of ``steps``. The LR rises linearly over the warm-up, then decays to 0 (cosine or linear).
    ``dtype="bf16"`` runs forward/backward under bf16 autocast with fp32 master weights and optimizer
    state. ``lora_target_modules=None`` targets every Linear (or GPT-2 Conv1D) inside the decoder blocks:
    the 7 projections q/k/v/o/gate/up/down on Llama, Mistral, Qwen2/3 and Gemma 1/2/3; qkv/o/gate_up/down
    on Phi-3; c_attn/c_proj/c_fc on GPT-2; q/k/v/out_proj/fc1/fc2 on OPT; query_key_value/dense/
    dense_h_to_4h/dense_4h_to_h on GPT-NeoX. A list of leaf names restricts that set.
    """

    method: str = "lora"
    steps: int = 100
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    schedule: str = "cosine"
    micro_batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 128
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0
    eval_max_examples: int = 64
    save_every: int = 0
    keep_checkpoints: int = 2
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0
    heldout_fraction: float = 0.05
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: Optional[list[str]] = None

    def validate(self) -> "RetrainConfig":
        def bad(msg: str):
            raise RetrainConfigError(msg)
        if self.method not in ("lora", "cpt"):
            bad(f"Unknown retraining method {self.method!r}; use 'lora' or 'cpt'.")
        if self.schedule not in ("cosine", "linear"):
            bad(f"Unknown LR schedule {self.schedule!r}; use 'cosine' or 'linear'.")
        if self.dtype not in ("fp32", "bf16"):
            bad(f"Unknown dtype {self.dtype!r}; use 'fp32' or 'bf16'.")
        for name in ("steps", "micro_batch_size", "grad_accum", "lora_r", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                bad(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.seq_len < 2:
            bad(f"seq_len={self.seq_len} must be at least 2.")
        for name in ("eval_every", "save_every", "eval_max_examples"):
            if int(getattr(self, name)) < 0:
                bad(f"{name}={getattr(self, name)} must be >= 0 (0 disables it).")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr={self.lr} must be a positive finite number.")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            bad(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}].")
        if not 0.0 <= self.lora_dropout < 1.0 or not 0.0 <= self.heldout_fraction < 1.0:
            bad("lora_dropout and heldout_fraction must be in [0, 1).")
        return self

    @property
    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else _DEFAULT_LR[self.method]

    @property
    def resolved_warmup(self) -> int:
        return int(self.warmup_steps) if self.warmup_steps is not None else int(math.ceil(0.05 * self.steps))

    def lr_at(self, step: int) -> float:
        """LR of optimizer step ``step`` (0-based): linear warm-up, then cosine/linear decay towards 0."""
        w, base = self.resolved_warmup, self.resolved_lr
        if step < w:
            return base * (step + 1) / w
        progress = (step - w) / max(1, self.steps - w)
        mult = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1.0 - progress
        return base * mult

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RetrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise RetrainConfigError(f"Unknown RetrainConfig field(s) {sorted(unknown)}; valid: {sorted(known)}.")
        return cls(**d).validate()


@dataclass
class RetrainResult:
    """What a run did. ``model`` is the trained stock transformers model (LoRA merged), not serialised."""

    method: str
    steps_done: int
    completed: bool
    tokens_seen: int
    target_tokens: int
    losses: list[float]
    ppl_before: float
    ppl_after: Optional[float]
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0
    config: dict = field(default_factory=dict)
    model: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d["eval_history"] = [list(x) for x in self.eval_history]
        return d
