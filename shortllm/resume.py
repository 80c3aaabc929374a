"""Resumable scoring: `score_fast(..., checkpoint="dir", every=K)` survives being killed.

Every K calibration batches the scorer's whole state (each collector's float64 `accumulators()`, the
per-element gradient sums of Taylor's exact mode, the consumed-batch and token counts) is written to
`dir`. A rerun with the same model, data, metrics and options restores that state and skips the
batches already consumed; since the sums continue in the same order on the same values, the final
Scores are bit-identical to an uninterrupted run. Anything else refuses to resume (CheckpointError).

On disk (one subfolder per rank when data-parallel):
  state-<consumed>.safetensors   the tensors (safetensors: loading never unpickles)
  checkpoint.json                the commit record: identity of the run, consumed batches, state file
Both are written to a temp file, fsynced and renamed; `checkpoint.json` is renamed last, so a kill at
any instant leaves either the previous complete checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
from torch import Tensor, nn

from ._io import atomic_file
from .errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

FORMAT = "shortllm.score-checkpoint/1"
RECORD = "checkpoint.json"


def data_fingerprint(data: Iterable[dict]) -> str:
    """The data's own `fingerprint` (CalibrationData), else sha256 over a re-iterable list of batches."""
    fp = getattr(data, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    if not isinstance(data, (list, tuple)):
        raise CheckpointError(f"resumable scoring needs re-iterable calibration data (CalibrationData or a list of "
                              f"batches), got {type(data).__name__}; pass list(data) or drop checkpoint=")
    h = hashlib.sha256()
    for b in data:
        for key in ("input_ids", "attention_mask"):
            if key not in b:
                continue
            t = b[key].detach().to("cpu", torch.int64).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().astype("<i8", copy=False).tobytes())
    return h.hexdigest()


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items())}
    return repr(v)


def _atomic_write_bytes(path: Path, write) -> None:
    with atomic_file(path, "wb", durable=True) as f:
        write(f)


class ScoringCheckpoint:
    """The state of one rank's scoring run in `directory`; attached to an `Engine` as `engine.checkpoint`."""

    def __init__(self, directory: str | os.PathLike, every: int, identity: dict):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise CheckpointError(f"every={every!r} must be a positive integer (checkpoint every K batches)")
        self.root = Path(directory).expanduser()
        self.every = every
        self.identity = identity
        world, rank = identity["world"], identity["rank"]
        self.dir = self.root / f"rank{rank}-of-{world}" if world > 1 else self.root
        for tmp in self.dir.glob(".*.tmp"):  # left by a run killed while writing
            try:
                tmp.unlink()
            except OSError:
                pass
        self.record: Optional[dict] = self._read_record()
        if self.record is not None:
            self._check_identity(self.record)

    @classmethod
    def for_run(cls, directory: str | os.PathLike, every: int, *, model: nn.Module, data: Iterable[dict],
                shard: Iterable[dict], metrics: tuple[str, ...], options: dict) -> "ScoringCheckpoint":
        from .scores import weights_fingerprint

        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if not hasattr(shard, "__len__"):
            raise CheckpointError("resumable scoring needs calibration data with a length (CalibrationData or a "
                                  "list of batches); pass list(data) or drop checkpoint=")
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        identity = {
            "format": FORMAT,
            "metrics": list(metrics),
            "options": _jsonable(options),
            "data_fingerprint": data_fingerprint(data),
            "n_batches": len(shard),
            "model_fingerprint": weights_fingerprint(model),
            "model_type": getattr(model.config, "model_type", type(model).__name__),
            "dtypes": dtypes,
            "rank": rank,
            "world": world,
        }
        return cls(directory, every, identity)

    # ---- reading -------------------------------------------------------------------------------
    def _read_record(self) -> Optional[dict]:
        path = self.dir / RECORD
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rec, dict) or rec.get("identity", {}).get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} record")
            int(rec["consumed"]), str(rec["state_file"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"scoring checkpoint {path} is unreadable or corrupted ({exc}); delete "
                                  f"{self.root} to start scoring over") from None
        return rec

    def _check_identity(self, rec: dict) -> None:
        old, new = rec["identity"], self.identity
        names = {"metrics": "metric set", "options": "metric options", "data_fingerprint": "calibration data",
                 "n_batches": "number of batches", "model_fingerprint": "model weights", "model_type": "model type",
                 "dtypes": "model dtype", "rank": "rank", "world": "world size (number of ranks)"}
        diff = [f"{names.get(k, k)} ({old.get(k)!r} in the checkpoint, {new.get(k)!r} now)"
                for k in names if old.get(k) != new.get(k)]
        if diff:
            raise CheckpointError(f"scoring checkpoint {self.dir} belongs to a different run: " + "; ".join(diff)
                                  + f". Rerun with the same model, data, metrics and options to resume, or use "
                                  f"another checkpoint dir (or delete {self.root}) to start over")

    @property
    def consumed(self) -> int:
        return int(self.record["consumed"]) if self.record else 0

    # ---- engine hooks --------------------------------------------------------------------------
    def restore(self, engine: "Engine") -> int:
        """Load the saved state into the started collectors; returns the number of batches to skip."""
        if self.record is None:
            return 0
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.dir / self.record["state_file"]
        try:
            saved = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"scoring checkpoint state {path} is missing or corrupted ({exc}); delete "
                                  f"{self.root} to start scoring over") from None
        expected = self._state(engine, restoring=True)
        accs = {n for n in expected if ".acc" in n}
        if not accs <= set(saved) or not set(saved) <= set(expected):
            raise CheckpointError(f"scoring checkpoint state {path} holds {sorted(saved)} but this run needs "
                                  f"{sorted(expected)}; delete {self.root} to start scoring over")
        for name, t in saved.items():
            live, setter = expected[name]
            if live is not None and (t.shape != live.shape or t.dtype != live.dtype):
                raise CheckpointError(f"scoring checkpoint tensor {name} has shape {tuple(t.shape)} {t.dtype}, "
                                      f"expected {tuple(live.shape)} {live.dtype}; delete {self.root} to start over")
            setter(t)
        engine.n_batches = self.consumed
        engine.n_tokens = int(self.record["n_tokens"])
        return self.consumed

    def after_batch(self, engine: "Engine") -> None:
        done = engine.n_batches
        if done % self.every == 0 or done == self.identity["n_batches"]:
            self.save(engine)

    # ---- writing -------------------------------------------------------------------------------
    def _state(self, engine: "Engine", restoring: bool = False) -> dict[str, tuple[Optional[Tensor], Any]]:
        """name -> (live tensor, setter that loads a saved CPU tensor into the live state). When
        `restoring`, gradient sums not yet allocated are listed too (live None: shape checked on load)."""
        from .metrics import TaylorCollector

        out: dict[str, tuple[Optional[Tensor], Any]] = {}
        for k, c in enumerate(engine.collectors):
            for j, t in enumerate(c.accumulators()):
                out[f"c{k}.{type(c).__name__}.acc{j}"] = (t, lambda s, t=t: t.copy_(s.to(t.device)))
            if isinstance(c, TaylorCollector) and not c.stream:
                # exact mode: the signed gradient sums are state too (p.grad for fp32 weights, else fp32 buffers)
                for idx, (_, p) in enumerate(c.params):
                    g = c.buffers.get(id(p), p.grad)
                    if g is None and not restoring:
                        continue
                    out[f"c{k}.taylor_grad.{idx}"] = (g, self._grad_setter(c, p))
        return out

    @staticmethod
    def _grad_setter(c, p: nn.Parameter):
        def set_grad(s: Tensor) -> None:
            if s.shape != p.shape:
                raise CheckpointError(f"a saved Taylor gradient sum has shape {tuple(s.shape)} but its weight has "
                                      f"{tuple(p.shape)}; the checkpoint is of another model, delete it to start over")
            if p.dtype.itemsize >= 4:  # as TaylorCollector: only fp16/bf16 weights use fp32 buffers
                p.grad = s.to(p.device)
            else:
                c.buffers[id(p)] = s.to(p.device)
        return set_grad

    def save(self, engine: "Engine") -> None:
        from safetensors.torch import save

        self.dir.mkdir(parents=True, exist_ok=True)
        state = {name: live.detach().to("cpu").contiguous().clone() for name, (live, _) in self._state(engine).items()}
        consumed = engine.n_batches
        name = f"state-{consumed:08d}.safetensors"
        blob = save(state, metadata={"format": FORMAT, "consumed": str(consumed)})
        try:
            _atomic_write_bytes(self.dir / name, lambda f: f.write(blob))
            record = {"identity": self.identity, "consumed": consumed, "n_tokens": int(engine.n_tokens),
                      "state_file": name, "complete": consumed == self.identity["n_batches"]}
            text = json.dumps(record, indent=1).encode("utf-8")
            _atomic_write_bytes(self.dir / RECORD, lambda f: f.write(text))
        except OSError as exc:
            raise CheckpointError(f"cannot write the scoring checkpoint to {self.dir} ({exc}); free disk space or "
                                  "pass a writable checkpoint dir") from exc
        self.record = record
        for old in self.dir.glob("state-*.safetensors"):  # the record no longer points at older states
            if old.name != name:
                try:
                    old.unlink()
                except OSError:
                    pass
