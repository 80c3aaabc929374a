"""benchmarks/recovery_experiment.py on a tiny model: every cell (criteria x ratio x none/lora/cpt/kd/partial)
is computed with one plan per criterion and equal token budgets, rendered, and a rerun skips finished cells."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from eval_helpers import make_bpe_tokenizer
from tiny_models import make_tiny

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

pytest.importorskip("peft")


@pytest.mark.slow
def test_recovery_cells_equal_budgets_and_resume(tmp_path, data_dir):
    from recovery_experiment import RECOVERIES, Knobs, markdown, run

    torch.set_num_threads(1)
    tok = make_bpe_tokenizer()
    model = make_tiny("llama", num_layers=6, dtype=torch.float32)
    knobs = Knobs(preset="test", calib_samples=2, calib_seq_len=32, eval_chunks=2, zs_limit=2, tokens=2 * 2 * 32,
                  micro_batch=2, seq_len=32, eval_examples=2, last_k=1, protect_plus=(1, 1), mmlu_shots=())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs: list[str] = []
    cells = run(model, tok, knobs, ["taylor", "tail"], [0.3], list(RECOVERIES), tmp_path, data_dir=data_dir,
                progress=False, log=logs.append)
    assert len(cells) == 1 + 2 * 5 and logs[0] == "0 of 11 cells already done"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the source model was modified"
    for crit in ("taylor", "tail"):
        group = [cells[f"{crit}_r30_{m}"] for m in RECOVERIES]
        assert len({tuple(c["removed"]) for c in group}) == 1, "recovery keeps the pruning plan"
        budgets = {(c["retrain"]["steps"], c["retrain"]["tokens_seen"]) for c in group if c["recovery"] != "none"}
        assert budgets == {(2, 2 * 2 * 32)}, budgets
        for c in group:
            assert 1 < c["ppl_wikitext2"] < 1e6 and len(c["zeroshot"]["tasks"]) == 7, c["key"]
    tail = cells["tail_r30_none"]["removed"]
    assert 5 not in tail and tail == list(range(5 - len(tail), 5)), "tail: the deepest blocks before the last"
    assert all(1 <= b < 5 for b in cells["taylor_r30_none"]["removed"]), "Taylor+ protects the first/last block"
    md = markdown(cells, knobs, "tiny", 1.0)
    assert md.count("\n| ") == 1 + 11 and "| kd |" in md and "| partial |" in md
    # the findings are computed from the cells: recount one of them here
    cpt_wins = sum(cells[f"{c}_r30_cpt"]["ppl_wikitext2"] < cells[f"{c}_r30_lora"]["ppl_wikitext2"]
                   for c in ("taylor", "tail"))
    md = markdown(cells, knobs, "tiny", 1.0, n_layers=6)
    assert f"(c) CPT vs LoRA at 30%: lower WikiText-2 PPL for {cpt_wins} of 2 criteria" in md, md
    logs.clear()
    run(model, tok, knobs, ["taylor", "tail"], [0.3], list(RECOVERIES), tmp_path, data_dir=data_dir,
        progress=False, log=logs.append)
    assert logs == ["11 of 11 cells already done"], logs


def test_mmlu_columns_and_ratio_of_blocks(data_dir):
    """MMLU at 0 and 5 shots through lm-eval (one question per subject) lands in the cell and the table; a
    5-shot column a cell did not run shows a dash; --ratio-of blocks plans a share of the blocks' parameters."""
    from recovery_experiment import Knobs, make_plans, markdown, mmlu_scores

    from shortllm.model.adapters import get_adapter
    from shortllm.pruning.sizes import count_params

    torch.set_num_threads(1)
    tok = make_bpe_tokenizer()
    model = make_tiny("llama", num_layers=6, dtype=torch.float32)
    knobs = Knobs(preset="test", mmlu_limit=1, mmlu_shots=(0, 5), mmlu_fewshot_recoveries=("none",))
    assert knobs.shots_for("none") == (0, 5) and knobs.shots_for("kd") == (0,)
    assert knobs.cell_knobs("kd")["mmlu_shots"] == [0]
    m = mmlu_scores(model, tok, knobs, (0, 5), data_dir)
    assert set(m) == {"0", "5"}
    for r in m.values():
        assert r["n"] == 57 and 0 <= r["acc"] <= 1 and set(r["categories"]) == {
            "stem", "humanities", "social_sciences", "other"}, r
    cell = {"key": "base", "criterion": "base", "recovery": "none", "ratio": None, "ppl_wikitext2": 9.0,
            "ppl_ptb": 9.0, "zeroshot": {"mean": 0.5}, "mmlu": {"0": m["0"]}}
    md = markdown({"base": cell}, knobs, "tiny", 1.0)
    assert f"| {100 * m['0']['acc']:.1f} | — |" in md, md

    blocks = get_adapter(model).blocks()
    bp = [count_params(b) for b in blocks]
    knobs = Knobs(preset="test", ratio_of="blocks")
    plans = make_plans(model, None, ["tail"], [0.5], knobs)
    removed = sum(bp[i] for i in plans[("tail", 0.5)].removed)
    assert removed == min((sum(bp[:k]) for k in range(len(bp))), key=lambda x: abs(x - 0.5 * sum(bp))), removed
    assert "ratio_of" not in Knobs(preset="test").cell_knobs("none"), "the default keeps old cells valid"


def test_mmlu_on_unrecovered_cells_only_keeps_retrained_cells_valid():
    """--mmlu-recoveries none: MMLU is added to the unpruned/unrecovered cells, and the retrained cells of a grid
    run without MMLU keep matching knobs (they are reused, not recomputed)."""
    from recovery_experiment import Knobs, main

    from shortllm.errors import UsageError

    k = Knobs(preset="test", mmlu_shots=(0, 5), mmlu_fewshot_recoveries=("none",), mmlu_recoveries=("none",))
    assert k.shots_for("none") == (0, 5) and k.shots_for("kd") == () and k.shots_for("lora") == ()
    old = Knobs(preset="test", mmlu_shots=())
    for rec in ("lora", "cpt", "kd", "partial"):
        assert k.cell_knobs(rec) == old.cell_knobs(rec), rec
    assert k.cell_knobs("none") != old.cell_knobs("none")
    with pytest.raises(UsageError, match="--mmlu-recoveries applies only with MMLU shots"):
        main(["--mmlu-shots", "", "--mmlu-recoveries", "none", "--quiet"])
    with pytest.raises(Exception, match="Unknown criteria/recoveries"):
        main(["--mmlu-recoveries", "nope", "--quiet"])
