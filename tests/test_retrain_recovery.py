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
                  micro_batch=2, seq_len=32, eval_examples=2, last_k=1, protect_plus=(1, 1))
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
    logs.clear()
    run(model, tok, knobs, ["taylor", "tail"], [0.3], list(RECOVERIES), tmp_path, data_dir=data_dir,
        progress=False, log=logs.append)
    assert logs == ["11 of 11 cells already done"], logs
