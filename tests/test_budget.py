"""Budgeted plans: parameter / memory / latency targets met on a tiny model (counted and measured on the
pruned model, not taken from the plan), the greedy choice is the shortest ranking prefix, an unreachable
budget names the closest reachable figure, and the CLI parses --target-* units."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import make_tiny

from shortllm.errors import PlanError
from shortllm.pruning.budget import Budget, latency_profile, measured_figures
from shortllm.pruning.plans import make_plan
from shortllm.pruning.removal import prune
from shortllm.scoring.scores import Scores


def _count(model):
    seen = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in seen.values()), sum(p.numel() * p.element_size() for p in seen.values())


def _scores(model, **values):
    from shortllm.model.adapters import get_adapter

    return Scores.build(model, get_adapter(model), {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})


@pytest.fixture
def tiny():
    model = make_tiny("llama", 6, seed=1)
    scores = _scores(model, bi=[0.9, 0.2, 0.5, 0.1, 0.7, 0.3], bi_attn=[0.5, 0.4, 0.01, 0.3, 0.02, 0.6])
    return model, scores


def test_params_budget_is_met_by_the_shortest_prefix(tiny):
    model, scores = tiny
    total, _ = _count(model)
    per_block = _count(model.model.layers[0])[0]
    target = total - int(2.5 * per_block)  # needs three blocks
    plan = make_plan(scores, "bi", model=model, budget=Budget(params=target))
    assert plan.removed == [1, 3, 5]  # the three lowest bi
    assert plan.mode == "budget" and plan.budget["predicted"]["params"] == plan.params_after
    prune(model, plan)
    got, _ = _count(model)
    assert got == plan.params_after <= target
    assert got + per_block > target  # two blocks would not have been enough: nothing removed beyond need


def test_memory_budget_counts_parameter_bytes():
    model = make_tiny("llama", 6, seed=1).to(torch.bfloat16)
    scores = _scores(model, bi=[0.9, 0.2, 0.5, 0.1, 0.7, 0.3])
    _, nbytes = _count(model)
    target_gb = (nbytes - 1) / 1e9  # just below the unpruned model: one block
    plan = make_plan(scores, "bi", model=model, budget=Budget(memory_gb=target_gb))
    assert plan.removed == [3]
    prune(model, plan)
    assert _count(model)[1] / 1e9 <= target_gb
    assert measured_figures(model, Budget(memory_gb=target_gb))["memory_gb"] == pytest.approx(_count(model)[1] / 1e9)


def test_branch_metric_removes_branches(tiny):
    model, scores = tiny
    total, _ = _count(model)
    attn = _count(model.model.layers[0].self_attn)[0]
    plan = make_plan(scores, "bi_attn", model=model, budget=Budget(params=total - attn - 1))
    assert plan.removed == [] and plan.removed_branches == [("attn", 2), ("attn", 4)]
    assert plan.params_after == total - 2 * attn


def test_unreachable_budget_names_the_closest_figure(tiny):
    model, scores = tiny
    total, _ = _count(model)
    best = total - 5 * _count(model.model.layers[0])[0]  # a model keeps one block
    with pytest.raises(PlanError, match=f"params={best:,} at best"):
        make_plan(scores, "bi", model=model, budget=Budget(params=1000))
    with pytest.raises(PlanError, match="already meets"):
        make_plan(scores, "bi", model=model, budget=Budget(params=10**9))
    with pytest.raises(PlanError, match="only one of|budget= chooses"):
        make_plan(scores, "bi", model=model, remove=2, budget=Budget(params=1000))
    with pytest.raises(PlanError, match="at least one target"):
        Budget()


def test_latency_budget_predicted_and_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTLLM_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    model = make_tiny("llama", 8, seed=2, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                      num_key_value_heads=4)
    scores = _scores(model, bi=[0.8, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9])
    prof = latency_profile(model, batch=1, seq_len=64)
    files = list((tmp_path / "cache" / "latency").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["profile"] == prof  # cached as JSON
    assert latency_profile(model, batch=1, seq_len=64) == prof  # read back, not re-measured
    blocks = sum(v for k, v in prof["prefill"].items() if k.startswith("block."))
    assert 0 < blocks <= prof["prefill"]["total"]
    assert 0 < prof["decode"]["block.0"] < prof["decode"]["total"] < prof["prefill"]["total"]
    # timing on a shared CPU (load ~10 on 2 cores while these tests ran): a loose band around the prediction,
    # and up to three fresh profile -> plan -> measure rounds, since a load spike while profiling inflates the
    # prediction (and one while measuring, the measurement)
    bands = []
    for attempt in range(3):
        if attempt:
            prof = latency_profile(model, batch=1, seq_len=64, refresh=True)
        target = prof["prefill"]["total"] * 0.6
        budget = Budget(latency_ms=target, batch=1, seq_len=64)
        plan = make_plan(scores, "bi", model=model, budget=budget)
        predicted = plan.budget["predicted"]["latency_ms"]
        assert predicted <= target  # the plan meets the target in prediction, always
        assert plan.removed == sorted(scores.ranking("bi")[: len(plan.removed)])
        pruned = prune(model, plan, inplace=False)
        measured = min(measured_figures(pruned, budget)["latency_ms"] for _ in range(3))
        bands.append(measured / predicted)
        if 0.4 <= bands[-1] <= 2.0:
            break
    # a unit error (ms vs s, the unpruned total, one block per layer twice) is off by far more than 4x
    assert 0.25 <= min(bands, key=lambda b: abs(math.log(b))) <= 4.0, f"measured / predicted latency: {bands}"


def test_parse_target_units():
    from shortllm.cli.prune_cmd import parse_target
    from shortllm.errors import UsageError

    assert parse_target("params", "100M") == 1e8
    assert parse_target("params", "1.5B") == 1.5e9
    assert parse_target("params", "135000000") == 135e6
    assert parse_target("memory", "0.3GB") == pytest.approx(0.3)
    assert parse_target("memory", "512MiB") == pytest.approx(512 * 2**20 / 1e9)
    assert parse_target("latency", "25ms") == 25.0
    assert parse_target("latency", "0.5s") == 500.0
    for kind, bad in (("params", "100Q"), ("memory", "0.3 furlongs"), ("latency", "fast"), ("latency", "-3ms")):
        with pytest.raises(UsageError, match="--target-"):
            parse_target(kind, bad)


def test_cli_prune_with_targets(tmp_path, capsys):
    from eval_helpers import make_bpe_tokenizer

    from shortllm.cli.app import main

    d = tmp_path / "tiny"
    model = make_tiny("llama", 6, seed=2)
    model.save_pretrained(d)
    make_bpe_tokenizer().save_pretrained(d)
    scores = _scores(model, bi=[0.9, 0.2, 0.5, 0.1, 0.7, 0.3])
    scores.save(tmp_path / "s.json")
    total, _ = _count(model)
    per_block = _count(model.model.layers[0])[0]
    target = total - int(1.5 * per_block)
    out = tmp_path / "out"
    assert main(["prune", str(d), "--scores", str(tmp_path / "s.json"), "--metric", "bi", "--target-params",
                 str(target), "-o", str(out)]) == 0
    meta = json.loads((out / "shortllm.json").read_text())
    assert meta["plan"]["removed"] == [1, 3] and meta["plan"]["budget"]["measured"]["params"] <= target
    assert "measured" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    assert _count(AutoModelForCausalLM.from_pretrained(out))[0] == meta["plan"]["params_after"]
    base = ["prune", str(d), "--scores", str(tmp_path / "s.json"), "--metric", "bi"]
    assert main(base + ["--target-memory", "0.3 parsecs", "-o", str(tmp_path / "a")]) == 2
    assert "GiB" in capsys.readouterr().err
    assert main(base + ["--target-params", "10", "-o", str(tmp_path / "b")]) == 2  # unreachable
    assert "at best" in capsys.readouterr().err
    assert main(base + ["--target-params", "10", "--remove", "2", "-o", str(tmp_path / "c")]) == 2
    assert main(base + ["--target-params", "10", "--samples", "3", "-o", str(tmp_path / "e")]) == 2
    assert main(["prune", str(d), "-o", str(tmp_path / "f")]) == 2  # nothing asked
