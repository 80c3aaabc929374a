"""benchmarks/criteria_experiment.py: its rank statistics against scipy, and a whole run on a tiny checkpoint
(every criterion planned at the ratio, healing, stability over corpora and seeds, the report), resumed from
its cache."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from eval_helpers import make_bpe_tokenizer
from tiny_models import make_tiny

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_kendall_tau_equals_scipy_tau_b_with_ties():
    stats = pytest.importorskip("scipy.stats")
    from criteria_experiment import kendall_tau

    rng = random.Random(0)
    for n in (2, 5, 18, 30):
        for _ in range(20):
            a = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]  # ties in a, b or both
            b = [rng.choice([1.0, rng.random()]) for _ in range(n)]
            want = stats.kendalltau(a, b, variant="b").statistic
            got = kendall_tau(a, b)
            assert (got != got and want != want) or got == pytest.approx(want, abs=1e-12), (a, b, got, want)


def test_jaccard():
    from criteria_experiment import jaccard

    assert jaccard([("block", 1), ("attn", 2)], [("block", 1), ("mlp", 2)]) == pytest.approx(1 / 3)
    assert jaccard([], []) == 1.0


@pytest.mark.slow
def test_run_on_a_tiny_checkpoint_and_resume(tmp_path, data_dir):
    from criteria_experiment import CRITERIA, Knobs, markdown, run

    from shortllm.pruning.sizes import count_params

    torch.set_num_threads(1)
    src = tmp_path / "tiny"
    model = make_tiny("llama", num_layers=10, dtype=torch.float32)  # Taylor+ protects 4 + 2
    model.save_pretrained(str(src))
    make_bpe_tokenizer().save_pretrained(str(src))
    knobs = Knobs(preset="test", calib_samples=2, calib_seq_len=32, calib_batch=2, stab_samples=2, stab_sleb=False,
                  eval_chunks=2, eval_seq_len=32, zs_limit=2, ratios=(0.3,))
    logs: list[str] = []
    res = run(str(src), knobs, tmp_path / "out", str(data_dir), logs.append)
    cells = res["cells"]
    total = count_params(model)
    bp = [count_params(b) for b in model.model.layers]
    for crit in CRITERIA:
        c = cells[f"{crit}_r30_none"]
        assert "ppl_wikitext2" in c and len(c["zeroshot"]) == 7 and 0 <= c["zs_mean"] <= 1, (crit, c)
        removed = sum(bp[i] for i in c["removed"]) / total
        if not c["removed_branches"]:  # whole blocks: the count closest to 30 % of all parameters
            best = min(range(1, 11), key=lambda k: abs(k * bp[0] / total - 0.3))
            assert len(c["removed"]) == best and c["removed_fraction"] == pytest.approx(removed), (crit, c)
        h = cells[f"{crit}_r30_heal"]
        assert h.get("removed") == c["removed"], "healing keeps the plan"
        assert "ppl_wikitext2" in h or h.get("note"), (crit, h)
    # the library's tail criterion removes the deepest blocks, the last one included
    tail = cells["tail_r30_none"]["removed"]
    assert tail == list(range(10 - len(tail), 10)), tail
    # SLEB's plan is the first blocks of its cached search order
    assert cells["sleb_r30_none"]["removed"] == sorted(res["sleb_order"][:len(cells["sleb_r30_none"]["removed"])])
    for a in res["tau"]:
        assert res["tau"][a][a] == pytest.approx(1.0) or res["tau"][a][a] != res["tau"][a][a]
    assert "tau_seeds_mean" in res["stability"]["bi"] and "tau_corpora_mean" in res["stability"]["taylor"]
    md = markdown(res)
    assert md.count("| unpruned |") == 1 and "What holds" in md and "--preset test" in md
    assert f"{cells['bi_r30_none']['ppl_wikitext2']:.2f}" in md
    # a rerun computes nothing: every cell, score pass and search comes from the cache
    logs.clear()
    again = run(str(src), knobs, tmp_path / "out", str(data_dir), logs.append)
    assert logs == [] and again["cells"] == cells, logs
