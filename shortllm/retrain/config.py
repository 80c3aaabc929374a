"""`RetrainConfig` (every knob of a `shortllm.retrain` run) and `RetrainResult`.

The run itself is transformers' `Trainer` (see `shortllm.retrain.training`); this module only validates
the knobs and turns a token budget into optimizer steps, so every method sees the same number of tokens.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from shortllm.errors import RetrainConfigError

METHODS = ("lora", "cpt", "kd", "partial")
_DEFAULT_LR = {"lora": 1e-4, "cpt": 5e-5, "kd": 5e-5, "partial": 5e-5}
# Shortened-LLaMA's LoRA recipe (r 8, alpha 16, dropout 0.05, every projection of the blocks)
_LORA_DEFAULTS = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
_KD_DEFAULTS = {"kd_temperature": 1.0, "kd_alpha": 0.0}
_PARTIAL_DEFAULTS = {"last_k": 2}
# which method each method-specific knob belongs to (None in the dataclass = "not given")
_ONLY_FOR = {**{k: "lora" for k in (*_LORA_DEFAULTS, "lora_target_modules")},
             **{k: "kd" for k in _KD_DEFAULTS}, **{k: "partial" for k in _PARTIAL_DEFAULTS}}


@dataclass
class RetrainConfig:
    """Every knob of a retraining run; JSON-able via `to_dict` / `from_dict`.

    ``method``: ``lora`` (peft adapters on every Linear/Conv1D of the blocks, merged into plain weights at
    the end), ``cpt`` (every parameter), ``kd`` (every parameter, loss = ``(1 - kd_alpha) * tau^2 *
    KL(teacher || student) + kd_alpha * CE`` on temperature-``kd_temperature`` logits), ``partial`` (only
    the LM head and the last ``last_k`` blocks; with tied embeddings the input embedding trains too, being
    the same tensor as the head).

    Length of the run: ``tokens`` (a budget: ``steps = ceil(tokens / (micro_batch_size * grad_accum *
    world_size * seq_len))``, the same for every method) or ``steps``; 100 steps when neither is given.
    ``lr=None``: 1e-4 for LoRA, 5e-5 otherwise. ``warmup_steps=None``: 5% of the steps. The LR rises
    linearly over the warm-up, then decays to 0 (cosine or linear), as transformers' schedulers do.
    Method-specific knobs left at None take their method's default; setting one for another method is
    an error (it would be silently ignored).
    """

    method: str = "lora"
    tokens: Optional[int] = None
    steps: Optional[int] = None
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
    lora_r: Optional[int] = None
    lora_alpha: Optional[int] = None
    lora_dropout: Optional[float] = None
    lora_target_modules: Optional[list[str]] = None
    kd_temperature: Optional[float] = None
    kd_alpha: Optional[float] = None
    last_k: Optional[int] = None

    def validate(self) -> "RetrainConfig":
        def bad(msg: str):
            raise RetrainConfigError(msg)
        if self.method not in METHODS:
            bad(f"Unknown retraining method {self.method!r}; use one of {', '.join(METHODS)}.")
        for name, owner in _ONLY_FOR.items():
            if getattr(self, name) is not None and owner != self.method:
                bad(f"{name} applies to method={owner!r} only, not {self.method!r}; drop it "
                    f"(CLI: --{name.replace('_', '-').replace('-modules', 's')}).")
        if self.schedule not in ("cosine", "linear"):
            bad(f"Unknown LR schedule {self.schedule!r}; use 'cosine' or 'linear'.")
        if self.dtype not in ("fp32", "bf16"):
            bad(f"Unknown dtype {self.dtype!r}; use 'fp32' or 'bf16'.")
        if self.tokens is not None and self.steps is not None:
            bad("Give a token budget (tokens) or a step count (steps), not both.")
        for name in ("tokens", "steps"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                bad(f"{name}={getattr(self, name)} must be a positive integer.")
        for name in ("micro_batch_size", "grad_accum", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                bad(f"{name}={getattr(self, name)} must be a positive integer.")
        if self.seq_len < 2:
            bad(f"seq_len={self.seq_len} must be at least 2.")
        for name in ("eval_every", "save_every", "eval_max_examples"):
            if int(getattr(self, name)) < 0:
                bad(f"{name}={getattr(self, name)} must be >= 0 (0 disables it).")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr={self.lr} must be a positive finite number.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            bad(f"warmup_steps={self.warmup_steps} must be >= 0.")
        if not 0.0 <= self.heldout_fraction < 1.0:
            bad("heldout_fraction must be in [0, 1).")
        if self.lora_r is not None and self.lora_r < 1:
            bad(f"lora_r={self.lora_r} must be a positive integer.")
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:
            bad(f"lora_dropout={self.lora_dropout} must be in [0, 1).")
        if self.kd_temperature is not None and not (self.kd_temperature > 0 and math.isfinite(self.kd_temperature)):
            bad(f"kd_temperature={self.kd_temperature} must be a positive finite number.")
        if self.kd_alpha is not None and not 0.0 <= self.kd_alpha <= 1.0:
            bad(f"kd_alpha={self.kd_alpha} must be in [0, 1] (the weight of the cross-entropy term).")
        if self.last_k is not None and self.last_k < 1:
            bad(f"last_k={self.last_k} must be a positive integer.")
        return self

    def get(self, name: str):
        """A method-specific knob with its method's default filled in."""
        v = getattr(self, name)
        return v if v is not None else {**_LORA_DEFAULTS, **_KD_DEFAULTS, **_PARTIAL_DEFAULTS}.get(name)

    @property
    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else _DEFAULT_LR[self.method]

    def resolved_steps(self, world_size: int = 1) -> int:
        """Optimizer steps: ``steps``, or the token budget over the global batch's tokens (rounded up)."""
        if self.steps is not None:
            return int(self.steps)
        if self.tokens is None:
            return 100
        per_step = self.micro_batch_size * self.grad_accum * max(1, world_size) * self.seq_len
        return max(1, math.ceil(int(self.tokens) / per_step))

    def resolved_warmup(self, steps: int) -> int:
        w = int(self.warmup_steps) if self.warmup_steps is not None else int(math.ceil(0.05 * steps))
        if w > steps:
            raise RetrainConfigError(f"warmup_steps={w} exceeds the run's {steps} steps; lower it.")
        return w

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
    """What a run did. ``model`` is the trained stock transformers model (LoRA merged), not serialised.

    ``losses``: the training loss of every optimizer step (token-weighted over the global batch, as the
    Trainer logs it); ``tokens_seen``: input tokens (padding excluded) over every rank; ``parallel``:
    accelerate's distributed type of the run (NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED).
    """

    method: str
    steps_done: int
    completed: bool
    tokens_seen: int
    target_tokens: int
    losses: list[float]
    ppl_before: Optional[float]
    ppl_after: Optional[float]
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0
    world_size: int = 1
    parallel: str = "NO"
    config: dict = field(default_factory=dict)
    model: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d["eval_history"] = [list(x) for x in self.eval_history]
        return d
