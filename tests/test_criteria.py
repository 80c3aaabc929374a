"""Issue 15 criteria: sub-layer influence (bi_attn / bi_mlp), gate-gradient importance (gate), the reverse-order
baseline (tail), branch plans and non-adjacent selection. Oracles: shortllm.testing.reference (full hidden states,
branches removed by zeroing, real gates differentiated by autograd), never the scorer itself."""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from eval_helpers import make_bpe_tokenizer
from tiny_models import TINY_ARCHS, make_tiny, random_batch

from shortllm.cli.app import main
from shortllm.errors import MetricError, PlanError
from shortllm.model.adapters import get_adapter
from shortllm.model.replay import zeroed_branches
from shortllm.pruning.plans import Plan, make_plan
from shortllm.pruning.removal import prune
from shortllm.scoring.engine import score_fast
from shortllm.scoring.scores import Scores
from shortllm.testing.reference import gate_reference, sublayer_reference


def _data(seeds=(1, 2)):
    return [random_batch(3, 13, seed=s, pad=True) for s in seeds]


# ---- bi_attn / bi_mlp -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS + ("gpt_neox_sequential",))
def test_sublayer_equals_reference(arch):
    kw = {"use_parallel_residual": False} if arch == "gpt_neox_sequential" else {}
    model = make_tiny(arch.replace("_sequential", ""), 4, seed=3, dtype=torch.float64, **kw)
    data = _data()
    got = score_fast(model, data, metrics=("bi_attn", "bi_mlp"), progress=False)
    ref = sublayer_reference(model, data, parallel=bool(getattr(model.config, "use_parallel_residual", False)))
    for m in ("bi_attn", "bi_mlp"):
        torch.testing.assert_close(got.values[m], ref[m], rtol=1e-9, atol=1e-11, msg=f"{arch} {m}")
        assert torch.all(got.values[m] > 0), "a random branch always turns the stream"
    # the two branches are different quantities (a swapped or duplicated hook would make them equal)
    assert not torch.allclose(got.values["bi_attn"], got.values["bi_mlp"])


def test_sublayer_in_float32_with_bi_in_the_same_pass():
    model = make_tiny("gemma3_text", 4, seed=4)
    data = _data()
    got = score_fast(model, data, metrics=("bi", "bi_attn", "bi_mlp"), progress=False)
    ref = sublayer_reference(model.to(torch.float64), data)
    for m in ("bi_attn", "bi_mlp"):
        torch.testing.assert_close(got.values[m], ref[m], rtol=2e-4, atol=2e-6)


def test_sublayer_refuses_post_layer_norm_blocks():
    model = make_tiny("opt_post_ln", 3, seed=1)
    with pytest.raises(MetricError, match="normalises the stream"):
        score_fast(model, _data((1,)), metrics=("bi_attn",), progress=False)


# ---- gate -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gate_equals_autograd_derivative_of_a_real_gate(arch):
    model = make_tiny(arch, 4, seed=5, dtype=torch.float64)
    data = _data((3, 4))  # padded rows: only valid tokens count
    got = score_fast(model, data, metrics=("gate",), progress=False).values["gate"]
    ref = gate_reference(model, data)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    assert ref.abs().min() > 0


def test_gate_materialises_no_weight_gradient_and_restores_flags():
    model = make_tiny("llama", 3, seed=6, dtype=torch.float64)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a user's own flag survives
    seen = []  # during the pass: does any weight require grad (then backward would materialise its gradient)?
    handle = model.model.layers[2].register_forward_hook(
        lambda m, a, o: seen.append(any(p.requires_grad for p in model.parameters())))
    try:
        score_fast(model, _data((1,)), metrics=("gate",), progress=False)
        assert seen == [False]
        seen.clear()
        score_fast(model, _data((1,)), metrics=("gate", "taylor"), progress=False)
        assert seen == [True], "Taylor shares the pass and needs its weight gradients"
    finally:
        handle.remove()
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert model.model.layers[0].mlp.down_proj.weight.requires_grad


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gate_shares_the_pass_with_taylor_and_checkpointing(arch):
    model = make_tiny(arch, 4, seed=7, dtype=torch.float64)
    data = _data()
    alone = score_fast(model, data, metrics=("gate",), progress=False).values["gate"]
    both = score_fast(model, data, metrics=("gate", "taylor"), progress=False)
    taylor = score_fast(model, data, metrics=("taylor",), progress=False).values["taylor"]
    # with activation checkpointing the branch hooks fire again in backward's recomputation: no effect on bi_*
    ckpt = score_fast(model, data, metrics=("gate", "bi_attn", "bi_mlp"), gradient_checkpointing=True, progress=False)
    sub = score_fast(model, data, metrics=("bi_attn", "bi_mlp"), progress=False)
    torch.testing.assert_close(both.values["gate"], alone, rtol=1e-12, atol=0)
    torch.testing.assert_close(both.values["taylor"], taylor, rtol=1e-12, atol=0)
    torch.testing.assert_close(ckpt.values["gate"], alone, rtol=1e-10, atol=1e-14)
    for m in ("bi_attn", "bi_mlp"):
        torch.testing.assert_close(ckpt.values[m], sub.values[m], rtol=1e-12, atol=0)


def test_gate_ranks_a_harmful_block_last_removed_first():
    """A block whose update raises the loss has g > 0, so gate = -g < 0: it ranks first for removal."""
    model = make_tiny("llama", 4, seed=8, dtype=torch.float64)
    data = _data((5,))
    ref = gate_reference(model, data)
    got = score_fast(model, data, metrics=("gate",), progress=False)
    assert got.ranking("gate")[0] == int(torch.argmin(ref))


# ---- tail -----------------------------------------------------------------------------------------------------

def test_tail_scores_and_plans_drop_the_last_blocks():
    model = make_tiny("llama", 6, seed=9)
    s = score_fast(model, [], metrics=("tail",), progress=False)
    assert s.ranking("tail") == [5, 4, 3, 2, 1, 0]
    assert make_plan(s, "tail", model=model, remove=2).removed == [4, 5]
    assert make_plan(None, "tail", model=model, remove=2, protect=(0, 1)).removed == [3, 4]
    assert make_plan(None, "tail", model=model, remove=2, no_adjacent=True).removed == [3, 5]


# ---- branch plans ---------------------------------------------------------------------------------------------

def _scores(model, metric: str, values) -> Scores:
    return Scores({metric: torch.tensor(values, dtype=torch.float64)}, {"num_layers": len(values)})


def test_bi_attn_plan_removes_attention_branches_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny("llama", 5, seed=10)
    s = score_fast(model, _data(), metrics=("bi_attn", "bi_mlp"), progress=False)
    plan = make_plan(s, "bi_attn", model=model, remove=2)
    lowest = sorted(int(i) for i in torch.argsort(s.values["bi_attn"])[:2])
    assert plan.removed == [] and plan.removed_branches == [("attn", i) for i in lowest]
    attn_params = sum(p.numel() for i in lowest for p in model.model.layers[i].self_attn.parameters())
    assert plan.params_before - plan.params_after == attn_params
    mlp_plan = make_plan(s, "bi_mlp", model=model, ratio=0.1)
    assert mlp_plan.removed == [] and {k for k, _ in mlp_plan.removed_branches} == {"mlp"}
    assert abs(mlp_plan.removed_fraction - 0.1) < 0.1
    batch = random_batch(2, 9, seed=3)
    with torch.no_grad(), zeroed_branches(get_adapter(model), plan.removed_branches):
        expect = model(**batch, use_cache=False).logits
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).to_dict() == plan.to_dict()
    pruned = prune(model, plan, inplace=False)
    pruned.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        got = reloaded(**batch, use_cache=False).logits
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_branch_plan_errors():
    model = make_tiny("llama", 4, seed=11)
    s = _scores(model, "bi_attn", [0.3, 0.1, 0.2, 0.4])
    with pytest.raises(PlanError, match="only 4 of 4 blocks' attn branches"):
        make_plan(s, "bi_attn", model=model, remove=5)
    assert make_plan(s, "bi_attn", model=model, remove=4).removed_branches == [("attn", i) for i in range(4)]
    with pytest.raises(PlanError, match="only 3 of 4"):
        make_plan(s, "bi_attn", model=model, remove=4, protect=(1, 0))
    with pytest.raises(PlanError, match="ratio"):
        make_plan(s, "bi_attn", model=model, ratio=0.9)
    assert make_plan(s, "bi_attn", model=model, remove=2, no_adjacent=True).removed_branches == [("attn", 1),
                                                                                                  ("attn", 3)]


# ---- no_adjacent ----------------------------------------------------------------------------------------------

def test_no_adjacent_picks_in_ranking_order_and_looks_ahead():
    model = make_tiny("llama", 5, seed=12)
    # ranking 1, 3, 0, 2, 4: greedy would take 1 and 3 and then be stuck; three blocks only fit as 0, 2, 4
    s = _scores(model, "bi", [0.3, 0.1, 0.4, 0.2, 0.5])
    assert make_plan(s, "bi", model=model, remove=2, no_adjacent=True).removed == [1, 3]
    assert make_plan(s, "bi", model=model, remove=3, no_adjacent=True).removed == [0, 2, 4]
    assert make_plan(s, "bi", model=model, remove=2).removed == [1, 3]
    with pytest.raises(PlanError, match="at most 3"):
        make_plan(s, "bi", model=model, remove=4, no_adjacent=True)
    with pytest.raises(PlanError, match="at most 2"):
        make_plan(s, "bi", model=model, remove=3, no_adjacent=True, protect=(1, 0))
    with pytest.raises(PlanError, match="neighbours"):
        make_plan(None, model=model, blocks=[1, 2], no_adjacent=True)
    with pytest.raises(PlanError, match="span"):
        make_plan(s, "angular", model=model, remove=2, span=True, no_adjacent=True)
    plan = make_plan(s, "bi", model=model, ratio=0.3, no_adjacent=True)
    assert plan.no_adjacent and all(b - a > 1 for a, b in zip(plan.removed, plan.removed[1:]))
    assert Plan.from_dict(plan.to_dict()).no_adjacent


def test_no_adjacent_property_random_rankings():
    """For every ranking of 7 blocks and every feasible K: no neighbours, K blocks, the first pick is the
    best-ranked block that some feasible K-set contains (brute force over all K-subsets)."""
    model = make_tiny("llama", 7, seed=13)
    rng = random.Random(0)
    for _ in range(40):
        vals = [rng.random() for _ in range(7)]
        s = _scores(model, "bi", vals)
        order = s.ranking("bi")
        for k in range(1, 5):
            removed = make_plan(s, "bi", model=model, remove=k, no_adjacent=True).removed
            assert len(removed) == k and all(b - a > 1 for a, b in zip(removed, removed[1:]))
            feasible = [set(c) for c in itertools.combinations(range(7), k)
                        if all(b - a > 1 for a, b in zip(c, c[1:]))]
            best_first = next(i for i in order if any(i in c for c in feasible))
            assert best_first in removed


# ---- CLI ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("crit") / "tiny"
    make_tiny("llama", 6, seed=14).save_pretrained(d)
    make_bpe_tokenizer().save_pretrained(d)
    (d.parent / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 80)
    return d


def test_cli_score_new_metrics_and_prune_branches_no_adjacent(tiny_dir, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["score", str(tiny_dir), "--data", str(tiny_dir.parent / "calib.txt"), "--samples", "2",
                 "--seq-len", "16", "-q", "--metrics", "bi_attn,bi_mlp,tail,gate", "-o", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert set(raw["values"]) == {"bi_attn", "bi_mlp", "tail", "gate"}
    assert raw["values"]["tail"] == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert all(v > 0 for v in raw["values"]["bi_attn"])
    s = Scores.load(out)
    expect_attn = sorted(s.ranking("bi_attn")[:2])
    d1 = tmp_path / "attn"
    assert main(["prune", str(tiny_dir), "--scores", str(out), "--metric", "bi_attn", "--remove", "2",
                 "--plan-out", str(tmp_path / "p.json"), "-o", str(d1)]) == 0
    plan = Plan.load(tmp_path / "p.json")
    assert plan.removed_branches == [("attn", i) for i in expect_attn] and plan.removed == []
    assert json.loads((d1 / "config.json").read_text())["num_hidden_layers"] == 6
    d2 = tmp_path / "tail"
    assert main(["prune", str(tiny_dir), "--metric", "tail", "--remove", "2", "--no-adjacent",
                 "--plan-out", str(tmp_path / "t.json"), "-o", str(d2)]) == 0
    assert Plan.load(tmp_path / "t.json").removed == [3, 5]
    capsys.readouterr()
    assert main(["prune", str(tiny_dir), "--metric", "tail", "--remove", "4", "--no-adjacent",
                 "-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "no_adjacent" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
    assert main(["prune", str(tiny_dir), "--plan", str(tmp_path / "t.json"), "--no-adjacent",
                 "-o", str(tmp_path / "bad")]) == 2
    assert "--no-adjacent" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_sublayer_and_gate_on_moe_blocks(arch):
    """The MLP branch of an MoE block is the whole sparse-MoE layer (router + experts)."""
    import transformers as tf

    if arch == "mixtral":
        cfg = tf.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
                               max_position_embeddings=64)
        model = tf.MixtralForCausalLM(cfg)
    else:
        cfg = tf.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_experts=4,
                                num_experts_per_tok=2, head_dim=8, max_position_embeddings=64)
        model = tf.Qwen3MoeForCausalLM(cfg)
    model = model.eval()  # fp32: transformers' grouped expert matmul has no float64 kernel
    data = [random_batch(2, 9, seed=2)]
    got = score_fast(model, data, metrics=("bi_attn", "bi_mlp", "gate"), progress=False)
    ref = sublayer_reference(model, data)
    for m in ("bi_attn", "bi_mlp"):
        torch.testing.assert_close(got.values[m], ref[m], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.values["gate"], gate_reference(model, data), rtol=1e-4, atol=1e-6)


def test_out_of_core_scorer_refuses_the_new_metrics(tmp_path):
    from shortllm.scoring.offload import score_checkpoint

    with pytest.raises(MetricError, match="gate"):
        score_checkpoint(tmp_path, [random_batch()], metrics="bi,gate")


@pytest.mark.real_model
@pytest.mark.slow
def test_new_criteria_on_smollm2_equal_their_references(smollm2):
    """The built-in model (fp32): bi_attn / bi_mlp / gate from one score_fast pass against the references."""
    model, tok = smollm2
    ids = tok(["The capital of France is Paris, and the capital of Italy is Rome."], return_tensors="pt")
    data = [{"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}]
    got = score_fast(model, data, metrics=("bi_attn", "bi_mlp", "gate"), progress=False)
    ref = sublayer_reference(model, data)
    for m in ("bi_attn", "bi_mlp"):
        torch.testing.assert_close(got.values[m], ref[m], rtol=1e-3, atol=1e-5)
    gate = gate_reference(model, data)
    torch.testing.assert_close(got.values["gate"], gate, rtol=1e-3, atol=1e-4 * float(gate.abs().max()))
