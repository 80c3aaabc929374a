"""`Scores`: per-block importance of every metric, with provenance, JSON round-trip, a Markdown table
and a PNG plot. Lower score = less important = removed first, for every metric (SPEC §2)."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from shortllm.errors import ScoresMismatchError
from shortllm.io.atomic import atomic_path, atomic_write_text
from shortllm.io.stamp import versions
from shortllm.model.fingerprint import weights_fingerprint

FORMAT = "shortllm.scores/1"




def _jsonable(t: Tensor) -> Any:
    return [None if (isinstance(v, float) and math.isnan(v)) else v for v in t.tolist()] if t.dim() == 1 else \
        [_jsonable(r) for r in t]


def _from_json(v: Any) -> Tensor:
    def conv(x):
        return [conv(y) for y in x] if isinstance(x, list) else (float("nan") if x is None else float(x))
    return torch.tensor(conv(v), dtype=torch.float64)


@dataclass
class Scores:
    """values[metric]: float64 tensor [L] ([n_max, L] for "angular": row n-1 = span n, NaN where l+n > L).
    experts[layer]: per-expert statistics of an MoE block, {"count", "reap_sum", "norm_sum", "reap_mean"}: float64
    [num_experts] each (`shortllm.scoring.experts`); empty for a dense model."""

    values: dict[str, Tensor]
    meta: dict = field(default_factory=dict)
    experts: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    @classmethod
    def build(cls, model: nn.Module, adapter, results: dict[str, Tensor], *, data=None, n_tokens: int = 0,
              model_name: Optional[str] = None, options: Optional[dict] = None) -> "Scores":
        cfg = model.config
        desc = getattr(data, "description", None) if data is not None else None
        meta = {
            "format": FORMAT,
            "model_name": model_name or getattr(cfg, "_name_or_path", "") or type(model).__name__,
            "model_type": getattr(cfg, "model_type", ""),
            "num_layers": adapter.num_layers,
            "fingerprint": weights_fingerprint(model),
            "data": desc if desc is not None else {"source": type(data).__name__ if data is not None else None},
            "data_fingerprint": getattr(data, "fingerprint", None),
            "n_tokens": int(n_tokens),
            "options": options or {},
            "versions": versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        from shortllm.scoring.experts import split_expert_results

        results, experts = split_expert_results(results)
        return cls({k: v.to(torch.float64).cpu() for k, v in results.items()}, meta, experts)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def metrics(self) -> list[str]:
        return list(self.values)

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    def per_block(self, metric: str) -> Tensor:
        """[L] scores; for "angular" the span-1 row (a single block's angular distance)."""
        if metric not in self.values:
            from shortllm.errors import MetricError
            raise MetricError(f"these scores have no {metric!r}; they have {self.metrics} (re-score with "
                              f"metrics including {metric!r})")
        v = self.values[metric]
        return v[0] if v.dim() == 2 else v

    def ranking(self, metric: str) -> list[int]:
        """Block indices from least to most important (stable: ties keep the lower index first)."""
        v = self.per_block(metric).clone()
        v[torch.isnan(v)] = float("inf")
        return [int(i) for i in torch.argsort(v, stable=True)]

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"meta": self.meta, "values": {k: _jsonable(v) for k, v in self.values.items()}}
        if self.experts:  # optional: older files (and dense models) have none
            out["experts"] = {str(i): {k: _jsonable(v) for k, v in d.items()} for i, d in self.experts.items()}
        return out

    def save(self, path: str | os.PathLike) -> Path:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Optional[nn.Module] = None) -> "Scores":
        """Read a scores JSON; with `model`, refuse it unless fingerprint and layer count match."""
        from shortllm.errors import DataError

        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            values = {k: _from_json(v) for k, v in raw["values"].items()}
            meta = raw["meta"]
            experts = {int(i): {k: _from_json(v) for k, v in d.items()} for i, d in raw.get("experts", {}).items()}
            if meta.get("format") != FORMAT:
                raise KeyError("format")
        except FileNotFoundError:
            raise DataError(f"scores file {path} does not exist; "
                            f"create it with `shortllm score MODEL -o {path}`") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path} is not a valid shortllm scores file ({type(exc).__name__}: {exc}); "
                            "re-create it with `shortllm score`") from None
        scores = cls(values, meta, experts)
        if model is not None:
            scores.check_model(model)
        return scores

    def check_model(self, model: nn.Module) -> None:
        from shortllm.model.adapters import get_adapter

        n = get_adapter(model).num_layers
        if n != self.num_layers:
            raise ScoresMismatchError(f"scores are for a model of {self.num_layers} blocks but this model has {n}; "
                                      f"score this model first (`shortllm score`)")
        fp = weights_fingerprint(model)
        if fp != self.meta.get("fingerprint"):
            raise ScoresMismatchError(f"scores were computed on different weights ({self.meta.get('model_name')}, "
                                      f"fingerprint {self.meta.get('fingerprint')}) than this model ({fp}); "
                                      "re-score this model")

    # ---- human-readable ------------------------------------------------------------------------
    def to_markdown(self) -> str:
        per = {m: self.per_block(m) for m in self.metrics}
        head = "| block | " + " | ".join(m if m != "angular" else "angular (n=1)" for m in per) + " |"
        lines = [head, "|" + "---|" * (len(per) + 1)]
        for i in range(self.num_layers):
            lines.append(f"| {i} | " + " | ".join(f"{float(v[i]):.6g}" for v in per.values()) + " |")
        lines.append("")
        lines.append("Ranking (least important first):")
        lines.append("")
        for m in per:
            lines.append(f"- {m}: {self.ranking(m)}")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG: one panel per metric (per-block score), plus the angular span heat-map when present."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        mets = self.metrics
        extra = 1 if "angular" in self.values and self.values["angular"].dim() == 2 else 0
        fig, axes = plt.subplots(len(mets) + extra, 1, figsize=(8, 2.2 * (len(mets) + extra)), squeeze=False)
        for ax, m in zip(axes[:, 0], mets):
            v = self.per_block(m).numpy()
            ax.bar(range(len(v)), v, color="tab:blue")
            ax.set_ylabel(m if m != "angular" else "angular n=1")
            ax.set_xlim(-0.5, len(v) - 0.5)
        if extra:
            ax = axes[-1, 0]
            im = ax.imshow(self.values["angular"].numpy(), aspect="auto", origin="lower", cmap="viridis",
                           extent=(-0.5, self.num_layers - 0.5, 0.5, self.values["angular"].shape[0] + 0.5))
            ax.set_ylabel("span n")
            fig.colorbar(im, ax=ax, label="angular distance")
        axes[-1, 0].set_xlabel("block")
        fig.suptitle(f"{self.meta.get('model_name', '')}: block importance (lower = removed first)", fontsize=10)
        fig.tight_layout()
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=110, format="png")
        finally:
            plt.close(fig)
        return path
