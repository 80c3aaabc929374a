"""Plans: block choice by metric / ratio / span, protection, JSON round trip, typed errors."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_tiny

from shortllm.errors import PlanError
from shortllm.model.fingerprint import weights_fingerprint
from shortllm.pruning.plans import Plan, make_plan
from shortllm.pruning.sizes import blocks_for_ratio, count_params
from shortllm.scoring.scores import Scores

L = 8


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", L, seed=3)


def _scores(model, seed=0, n_max=4):
    g = torch.Generator().manual_seed(seed)
    per = torch.rand(L, generator=g, dtype=torch.float64)
    ang = torch.rand(n_max, L, generator=g, dtype=torch.float64)
    for n in range(1, n_max + 1):
        ang[n - 1, L - n + 1:] = float("nan")
    vals = {"bi": per.clone(), "taylor": per.flip(0).clone(), "mag": per * 3, "angular": ang}
    meta = {"format": "shortllm.scores/1", "num_layers": L, "fingerprint": weights_fingerprint(model),
            "model_name": "tiny-llama", "model_type": "llama"}
    return Scores(vals, meta)


def test_remove_k_takes_lowest_scores_outside_protection(model):
    s = _scores(model)
    for metric, protect in (("bi", (0, 0)), ("taylor", (4, 2)), ("mag", (4, 2))):
        plan = make_plan(s, metric, model=model, remove=2)
        v = s.per_block(metric)
        allowed = [i for i in range(L) if protect[0] <= i < L - protect[1]]
        expect = sorted(sorted(allowed, key=lambda i: float(v[i]))[:2])
        assert plan.removed == expect, (metric, plan.removed, expect)
        assert plan.protect == protect
        assert plan.kept == [i for i in range(L) if i not in expect]
    custom = make_plan(s, "taylor", model=model, remove=3, protect=(1, 1))
    v = s.per_block("taylor")
    assert custom.removed == sorted(sorted(range(1, L - 1), key=lambda i: float(v[i]))[:3])


def test_params_counted_on_the_model(model):
    s = _scores(model)
    plan = make_plan(s, "bi", model=model, remove=3)
    blocks = model.model.layers
    total = sum(p.numel() for p in model.parameters())
    assert plan.params_before == total
    assert plan.params_after == total - sum(sum(p.numel() for p in blocks[i].parameters()) for i in plan.removed)
    br = make_plan(None, model=model, blocks=[2], branches=[("attn", 5), ("mlp", 6)])
    gone = (sum(p.numel() for p in blocks[2].parameters()) + sum(p.numel() for p in blocks[5].self_attn.parameters())
            + sum(p.numel() for p in blocks[6].mlp.parameters()))
    assert br.params_after == total - gone
    assert br.removed_branches == [("attn", 5), ("mlp", 6)]


def test_ratio_is_of_parameters_and_closest(model):
    s = _scores(model)
    total = count_params(model)
    per_block = count_params(model.model.layers[0])
    for r in (0.1, 0.2, 0.35, 0.5):
        plan = make_plan(s, "bi", model=model, ratio=r)
        k = len(plan.removed)
        errs = [abs(j * per_block / total - r) for j in range(1, L)]
        assert k == 1 + errs.index(min(errs)), (r, k)
        assert plan.removed == sorted(s.ranking("bi")[:k])
        assert abs(plan.removed_fraction - k * per_block / total) < 1e-12
        assert plan.ratio == r and plan.mode == "ratio"


def test_blocks_for_ratio_is_the_closest_prefix():
    sizes = [10, 30, 20, 40]  # removal order 3, 1, 2, 0 removes 40, 70, 90, 100 of 200 (0.2, 0.35, 0.45, 0.5)
    order = [3, 1, 2, 0]
    assert [blocks_for_ratio(r, order, sizes, 200) for r in (0.0, 0.2, 0.3, 0.4, 0.45, 0.5)] == [1, 1, 2, 2, 3, 4]
    assert blocks_for_ratio(0.275, order, sizes, 200) == 1, "a tie keeps the smaller count"


def test_span_picks_lowest_angular_distance(model):
    s = _scores(model)
    ang = s.values["angular"]
    for n in (1, 2, 3):
        plan = make_plan(s, "angular", model=model, remove=n, span=True)
        row = ang[n - 1, : L - n + 1]
        best = int(torch.argmin(row))
        assert plan.removed == list(range(best, best + n)), (n, plan.removed, best)
        assert plan.mode == "span"
    prot = make_plan(s, model=model, remove=2, span=True, protect=(2, 2))
    row = ang[1]
    starts = range(2, L - 2 - 2 + 1)
    best = min(starts, key=lambda i: float(row[i]))
    assert prot.removed == [best, best + 1]


@pytest.mark.parametrize("kwargs, match", [
    ({"remove": 3, "protect": (3, 3)}, "only 2"),          # over-asking: 8 - 3 - 3 = 2 removable
    ({"remove": 1, "protect": (5, 3)}, "covers all"),     # overlapping protection
    ({"remove": 0}, ">= 1"),                              # empty
    ({"remove": L}, "all 8"),                              # total removal
    ({"blocks": list(range(L))}, "all 8"),
    ({"blocks": []}, "removes nothing"),
    ({"ratio": 0.0}, r"\(0, 1\)"),
    ({"ratio": 1.0}, r"\(0, 1\)"),
    ({"ratio": -0.2}, r"\(0, 1\)"),
    ({"blocks": [1, 1]}, "duplicate"),
    ({"blocks": [9]}, "out of range"),
    ({"blocks": [0], "protect": (1, 0)}, "protected"),
    ({"blocks": [2], "branches": [("attn", 2)]}, "removes whole"),
    ({"branches": [("ffn", 2)]}, "kind"),
    ({"remove": 2, "ratio": 0.2}, "only one"),
    ({"remove": 5, "span": True}, "n_max"),
])
def test_bad_requests_raise_plan_error(model, kwargs, match):
    s = _scores(model)
    with pytest.raises(PlanError, match=match):
        make_plan(s, "bi", model=model, **kwargs)


def test_plan_json_round_trip_and_model_check(model, tmp_path):
    s = _scores(model)
    plan = make_plan(s, "taylor", model=model, remove=2, branches=None)
    path = plan.save(tmp_path / "plan.json")
    raw = json.loads(path.read_text())
    assert raw["removed"] == plan.removed and raw["kept"] == plan.kept and raw["metric"] == "taylor"
    assert raw["params_before"] > raw["params_after"] > 0
    assert raw["scores_fingerprint"] and raw["model_fingerprint"] == weights_fingerprint(model)
    back = Plan.load(path, model=model)
    assert back.to_dict() == plan.to_dict()
    # another model (same arch, other depth) and other weights are refused
    with pytest.raises(PlanError, match="8 blocks"):
        Plan.load(path, model=make_tiny("llama", 6))
    with pytest.raises(PlanError, match="other weights"):
        Plan.load(path, model=make_tiny("llama", L, seed=99))
    with pytest.raises(PlanError, match="qwen2"):
        Plan.load(path, model=make_tiny("qwen2", L, seed=3))
    # same model in another dtype: refused by weights unless check_weights=False
    half = make_tiny("llama", L, seed=3, dtype=torch.bfloat16)
    # the same weights in bf16 are the same model (the fingerprint samples rounded to bf16, without the dtype)
    assert Plan.load(path, model=half).removed == plan.removed
    half = make_tiny("llama", L, seed=3, dtype=torch.float16)  # fp16 rounds differently: not recognised
    with pytest.raises(PlanError, match="check_weights=False"):
        plan.check_model(half)
    plan.check_model(half, check_weights=False)
    # corrupted files
    raw["kept"] = [0]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(PlanError, match="corrupted"):
        Plan.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(PlanError, match="JSON"):
        Plan.load(tmp_path / "junk.json")
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


def test_scores_of_another_model_refused(model):
    other = make_tiny("llama", L, seed=5)
    with pytest.raises(PlanError, match="other weights"):
        make_plan(_scores(other), "bi", model=model, remove=1)
    short = _scores(model)
    short.meta["num_layers"] = 6
    with pytest.raises(PlanError, match="6 blocks"):
        make_plan(short, "bi", model=model, remove=1)


def test_plan_from_real_mag_scores(model):
    from shortllm.scoring.engine import score_fast

    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    s = score_fast(model, [batch], metrics=("mag",), progress=False)
    plan = make_plan(s, "mag", model=model, remove=2)
    mags = [sum(float(p.detach().abs().sum()) for n, p in b.named_parameters() if "weight" in n)
            for b in model.model.layers]
    expect = sorted(sorted(range(4, L - 2), key=lambda i: mags[i])[:2])
    assert plan.removed == expect


def test_branch_pairs_and_search_results(model):
    from types import SimpleNamespace

    from shortllm.pruning.plans import plan_from_search

    plan = make_plan(None, model=model, branches=[("attn", 3), ("mlp", 3), ("mlp", 5)])
    assert plan.removed == [3] and plan.removed_branches == [("mlp", 5)]
    res = SimpleNamespace(method="subblock", plan=[("attn", 2), ("block", 6), ("mlp", 2), ("attn", 1)])
    p2 = plan_from_search(res, model)
    assert p2.removed == [2, 6] and p2.removed_branches == [("attn", 1)] and p2.metric == "ppl-subblock"
    assert Plan.from_dict(p2.to_dict()).to_dict() == p2.to_dict()


def test_ratio_the_protection_rule_cannot_meet_is_an_error_naming_the_largest_ratio():
    model10 = make_tiny("llama", 10, seed=1)
    ones = torch.ones(1, 4, dtype=torch.long)
    from shortllm.scoring.engine import score_fast

    s = score_fast(model10, [{"input_ids": ones, "attention_mask": ones}], metrics=("mag",), progress=False)
    total, per_block = count_params(model10), count_params(model10.model.layers[0])
    largest = 4 * per_block / total  # Mag+ on 10 blocks: only blocks 4..7 are removable
    with pytest.raises(PlanError, match=f"largest ratio possible is {largest:.4f}") as info:
        make_plan(s, "mag", model=model10, ratio=0.9)
    assert "protect=(4, 2)" in str(info.value)
    # a ratio the removable blocks can meet still works, up to all four of them
    assert len(make_plan(s, "mag", model=model10, ratio=largest).removed) == 4
    assert make_plan(s, "mag", model=model10, ratio=0.9, protect=(0, 0)).removed_fraction > 0.5
