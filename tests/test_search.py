"""SLEB iterative search against brute force; BlockPruner sub-blocks against zeroed output projections."""
import copy
import json
import math

import pytest
import torch
from tiny_models import make_tiny, random_batch

from shortllm.errors import EmptyLoaderError, PlanError
from shortllm.model.adapters import get_adapter
from shortllm.scoring.ppl import delete_blocks_copy, mean_nll_full
from shortllm.scoring.search import iterative, subblock


def _data():
    return [random_batch(2, 13, seed=21), random_batch(1, 9, seed=22, pad=False)]


def test_iterative_equals_brute_force():
    """Every candidate PPL of every round == the PPL of the model with that set physically deleted, and the
    greedy choices are the argmins of the brute-force table over all removal sets."""
    L, K = 5, 3
    model = make_tiny("qwen2", num_layers=L, seed=2, dtype=torch.float64)
    data = _data()
    cache = {}

    def ppl(removed):
        key = tuple(sorted(removed))
        if key not in cache:
            cache[key] = math.exp(mean_nll_full(delete_blocks_copy(model, key), data))
        return cache[key]

    res = iterative(model, data, K, progress=False)
    assert res.base_ppl == pytest.approx(ppl(()), rel=1e-12)
    removed = []
    for r in range(K):
        cands = [i for i in range(L) if i not in removed]
        table = {i: ppl(removed + [i]) for i in cands}
        assert set(res.candidate_ppl[r]) == {str(i) for i in cands}
        for i in cands:
            assert res.candidate_ppl[r][str(i)] == pytest.approx(table[i], rel=1e-10)
        removed.append(min(cands, key=lambda i: table[i]))
        assert res.ppl_after_each_step[r] == pytest.approx(table[removed[-1]], rel=1e-10)
    assert res.order == removed and res.removed == sorted(removed)
    assert res.plan == [("block", i) for i in removed]


def test_iterative_respects_protection():
    model = make_tiny("llama", num_layers=5, seed=3, dtype=torch.float64)
    res = iterative(model, _data(), 2, protect=(1, 1), keep=[2], progress=False)
    assert set(res.order) <= {3} | {1} and len(res.order) == 2
    assert set(res.candidate_ppl[0]) == {"1", "3"}


@pytest.mark.parametrize("arch", ["gemma2", "llama", "gpt_neox"])
def test_subblock_equals_zeroed_output_projections(arch):
    """Zeroing a branch's output with a hook == zeroing its output projection (weight and bias): post-norm
    Gemma-2, pre-norm Llama, parallel-residual GPT-NeoX."""
    L, K = 3, 2
    model = make_tiny(arch, num_layers=L, seed=4, dtype=torch.float64)
    data = [random_batch(2, 11, seed=23)]

    def ppl(pairs):
        m = copy.deepcopy(model)
        a = get_adapter(m)
        with torch.no_grad():
            for kind, b in pairs:
                proj = a.attn_out(a.blocks()[b]) if kind == "attn" else a.mlp_out(a.blocks()[b])
                proj.weight.zero_()
                if getattr(proj, "bias", None) is not None:
                    proj.bias.zero_()
        return math.exp(mean_nll_full(m, data))

    res = subblock(model, data, K, progress=False)
    removed = []
    for r in range(K):
        cands = [(k, i) for i in range(L) for k in ("attn", "mlp") if (k, i) not in removed]
        table = {c: ppl(removed + [c]) for c in cands}
        for (k, i), p in table.items():
            assert res.candidate_ppl[r][f"{k}:{i}"] == pytest.approx(p, rel=1e-10)
        removed.append(min(cands, key=lambda c: table[c]))
    assert res.plan == removed
    assert res.to_dict()["plan"] == [{"kind": k, "block": b} for k, b in removed]


def test_search_errors():
    model = make_tiny("llama", num_layers=4, seed=5)
    data = [random_batch(1, 6, seed=24)]
    with pytest.raises(PlanError, match="protects all"):
        iterative(model, data, 1, protect=(2, 2), progress=False)
    with pytest.raises(PlanError, match="protects all"):
        subblock(model, data, 1, protect=(3, 1), progress=False)
    with pytest.raises(PlanError, match="choose 1..2"):
        iterative(model, data, 3, protect=(1, 1), progress=False)
    with pytest.raises(PlanError, match="choose 1..3"):
        iterative(model, data, 4, progress=False)  # never the whole model
    with pytest.raises(PlanError):
        iterative(model, data, 0, progress=False)
    with pytest.raises(PlanError):
        subblock(model, data, 3, protect=(3, 0), progress=False)
    with pytest.raises(PlanError):
        iterative(model, data, 1, protect=(-1, 0), progress=False)
    with pytest.raises(EmptyLoaderError):
        iterative(model, [], 1, progress=False)
    with pytest.raises(EmptyLoaderError):
        subblock(model, iter(()), 1, progress=False)


def test_result_json_and_cli_parser(tmp_path):
    model = make_tiny("gpt2", num_layers=3, seed=6)
    res = subblock(model, _data(), 2, progress=False)
    path = tmp_path / "plan.json"
    res.save(path)
    d = json.loads(path.read_text())
    assert d["method"] == "subblock" and d["num_layers"] == 3 and len(d["ppl_after_each_step"]) == 2
    assert [tuple(x) for x in d["order"]] == res.plan and not list(tmp_path.glob(".*tmp"))
    # greedy PPL never goes below the best candidate of its round
    assert d["ppl_after_each_step"][0] == min(d["candidate_ppl"][0].values())
    from shortllm.scoring.search import to_plan

    plan = to_plan(res, model)
    assert plan.removed_branches == sorted(res.plan) or set(plan.removed) == {b for _, b in res.plan}
    assert plan.scores_meta["search"]["order"] == d["order"]


@pytest.mark.real_model
def test_search_cli_real_model(smollm2, data_dir, tmp_path):
    """End to end on SmolLM2 (tiny calibration set): the CLI handler writes a plan whose first removal is the
    argmin of score_fast's ppl metric on the same data."""
    from shortllm.cli.app import main
    from shortllm.data.calibration import calibration_loader
    from shortllm.scoring.engine import score_fast

    out = tmp_path / "plan.json"
    assert main(["search", "smollm2-135m", "--remove", "1", "--samples", "1", "--seq-len", "32",
                 "--protect-first", "1", "-q", "-o", str(out)]) == 0
    from shortllm.pruning.plans import Plan

    model, tok = smollm2
    plan = Plan.load(out, model)  # a plan `shortllm prune` accepts, for this very model
    d = plan.scores_meta["search"]
    assert plan.removed == d["order"] and plan.metric == "ppl-iterative"
    data = calibration_loader("wikitext2", tok, n_samples=1, seq_len=32)
    ppl = score_fast(model, data, metrics=("ppl",), progress=False).values["ppl"]
    assert d["order"] == [int(torch.argmin(ppl[1:])) + 1]
    assert d["ppl_after_each_step"][0] == pytest.approx(float(ppl[d["order"][0]]), rel=1e-5)


def test_search_then_prune_cli_chain(tmp_path):
    """`shortllm search DIR ... -o plan.json` then `shortllm prune DIR --plan plan.json -o out/` (the real CLI):
    the exported model equals pruning by the searched plan in Python."""
    from eval_helpers import make_bpe_tokenizer
    from transformers import AutoModelForCausalLM

    from shortllm.cli.app import main
    from shortllm.pruning.plans import Plan
    from shortllm.pruning.removal import prune

    model = make_tiny("llama", 5, seed=9)
    model.save_pretrained(tmp_path / "m")
    make_bpe_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 80)
    plan_path = tmp_path / "plan.json"
    assert main(["search", str(tmp_path / "m"), "--method", "subblock", "--remove", "2", "--data",
                 str(tmp_path / "calib.txt"), "--samples", "2", "--seq-len", "16", "-q", "-o", str(plan_path)]) == 0
    plan = Plan.load(plan_path, model)
    assert plan.mode == "search" and len(plan.removed_branches) + 2 * len(plan.removed) == 2
    assert main(["prune", str(tmp_path / "m"), "--plan", str(plan_path), "-o", str(tmp_path / "out")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ref = prune(model, plan)
    batch = random_batch(2, 8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, ref(**batch).logits, rtol=1e-5, atol=1e-5)
