"""`ppl` metric of score_fast (prefix reuse + replay) against physically deleting each block."""
import math

import pytest
import torch
from tiny_models import make_tiny, random_batch

from shortllm.errors import EmptyLoaderError, MetricError
from shortllm.model.adapters import get_adapter
from shortllm.ops.cross_entropy import lm_head_nll_ref
from shortllm.scoring.engine import score_fast
from shortllm.scoring.ppl import HeadLoss, delete_blocks_copy, mean_nll_full, removal_ppl_naive


def _reference(model, data):
    L = get_adapter(model).num_layers
    return torch.tensor([math.exp(mean_nll_full(delete_blocks_copy(model, [i]), data)) for i in range(L)],
                        dtype=torch.float64)


def _data():
    # two padded batches of different shapes; 19 tokens > the tiny sliding window (8)
    return [random_batch(3, 19, seed=11), random_batch(2, 10, seed=12)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2", "opt", "gpt_neox"])
def test_ppl_equals_physical_deletion_fp32(arch):
    model = make_tiny(arch, num_layers=4, seed=3)
    data = _data()
    got = score_fast(model, data, metrics=("ppl",), progress=False).values["ppl"]
    want = _reference(model, data)
    assert got.dtype == torch.float64 and got.shape == (4,)
    assert torch.allclose(got, want, rtol=1e-5, atol=0), (got, want)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt"])
def test_ppl_equals_physical_deletion_fp64(arch):
    model = make_tiny(arch, num_layers=4, seed=5, dtype=torch.float64)
    data = _data()
    got = score_fast(model, data, metrics="ppl", progress=False).values["ppl"]
    want = _reference(model, data)
    assert torch.allclose(got, want, rtol=1e-11, atol=0), (got, want)
    assert len(set(want.tolist())) == 4, "blocks must differ, else the comparison is vacuous"


@pytest.mark.parametrize("arch", ["gemma2", "gpt2"])
def test_ppl_op_head_equals_physical_deletion(arch):
    """The shortllm.ops.lm_head_nll head (the default on CUDA; softcapped Gemma-2 included) gives the same
    numbers as the CPU default (row-chunked F.cross_entropy) and as deletion."""
    model = make_tiny(arch, num_layers=3, seed=6)
    data = _data()
    got = score_fast(model, data, metrics=("ppl",), progress=False, ppl_head="op").values["ppl"]
    assert torch.allclose(got, _reference(model, data), rtol=1e-5, atol=0)


def test_ppl_with_other_metrics_and_left_padding():
    """ppl next to BI and Taylor (a forward under autograd) gives the same numbers; left padding works."""
    model = make_tiny("llama", num_layers=3, seed=7)  # fp32: HF's float64 eager mask overflows on left padding
    b = random_batch(3, 12, seed=13)
    b = {k: v.flip(1) for k, v in b.items()}  # left-padded
    data = [b]
    want = _reference(model, data)
    alone = score_fast(model, data, metrics=("ppl",), progress=False)
    both = score_fast(model, data, metrics=("bi", "taylor", "ppl"), progress=False)
    bi_alone = score_fast(model, data, metrics=("bi",), progress=False)
    assert torch.allclose(alone.values["ppl"], want, rtol=1e-5)
    assert torch.allclose(both.values["ppl"], alone.values["ppl"], rtol=1e-6)
    assert torch.allclose(both.values["bi"], bi_alone.values["bi"], rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_naive_layer_list_skip_equals_deletion():
    model = make_tiny("qwen2", num_layers=4, seed=8, dtype=torch.float64)
    data = _data()
    assert torch.allclose(removal_ppl_naive(model, data), _reference(model, data), rtol=1e-12)


def test_head_loss_matches_full_cross_entropy():
    """Only rows with a valid next token count, softcap included (Gemma-2)."""
    model = make_tiny("gemma2", num_layers=1, seed=9, dtype=torch.float64)
    adapter = get_adapter(model)
    b = random_batch(3, 14, seed=14)
    h = torch.randn(3, 14, 64, dtype=torch.float64)
    loss = HeadLoss(adapter, b["input_ids"], b["attention_mask"])
    hp = adapter.head_params()
    assert hp["softcap"] > 0
    tg = b["input_ids"][:, 1:].masked_fill(b["attention_mask"][:, 1:] == 0, -100).reshape(-1)
    with torch.no_grad():
        want = lm_head_nll_ref(adapter.head_input(h[:, :-1]).reshape(-1, 64), hp["weight"], tg,
                               softcap=hp["softcap"]).sum()
    assert loss.n_tokens == int((tg != -100).sum())
    assert loss.nll_sum(h) == pytest.approx(float(want), rel=1e-12)
    model.float()
    loss32 = HeadLoss(adapter, b["input_ids"], b["attention_mask"])
    assert loss32.nll_sum(h.float()) == pytest.approx(float(want), rel=1e-5)


def test_ppl_errors():
    model = make_tiny("llama", num_layers=2)
    with pytest.raises(EmptyLoaderError):
        score_fast(model, [], metrics=("ppl",), progress=False)
    with pytest.raises(MetricError):
        score_fast(model, [random_batch(1, 5)], metrics=("ppl",), progress=False, ppl_bogus=1)
    with pytest.raises(MetricError):
        score_fast(model, [random_batch(1, 5)], metrics=("ppl",), progress=False, ppl_head="fast")


@pytest.mark.real_model
def test_ppl_real_model(smollm2, data_dir):
    from shortllm.data.calibration import calibration_loader

    model, tok = smollm2
    data = calibration_loader("wikitext2", tok, n_samples=2, seq_len=40, batch_size=2)
    got = score_fast(model, data, metrics=("ppl",), progress=False).values["ppl"]
    assert got.shape == (30,) and torch.isfinite(got).all()
    adapter = get_adapter(model)
    for i in (0, 29):
        with torch.no_grad():
            from shortllm.model.replay import layers_removed

            with layers_removed(model, adapter, [i]):
                want = math.exp(mean_nll_full(model, data, float64=False))
        assert got[i] == pytest.approx(want, rel=1e-5)
    # removing the first block of a trained model hurts far more than a middle one
    assert got[0] > torch.median(got)
