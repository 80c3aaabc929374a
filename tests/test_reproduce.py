"""benchmarks/reproduce_paper.py on a tiny model: every cell of the design is computed and rendered,
the plans obey the criteria's rules, LoRA/CPT get equal token budgets, and a rerun skips finished cells."""
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
pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _knobs():
    from reproduce_paper import Knobs

    return Knobs(preset="test", calib_samples=2, calib_seq_len=32, calib_batch=2, eval_chunks=2, eval_seq_len=64,
                 zs_limit=2, retrain_steps=1, retrain_micro_batch=2, retrain_seq_len=32, retrain_eval_examples=2,
                 ratios=(0.12, 0.24), protect_plus=(2, 1))


def test_reproduce_every_cell_then_resume(tmp_path, data_dir):
    from _reproduce_report import write_report
    from reproduce_paper import cell_key, cell_list, run_experiment

    from shortllm.retrain.train_data import text_data

    tok = make_bpe_tokenizer()
    model = make_tiny("llama", num_layers=8, dtype=torch.float32)
    assert model.config.vocab_size >= len(tok), "the toy tokenizer's ids must fit the tiny model"
    rdata = text_data("the good answer is better than a bad answer. " * 300, tok, 32, 0.1, source="toy")
    knobs, out = _knobs(), tmp_path / "cells"
    logs: list[str] = []
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cells = run_experiment(model, tok, knobs, out, data_dir=data_dir, progress=False, retrain_data=rdata,
                           log=logs.append)
    keys = {cell_key(*c) for c in cell_list(knobs)}
    assert len(keys) == 1 + 5 * 2 * 3, "design: baseline + 5 criteria x 2 ratios x 3 recoveries"
    assert set(cells) == keys, f"missing cells: {keys - set(cells)}"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the source model was modified"

    base = cells["base"]
    assert base["removed"] == [] and base["params"] == base["params_before"]
    from eval_helpers import ref_task_scores

    from shortllm.data.tasks import load_task
    from shortllm.evaluation.corpus_ppl import perplexity
    from shortllm.evaluation.harness import REPORTED

    for name, z in base["zeroshot"].items():  # lm-eval's cell scores == a plain forward on the first items
        ref = ref_task_scores(model, tok, load_task(name, data_dir, limit=knobs.zs_limit))
        assert z["n"] == knobs.zs_limit and z["metric"] == REPORTED[name], name
        assert z["score"] == pytest.approx(ref[REPORTED[name]]) and z["acc"] == pytest.approx(ref["acc"]), name
    assert base["zs_mean"] == pytest.approx(sum(z["score"] for z in base["zeroshot"].values()) / 7)
    assert base["zs_engine"].startswith("lm-eval-harness")
    ppl = perplexity(model, tok, "ptb", seq_len=knobs.eval_seq_len, max_chunks=knobs.eval_chunks, progress=False)
    assert base["ppl_ptb"] == pytest.approx(ppl.ppl, rel=1e-9), "the cut eval text must give the full split's chunks"
    for k, c in cells.items():
        assert 1.0 < c["ppl_wikitext2"] < 1e6 and 1.0 < c["ppl_ptb"] < 1e6, (k, c["ppl_wikitext2"], c["ppl_ptb"])
        assert len(c["zeroshot"]) == 7 and 0.0 <= c["zs_mean"] <= 1.0, k
        if k != "base":
            assert c["params"] < base["params"] and c["removed"], k
    for r in knobs.ratios:
        for crit in ("taylor", "mag"):  # "+" variants: protected first 2 / last 1 blocks never removed
            rem = cells[cell_key(crit, r, "none")]["removed"]
            assert all(2 <= b < 8 - 1 for b in rem), (crit, rem)
        for crit in ("bi", "taylor", "mag", "ppl", "sleb"):  # recovery keeps the pruning plan
            plans = {tuple(cells[cell_key(crit, r, rec)]["removed"]) for rec in ("none", "lora", "cpt")}
            assert len(plans) == 1, (crit, r, plans)
            lo, cp = cells[cell_key(crit, r, "lora")]["retrain"], cells[cell_key(crit, r, "cpt")]["retrain"]
            assert lo["tokens_seen"] == cp["tokens_seen"] > 0, "LoRA and CPT must see the same token budget"
        assert len(cells[cell_key("bi", r, "none")]["removed"]) >= 1
    assert (len(cells[cell_key("ppl", 0.24, "none")]["removed"]) > len(cells[cell_key("ppl", 0.12, "none")]["removed"]))

    report = write_report(out, tmp_path / "reproduce.md", knobs, model_name="tiny-llama")
    md = report.read_text()
    assert "(not run)" not in md and "Cells finished: 31/31" in md
    assert (tmp_path / "reproduce_ppl.png").stat().st_size > 1000
    assert (tmp_path / "reproduce_profile.png").stat().st_size > 1000
    for tag in ("(a) 12%", "(a) 24%", "(b) BI", "(b) PPL", "(c) 24%"):
        assert tag in md, tag

    # resume: nothing is recomputed; a deleted cell (only) is
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    logs.clear()
    run_experiment(model, tok, knobs, out, data_dir=data_dir, progress=False, retrain_data=rdata, log=logs.append)
    assert logs == ["31 of 31 cells already done"], logs
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == mtimes
    (out / "cells" / "mag_r24_cpt.json").unlink()
    logs.clear()
    again = run_experiment(model, tok, knobs, out, data_dir=data_dir, progress=False, retrain_data=rdata,
                           log=logs.append)
    assert logs[0] == "30 of 31 cells already done" and len(logs) == 2 and logs[1].startswith("mag_r24_cpt:"), logs
    assert again["mag_r24_cpt"]["ppl_ptb"] == pytest.approx(cells["mag_r24_cpt"]["ppl_ptb"], rel=1e-6), \
        "a recomputed cell must reproduce its number (seeded)"
