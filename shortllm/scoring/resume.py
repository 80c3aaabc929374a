"""Resumable scoring: `score_fast(..., checkpoint="dir", every=K)` survives being killed.

Every K calibration batches the scorer's whole state (each collector's `state_dict()`: float64 sums,
and the per-element gradient sums of Taylor's exact mode; the consumed-batch and token counts) is written to
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
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from shortllm.errors import CheckpointError
from shortllm.io.atomic import atomic_file

FORMAT = "shortllm.score-checkpoint/2"
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
    """The state of one rank's scoring run in `directory`; the driver (engine) calls `restore` at the start and
    `after_batch` after every batch."""

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
        from shortllm.model.fingerprint import weights_fingerprint

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

    # ---- driver hooks ----------------------------------------------------------------------------
    def restore(self, collectors: Sequence[Any]) -> tuple[int, int]:
        """Load the saved state into the started collectors; returns (batches to skip, tokens counted)."""
        if self.record is None:
            return 0, 0
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.dir / self.record["state_file"]
        try:
            saved = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"scoring checkpoint state {path} is missing or corrupted ({exc}); delete "
                                  f"{self.root} to start scoring over") from None
        per: dict[str, dict[str, Tensor]] = {}
        for name, t in saved.items():
            prefix, _, key = name.partition("/")
            per.setdefault(prefix, {})[key] = t
        expected = {_prefix(k, c) for k, c in enumerate(collectors)}
        if set(per) - expected:
            raise CheckpointError(f"scoring checkpoint state {path} holds state of {sorted(per)} but this run has "
                                  f"{sorted(expected)}; delete {self.root} to start scoring over")
        for k, c in enumerate(collectors):
            try:
                c.load_state_dict(per.get(_prefix(k, c), {}))
            except CheckpointError as exc:
                raise CheckpointError(f"scoring checkpoint state {path} does not fit this run ({exc}); delete "
                                      f"{self.root} to start scoring over") from None
        return self.consumed, int(self.record["n_tokens"])

    def after_batch(self, collectors: Sequence[Any], n_batches: int, n_tokens: int) -> None:
        if n_batches % self.every == 0 or n_batches == self.identity["n_batches"]:
            self.save(collectors, n_batches, n_tokens)

    def save(self, collectors: Sequence[Any], consumed: int, n_tokens: int) -> None:
        from safetensors.torch import save

        self.dir.mkdir(parents=True, exist_ok=True)
        state = {f"{_prefix(k, c)}/{name}": t.detach().to("cpu").contiguous().clone()
                 for k, c in enumerate(collectors) for name, t in c.state_dict().items()}
        name = f"state-{consumed:08d}.safetensors"
        blob = save(state, metadata={"format": FORMAT, "consumed": str(consumed)})
        try:
            _atomic_write_bytes(self.dir / name, lambda f: f.write(blob))
            record = {"identity": self.identity, "consumed": consumed, "n_tokens": int(n_tokens),
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


def _prefix(k: int, collector: Any) -> str:
    return f"c{k}.{type(collector).__name__}"
