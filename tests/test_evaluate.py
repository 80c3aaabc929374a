"""Perplexity, and zero-shot log-likelihoods through lm-eval, against full-logit float64 references."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import make_bpe_tokenizer, ref_task_scores
from tiny_models import make_tiny

from shortllm.errors import DataError
from shortllm.evaluation import corpus_ppl as ev


@pytest.fixture(scope="module")
def tok():
    return make_bpe_tokenizer()


def _text(seed: int, words: int = 700) -> str:
    rng = random.Random(seed)
    vocab = "the quick brown fox jumps over lazy dog good bad answer question surgeon roof tiles".split()
    return " ".join(rng.choice(vocab) for _ in range(words)) + "\n\n" + "Sarah was better. " * 5


def _ref_chunks(tok, text, seq_len, bos):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if bos == "once":
        ids = [tok.bos_token_id] + ids
    n = len(ids) // seq_len
    t = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    if bos == "every_chunk":
        t = torch.cat([torch.full((n, 1), tok.bos_token_id), t], 1)
    return t


def _ref_nll_sum(model, chunks):
    with torch.no_grad():
        logits = model(chunks).logits.double()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunks[:, 1:].reshape(-1),
                           reduction="sum").item()


@pytest.mark.parametrize("arch,bos", [("llama", "none"), ("llama", "once"), ("llama", "every_chunk"),
                                      ("gemma2", "every_chunk"), ("gpt2", "once"), ("opt", "none"), ("qwen2", "none")])
def test_ppl_matches_full_logit_cross_entropy(tok, arch, bos):
    model = make_tiny(arch, dtype=torch.float64, seed=3)
    text = _text(7)
    seq_len = 23  # odd; chunk count is not a multiple of batch_size -> a short last batch
    r = ev.perplexity(model, tok, text, seq_len=seq_len, bos=bos, batch_size=5, progress=False)
    chunks = _ref_chunks(tok, text, seq_len, bos)
    assert chunks.shape[0] % 5 != 0
    ref = _ref_nll_sum(model, chunks)
    assert r.n_tokens == chunks.shape[0] * (chunks.shape[1] - 1)
    assert r.nll_sum == pytest.approx(ref, rel=1e-6)
    assert r.ppl == pytest.approx(math.exp(ref / r.n_tokens), rel=1e-6)
    assert r.settings["bos"] == bos and r.settings["n_chunks"] == chunks.shape[0]


def test_softcap_is_applied(tok):
    """Gemma-2's final softcapping changes the loss; the evaluator must include it."""
    model = make_tiny("gemma2", dtype=torch.float64, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits large enough for tanh capping to matter
    text = _text(2, 300)
    r = ev.perplexity(model, tok, text, seq_len=16, progress=False)
    ref = _ref_nll_sum(model, _ref_chunks(tok, text, 16, "none"))
    model.config.final_logit_softcapping = None
    uncapped = _ref_nll_sum(model, _ref_chunks(tok, text, 16, "none"))
    assert r.nll_sum == pytest.approx(ref, rel=1e-6)
    assert abs(uncapped - ref) / ref > 1e-2


def test_chunk_arithmetic(tok):
    ids = list(range(5, 5 + 103))
    none = ev._chunks(ids, 10, "none", 1)
    once = ev._chunks(ids, 10, "once", 1)
    every = ev._chunks(ids, 10, "every_chunk", 1)
    assert none.shape == (10, 10) and none[0, 0] == 5 and none[-1, -1] == 5 + 99
    assert once.shape == (10, 10) and once[0, 0] == 1 and once[0, 1] == 5 and once[1, 0] == 5 + 9
    assert every.shape == (10, 11) and (every[:, 0] == 1).all() and every[1, 1] == 5 + 10
    assert ev._chunks(list(range(109)), 10, "once", 1).shape[0] == 11  # BOS counts towards the stream
    with pytest.raises(DataError, match="fewer than one chunk"):
        ev._chunks(ids[:9], 10, "none", 1)


def test_max_chunks_and_batch_size_do_not_change_sum(tok):
    model = make_tiny("llama", dtype=torch.float64, seed=5)
    text = _text(11)
    a = ev.perplexity(model, tok, text, seq_len=19, batch_size=1, max_chunks=7, progress=False)
    b = ev.perplexity(model, tok, text, seq_len=19, batch_size=4, max_chunks=7, progress=False)
    assert a.settings["n_chunks"] == 7 and a.n_tokens == 7 * 18
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-9)


def test_ppl_errors(tok):
    model = make_tiny("llama", seed=0)
    with pytest.raises(DataError, match="protocol"):
        ev.perplexity(model, tok, _text(1), protocol="nope", progress=False)
    with pytest.raises(DataError, match="bos"):
        ev.perplexity(model, tok, _text(1), bos="always", progress=False)
    with pytest.raises(DataError, match="neither a corpus name"):
        ev.perplexity(model, tok, "wikitxt2", progress=False)
    no_bos = make_bpe_tokenizer()
    no_bos.bos_token = None
    with pytest.raises(DataError, match="BOS"):
        ev.perplexity(model, no_bos, _text(1), bos="once", progress=False)


def test_named_corpus_protocols(tok, data_dir):
    """PTB: '\\n\\n'-joined for llm-pruner (LLM-Pruner/Shortened-LLaMA), ' '-joined for gptq."""
    from shortllm.data.corpora import corpus_rows
    model = make_tiny("llama", dtype=torch.float64, seed=2)
    rows = corpus_rows("ptb", "validation", data_dir)
    for proto, join in (("llm-pruner", "\n\n"), ("gptq", " ")):
        r = ev.perplexity(model, tok, "ptb", protocol=proto, seq_len=32, max_chunks=3, progress=False,
                          data_dir=data_dir)
        chunks = _ref_chunks(tok, join.join(rows[:40]), 32, "none")[:3]
        assert r.settings["split"] == "validation" and r.settings["protocol"] == proto
        assert r.nll_sum == pytest.approx(_ref_nll_sum(model, chunks), rel=1e-6)
    assert ev.perplexity(model, tok, "wikitext2", protocol="gptq", max_chunks=1, progress=False,
                         data_dir=data_dir).settings["seq_len"] == 2048


# ------------------------------------------------------------------ zero-shot through lm-eval
@pytest.mark.parametrize("arch", ["gemma2", "gpt_neox"])
def test_lm_eval_loglik_matches_plain_forward(tok, arch, data_dir):
    """`harness_eval` on architectures with their own quirks (Gemma-2's logit softcap, GPT-NeoX's partial
    rotary): lm-eval's per-choice log-likelihoods and acc equal a plain full-logit forward's."""
    from shortllm.data.tasks import load_task
    from shortllm.evaluation.harness import harness_eval

    model = make_tiny(arch, dtype=torch.float64, seed=4)
    res = harness_eval(model, tok, ["arc_easy", "winogrande"], limit=3, batch_size=2, data_dir=data_dir,
                      log_samples=True)
    for name in ("arc_easy", "winogrande"):
        items = load_task(name, data_dir, limit=3)
        ref = ref_task_scores(model, tok, items)
        samples = sorted(res.samples[name], key=lambda s: s["doc_id"])
        for s, ll in zip(samples, ref["lls"], strict=True):
            assert [r[0][0] for r in s["resps"]] == pytest.approx(ll, rel=1e-6, abs=1e-8), name
        assert res.tasks[name]["acc"] == pytest.approx(ref["acc"]), name


def test_cli_writes_json_and_markdown(tmp_path, monkeypatch, tok):
    """`shortllm eval` end to end on a tiny model (load_model patched): atomic JSON + Markdown table."""
    from shortllm.cli.app import main

    model = make_tiny("llama", seed=0)
    monkeypatch.setattr("shortllm.model.loading.load_model", lambda name, **kw: (model, tok))
    out = tmp_path / "res" / "eval.json"
    assert main(["eval", "tiny", "--ppl", "wikitext2", "--tasks", "piqa,openbookqa", "--limit", "3",
                 "--seq-len", "32", "--max-chunks", "2", "--bos", "none,every_chunk", "-o", str(out),
                 "--no-progress"]) == 0
    rep = json.loads(out.read_text())
    assert [p["settings"]["bos"] for p in rep["perplexity"]] == ["none", "every_chunk"]
    assert rep["harness"]["tasks"]["piqa"]["n"] == 3 and set(rep["harness"]["tasks"]) == {"piqa", "openbookqa"}
    md = out.with_suffix(".md").read_text()
    assert "| wikitext2 |" in md and "| piqa | 3 |" in md and "mean of 2 zero-shot" in md
    assert "BOS policy: tokenizer default: BOS not added" in md and "explicit: bos='none'" in md
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(DataError, match="Unknown task"):
        main(["--debug", "eval", "tiny", "--tasks", "piqa,nope", "--task-source", "local", "-o", str(out)])


# ------------------------------------------------------------------ real model
@pytest.mark.real_model
def test_real_model_ppl_matches_logits(smollm2, data_dir):
    model, tokz = smollm2
    r = ev.perplexity(model, tokz, "wikitext2", seq_len=128, bos="every_chunk", max_chunks=2, progress=False)
    chunks = _ref_chunks(tokz, ev.corpus_text("wikitext2", "llm-pruner", data_dir=data_dir)[0], 128, "every_chunk")[:2]
    assert r.n_tokens == 256
    assert r.nll_sum == pytest.approx(_ref_nll_sum(model, chunks), rel=1e-5)
    assert 5 < r.ppl < 200


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_zeroshot_smoke(smollm2, data_dir):
    """SmolLM2 through lm-eval on the first 4 items of two tasks: the plain forward's acc and lls."""
    from shortllm.data.tasks import load_task
    from shortllm.evaluation.harness import harness_eval

    model, tokz = smollm2
    res = harness_eval(model, tokz, ("arc_easy", "winogrande"), limit=4, data_dir=data_dir, log_samples=True)
    for name, t in res.tasks.items():
        ref = ref_task_scores(model, tokz, load_task(name, data_dir, limit=4))
        lls = [[r[0][0] for r in s["resps"]] for s in sorted(res.samples[name], key=lambda s: s["doc_id"])]
        assert t["n"] == 4 and t["acc"] == pytest.approx(ref["acc"]), name
        assert all(all(x < 0 for x in row) for row in lls), name
        for row, want in zip(lls, ref["lls"], strict=True):
            assert row == pytest.approx(want, rel=1e-4, abs=1e-3), name
    assert res.mean == pytest.approx((res.tasks["arc_easy"]["acc"] + res.tasks["winogrande"]["acc"]) / 2)
