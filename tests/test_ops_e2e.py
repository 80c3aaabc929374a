"""End to end: score_fast gives the same Scores whichever kernel backend runs the reductions."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when first imported: set it before

import pytest
import torch

from shortllm.ops import _backend

# (rtol, atol) of every score against the reference backend's. The C++ kernels differ from the torch
# reference by rounding only; Triton rows are float32 sums and the PPL head a float32 tl.dot.
TOL = {"cpu": (1e-6, 1e-9), "triton": (1e-4, 1e-6)}
METRICS = ("bi", "angular", "taylor", "mag", "ppl")


def _backends() -> list[str]:
    out = []
    if _backend.available_backends()["cpu"]:
        out.append("cpu")
    try:
        import triton.language as tl

        if type(tl.sum).__name__ == "InterpretedFunction":
            out.append("triton")
    except ImportError:
        pass
    return out


def _score_all(model, data, monkeypatch, names, metrics=METRICS):
    from shortllm.scoring.engine import score_fast

    out = {}
    for name in ["ref", *names]:
        monkeypatch.setenv("SHORTLLM_BACKEND", name)
        out[name] = score_fast(model, data, metrics=metrics, progress=False)
    return out


def _assert_same(scores, name):
    ref = scores["ref"]
    rtol, atol = TOL[name]
    for metric in ref.values:
        a, b = scores[name].values[metric], ref.values[metric]
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name} {metric}: NaN pattern differs"
        fin = ~torch.isnan(b)
        assert torch.allclose(a[fin], b[fin], rtol=rtol, atol=atol), (
            f"{name} {metric}: max |diff| {(a[fin] - b[fin]).abs().max().item():.3g}")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: soft-capped logits in the PPL head
def test_tiny_model_scores_match_reference(monkeypatch, arch):
    from tiny_models import make_tiny, random_batch

    names = _backends()
    if arch != "llama":
        names = [n for n in names if n != "triton"]  # the interpreter is slow: one architecture is enough
    if not names:
        pytest.skip("no kernel backend available")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = make_tiny(arch, num_layers=3)
    data = [random_batch(2, 9, seed=0)]
    scores = _score_all(model, data, monkeypatch, names)
    for name in names:
        _assert_same(scores, name)


@pytest.mark.real_model
def test_smollm2_scores_match_reference(monkeypatch, smollm2):
    if not _backend.available_backends()["cpu"]:
        pytest.skip("shortllm._cpu not built")
    from tiny_models import random_batch

    model, _tok = smollm2
    # no "ppl" here: 30 layers x a 49k vocabulary through the float64-free torch path is minutes on 2 cores;
    # the fused head is compared on the tiny models above
    data = [random_batch(1, 32, seed=0, pad=False, vocab=model.config.vocab_size)]
    scores = _score_all(model, data, monkeypatch, ["cpu"], metrics=("bi", "angular", "mag"))
    _assert_same(scores, "cpu")
