"""Fused reductions behind the scorer, each with a PyTorch `*_ref` oracle beside it.

Tiers (Liger-style): ops (this package: schemas + dispatch) -> engine hooks -> model integration.
Every op is a `torch.library.custom_op` with a fake implementation, so it works under
torch.compile and FakeTensor. Backend selection: see `_backend`.
"""
from ._backend import available_backends, select
from .cosine import cosine_span_stats_, cosine_span_stats_ref, cosine_stats_, cosine_stats_ref
from .cross_entropy import lm_head_nll, lm_head_nll_ref
from .gram import gram_, gram_ref
from .taylor import taylor_stats_, taylor_stats_ref

__all__ = [
    "available_backends",
    "select",
    "cosine_stats_",
    "cosine_stats_ref",
    "cosine_span_stats_",
    "cosine_span_stats_ref",
    "taylor_stats_",
    "taylor_stats_ref",
    "lm_head_nll",
    "lm_head_nll_ref",
    "gram_",
    "gram_ref",
]
