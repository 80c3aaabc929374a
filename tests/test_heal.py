"""Training-free seam healing: the merged model computes exactly what was fitted, the fit lowers its own
objective on the calibration stream against no healing (measured by running the models, not from the
statistics), the export reloads in plain transformers with the healed logits, and the CLI heals."""
from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny, random_batch

from shortllm.errors import PlanError, UnsupportedModelError, UsageError
from shortllm.model.adapters import get_adapter
from shortllm.pruning.healing import heal, spans_of
from shortllm.pruning.plans import make_plan
from shortllm.pruning.removal import prune

METHODS = ("lstsq", "cosine", "channel")


def calib(n_batches=3, seed=5):
    return [random_batch(batch=3, seq=19, seed=seed + i) for i in range(n_batches)]


def _outputs(model, data, block):
    """Valid-token rows of block `block`'s output over `data` (a forward hook; the oracle is the model itself)."""
    rows = []
    blk = get_adapter(model).blocks()[block]

    def hook(_m, _a, out):
        h = out[0] if isinstance(out, (tuple, list)) else out
        rows.append(h.detach().reshape(-1, h.shape[-1]).double())

    handle = blk.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for b in data:
                model(**b, use_cache=False)
    finally:
        handle.remove()
    mask = torch.cat([b["attention_mask"].reshape(-1).bool() for b in data])
    return torch.cat(rows)[mask]


def _objective(kind, pred, target):
    if kind == "mse":
        return float((pred - target).square().sum(-1).mean())
    return float((1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1)).mean())


def test_spans_of():
    assert spans_of([5, 2, 3, 9]) == [(2, 4), (5, 6), (9, 10)]
    assert spans_of([]) == []


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_healing_lowers_its_objective_on_the_calibration_stream(arch, method):
    data = calib()
    ref = make_tiny(arch, 6, seed=3)
    target = _outputs(ref, data, 3)  # the stream leaving the span 2..3 in the unpruned model
    plain = make_tiny(arch, 6, seed=3)
    plan = make_plan(None, model=plain, blocks=[2, 3])
    prune(plain, plan)
    healed = make_tiny(arch, 6, seed=3)
    report = heal(healed, plan, data, method=method, progress=False)
    assert [(s.start, s.end, s.anchor) for s in report.spans] == [(2, 4, 1)]
    fit = report.spans[0]
    # the pruned models' block 1 (the anchor) feeds what was block 4: compare it with the span's output
    before = _objective(fit.objective, _outputs(plain, data, 1), target)
    after = _objective(fit.objective, _outputs(healed, data, 1), target)
    assert after < before, (method, before, after)
    # what the report says it fitted is what the merged model computes (statistics vs a real forward)
    assert fit.before == pytest.approx(before, rel=1e-5, abs=1e-9)
    assert fit.after == pytest.approx(after, rel=1e-4, abs=1e-9)
    assert healed.shortllm_plan is plan and healed.shortllm_heal["method"] == method


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma", "phi3", "opt"])
def test_lstsq_heals_every_other_mergeable_architecture(arch):
    data = calib(2)
    target = _outputs(make_tiny(arch, 5, seed=3), data, 2)
    plan = make_plan(None, model=make_tiny(arch, 5, seed=3), blocks=[2])
    plain = prune(make_tiny(arch, 5, seed=3), plan)
    healed = make_tiny(arch, 5, seed=3)
    fit = heal(healed, plan, data, method="lstsq", progress=False).spans[0]
    before = _objective("mse", _outputs(plain, data, 1), target)
    after = _objective("mse", _outputs(healed, data, 1), target)
    assert after < before and fit.after == pytest.approx(after, rel=1e-4), (arch, before, after, fit)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_channel_heals_through_a_post_mlp_norm(arch, tmp_path):
    # Gemma-2/3 renormalise the MLP branch (post_feedforward_layernorm, weight applied as 1 + w): the per-channel
    # map goes into that norm's weight. Oracle: the span's output in the unpruned model, and plain transformers
    # reloading the export.
    from transformers import AutoModelForCausalLM

    from shortllm.pruning.exporting import export

    data = calib()
    target = _outputs(make_tiny(arch, 6, seed=3), data, 3)
    plan = make_plan(None, model=make_tiny(arch, 6, seed=3), blocks=[2, 3])
    plain = prune(make_tiny(arch, 6, seed=3), plan)
    healed = make_tiny(arch, 6, seed=3)
    w0 = healed.model.layers[1].post_feedforward_layernorm.weight.detach().clone()
    fit = heal(healed, plan, data, method="channel", progress=False).spans[0]
    before = _objective("mse", _outputs(plain, data, 1), target)
    after = _objective("mse", _outputs(healed, data, 1), target)
    assert after < before, (arch, before, after)
    assert fit.before == pytest.approx(before, rel=1e-5) and fit.after == pytest.approx(after, rel=1e-4)
    assert not torch.equal(healed.model.layers[1].post_feedforward_layernorm.weight, w0)
    again = AutoModelForCausalLM.from_pretrained(export(healed, tmp_path / "healed", plan=plan),
                                                 attn_implementation="eager").eval()
    batch = random_batch(seed=11)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, healed(**batch).logits, rtol=0, atol=0)


def test_channel_merge_into_a_plain_layernorm_scales_weight_and_bias():
    from shortllm.pruning.healing import _merge_into_norm

    norm = torch.nn.LayerNorm(7)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(5, 7)
    scale = torch.rand(7, dtype=torch.float64) + 0.5
    want = norm(x).double() * scale
    _merge_into_norm(norm, scale)
    torch.testing.assert_close(norm(x).double(), want, rtol=1e-5, atol=1e-6)


def test_lstsq_map_is_the_normal_equations_solution():
    # with ridge 0 the merged map minimises ||m T - r||^2: compare with torch.linalg.lstsq on the raw rows
    data = calib(2)
    ref = make_tiny("llama", 5, seed=4)
    ad = get_adapter(ref)
    ms, hs = [], []
    h1 = ad.mlp_out(ad.blocks()[1]).register_forward_hook(lambda m, a, o: ms.append(o.detach().reshape(-1, 64)))
    h2 = ad.blocks()[1].register_forward_hook(
        lambda m, a, o: hs.append((o[0] if isinstance(o, tuple) else o).detach().reshape(-1, 64)))
    y = _outputs(ref, data, 2)
    h1.remove()
    h2.remove()
    mask = torch.cat([b["attention_mask"].reshape(-1).bool() for b in data])
    m, h = torch.cat(ms).double()[mask], torch.cat(hs).double()[mask]
    t_want = torch.linalg.lstsq(m, y - (h - m)).solution
    w0 = ad.mlp_out(ad.blocks()[1]).weight.detach().double().clone()
    healed = make_tiny("llama", 5, seed=4)
    heal(healed, make_plan(None, model=healed, blocks=[2]), data, method="lstsq", ridge=0.0, progress=False)
    w1 = get_adapter(healed).mlp_out(get_adapter(healed).blocks()[1]).weight.detach().double()
    torch.testing.assert_close(w1, t_want.T @ w0, rtol=2e-4, atol=2e-6)


def test_export_reloads_in_plain_transformers_with_equal_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from shortllm.pruning.exporting import export

    model = make_tiny("llama", 6, seed=7)
    plan = make_plan(None, model=model, blocks=[1, 2, 4])  # two spans: 1..2 (anchor 0) and 4 (anchor 3)
    report = heal(model, plan, calib(), method="lstsq", progress=False)
    assert [s.anchor for s in report.spans] == [0, 3]
    out = export(model, tmp_path / "healed", plan=plan)
    again = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert again.config.num_hidden_layers == 3
    batch = random_batch(seed=11)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    # and the healing did change the anchors' weights (the pruned-only model differs)
    plain = prune(make_tiny("llama", 6, seed=7), plan)
    with torch.no_grad():
        assert not torch.allclose(plain(**batch).logits, model(**batch).logits)


def test_span_at_block_zero_is_skipped_and_reported():
    model = make_tiny("llama", 6, seed=1)
    report = heal(model, make_plan(None, model=model, blocks=[0, 1, 4]), calib(1), method="channel", progress=False)
    assert report.skipped == [{"start": 0, "end": 2, "reason": "no kept block before the span"}]
    assert [s.anchor for s in report.spans] == [3]
    with pytest.raises(PlanError, match="nothing to heal"):
        m2 = make_tiny("llama", 6, seed=1)
        heal(m2, make_plan(None, model=m2, blocks=[0]), calib(1), progress=False)


def test_bad_inputs():
    model = make_tiny("llama", 4, seed=1)
    plan = make_plan(None, model=model, blocks=[2])
    with pytest.raises(UsageError, match="lstsq"):
        heal(model, plan, calib(1), method="ols")
    with pytest.raises(PlanError, match="branches"):
        heal(model, make_plan(None, model=model, branches=[("attn", 2)]), calib(1), progress=False)
    gem = make_tiny("gemma2", 4, seed=1)
    for method in ("lstsq", "cosine"):  # a full map cannot pass Gemma's post-MLP norm; the error names the fix
        with pytest.raises(UnsupportedModelError, match="post_feedforward_layernorm.*method='channel'"):
            heal(gem, make_plan(None, model=gem, blocks=[2]), calib(1), method=method, progress=False)
    pruned = prune(make_tiny("llama", 4, seed=1), plan)
    with pytest.raises(PlanError, match="UNPRUNED"):
        heal(pruned, plan, calib(1), progress=False)


def test_cli_prune_heal(tmp_path):
    import json

    from eval_helpers import make_bpe_tokenizer
    from transformers import AutoModelForCausalLM

    from shortllm.cli.app import main

    d = tmp_path / "tiny"
    make_tiny("llama", 6, seed=2).save_pretrained(d)
    make_bpe_tokenizer().save_pretrained(d)
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 80)
    out = tmp_path / "out"
    assert main(["prune", str(d), "--blocks", "3,4", "--heal", "cosine", "--data", str(tmp_path / "calib.txt"),
                 "--samples", "4", "--seq-len", "16", "-o", str(out)]) == 0
    meta = json.loads((out / "shortllm.json").read_text())
    assert meta["plan"]["removed"] == [3, 4]
    healed = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(d)
    w = lambda m, i: m.model.layers[i].mlp.down_proj.weight  # noqa: E731
    assert not torch.equal(w(healed, 2), w(base, 2)) and torch.equal(w(healed, 1), w(base, 1))
    # calibration options without --heal (or a latency target) do not apply
    assert main(["prune", str(d), "--blocks", "3", "--samples", "4", "-o", str(tmp_path / "x")]) == 2
    with pytest.raises(SystemExit) as exc:  # argparse: not one of the methods
        main(["prune", str(d), "--blocks", "3", "--heal", "ols", "-o", str(tmp_path / "y")])
    assert exc.value.code == 2


def test_cli_heals_gemma_per_channel_and_refuses_a_full_map(tmp_path, capsys):
    from eval_helpers import make_bpe_tokenizer
    from transformers import AutoModelForCausalLM

    from shortllm.cli.app import main

    d = tmp_path / "gemma"
    make_tiny("gemma3_text", 6, seed=2).save_pretrained(d)
    make_bpe_tokenizer().save_pretrained(d)
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 80)
    args = ["prune", str(d), "--blocks", "3,4", "--data", str(tmp_path / "calib.txt"), "--samples", "4",
            "--seq-len", "16"]
    assert main(args + ["--heal", "lstsq", "-o", str(tmp_path / "bad")]) == 2
    assert "method='channel'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(args + ["--heal", "channel", "-o", str(tmp_path / "out")]) == 0
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(d)
    w = lambda m, i: m.model.layers[i].post_feedforward_layernorm.weight  # noqa: E731
    assert healed.config.num_hidden_layers == 4
    assert not torch.equal(w(healed, 2), w(base, 2)) and torch.equal(w(healed, 1), w(base, 1))


def test_too_few_calibration_tokens_for_a_full_map_warn():
    """Fewer valid tokens than the hidden size make the lstsq / cosine map underdetermined: a warning says so
    (channel fits D numbers, not D x D, so it does not warn)."""
    model = make_tiny("llama", 6, seed=3)
    d = model.config.hidden_size
    few = [random_batch(batch=1, seq=max(2, d // 4), seed=1)]
    assert int(few[0]["attention_mask"].sum()) < d
    with pytest.warns(UserWarning, match="fewer tokens than the hidden size"):
        heal(model, make_plan(None, model=model, blocks=[2]), few, method="lstsq", progress=False)
    chan = make_tiny("llama", 6, seed=3)
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error", UserWarning)
        heal(chan, make_plan(None, model=chan, blocks=[2]), few, method="channel", progress=False)
