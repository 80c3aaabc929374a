"""Task readers (lm-eval 0.4 prompts on the real files), and hand-built task files scored through lm-eval
(`harness_eval`) against a plain-forward oracle on the items `load_task` parses."""
from __future__ import annotations

import dataclasses
import gzip
import json

import pytest
import torch
from eval_helpers import make_bpe_tokenizer, make_unigram_gpt2, ref_task_scores
from tiny_models import make_tiny

from shortllm.data import tasks as T
from shortllm.errors import DataError


# ------------------------------------------------------------------ real files: lm-eval templates
def test_real_items_follow_lm_eval_templates(data_dir):
    first = {t: T.load_task(t, data_dir, limit=1)[0] for t in T.TASKS}
    b = first["boolq"]
    assert b.contexts[0].startswith("All biomass goes through") and not b.contexts[0].startswith("Passage:")
    assert b.contexts[0].endswith("gasoline.\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert b.continuations == (" no", " yes") and b.choices == ("no", "yes") and b.gold == 0
    p = first["piqa"]
    assert p.contexts == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",) * 2
    assert p.continuations[0].startswith(" Provide the guinea pig") and p.gold == 0
    w = first["winogrande"]
    assert w.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                          "Sarah was a much better surgeon than Maria so Maria")
    assert w.continuations == (" always got the easier cases.",) * 2 and w.gold == 1
    a = first["arc_easy"]
    assert a.contexts[0] == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                             "food webs?\nAnswer:")
    assert a.continuations[0] == " Sunlight is the source of energy for nearly all ecosystems." and a.gold == 0
    assert first["arc_challenge"].contexts[0].startswith("Question: An astronomer observes")
    assert first["arc_challenge"].contexts[0].endswith("?\nAnswer:") and first["arc_challenge"].gold == 2
    h = first["hellaswag"]
    assert h.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert h.continuations == (" is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
                               " is holding a rubik's cube.", " starts pulling up roofing on a roof.")
    assert h.choices[3] == "starts pulling up roofing on a roof." and h.gold == 3
    o = first["openbookqa"]
    assert o.contexts[0].startswith("A person wants to start saving money") and o.contexts[0].endswith("money is to")
    assert o.continuations[1] == " quit eating lunch out" and o.gold == 1


def test_full_counts_match_official_splits(data_dir):
    for name, spec in T.TASKS.items():
        items = T.load_task(name, data_dir)
        assert len(items) == spec.expected, name
        assert all(len(set(it.continuations)) == 1 for it in items) == (name == "winogrande")


def test_hellaswag_preprocess_and_capitalisation():
    assert T.hellaswag_preprocess(" How to x [title] Do it. [step] Now  go ") == "How to x. Do it. Now go"
    assert T._hellaswag_query("Clean and jerk: A lady walks. She grabs the pole. the lady") == \
        "Clean and jerk: A lady walks. She grabs the pole. The lady"
    assert T._hellaswag_query("Home: Wash the dish. dry it.") == "Home: Wash the dish. dry it."  # complete: untouched


def test_missing_files_and_bad_args(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="Missing data file"):
        T.load_task("piqa", tmp_path)
    with pytest.raises(DataError, match="Unknown task"):
        T.load_task("mmlu", tmp_path)
    monkeypatch.delenv("SHORTLLM_DATA", raising=False)
    with pytest.raises(DataError, match="SHORTLLM_DATA"):
        T.load_task("boolq")
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(DataError, match="labels"):
        T.load_task("piqa", tmp_path)


# ------------------------------------------------------------------ hand-built files through lm-eval
def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


# Item 1: "bad" (-5, 3 chars) vs five "good"s (-5, 24 chars): acc ties -> first choice (wrong),
# acc_norm picks the long one (right). Item 2 is right under both metrics.
MC = [{"query": "Question: which?", "choices": ["bad", "good good good good good"], "gold": 1},
      {"query": "Question: which?", "choices": ["bad thing", "good", "bad"], "gold": 1}]


@pytest.fixture
def hand_data(tmp_path):
    d = tmp_path
    _jsonl(d / "boolq/boolq.jsonl.gz", [{"query": "Passage: p\nQuestion: q?", "choices": ["no", "yes"], "gold": g}
                                        for g in (1, 0, 1)])
    _jsonl(d / "piqa/valid.jsonl", [{"goal": "g", "sol1": "good", "sol2": "bad"},
                                    {"goal": "g", "sol1": "bad x", "sol2": "good"}])
    (d / "piqa/valid-labels.lst").write_text("0\n0\n")
    _jsonl(d / "winogrande/winogrande.jsonl", [
        {"context_options": ["It was so good", "It was so bad"], "continuation": "went home.", "gold": 0},
        {"context_options": ["It was so good", "It was so bad"], "continuation": "went home.", "gold": 1}])
    _jsonl(d / "arc/arc_easy.jsonl", MC)
    _jsonl(d / "arc/arc_challenge.jsonl", MC)
    _jsonl(d / "openbookqa/openbook_qa.jsonl", [dict(m, query="which is") for m in MC])
    hs = []
    for m in MC:
        ends = (m["choices"] + ["bad bad", "bad bad bad"])[:4]
        hs += ["Label: a thing happens. the man", str(m["gold"])] + ends
    d.joinpath("hellaswag").mkdir()
    (d / "hellaswag/hellaswag_val_full.txt.gz").write_bytes(gzip.compress(("\n".join(hs) + "\n").encode()))
    return d


SEVEN = ("boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag", "openbookqa")


def test_hand_files_through_lm_eval_match_a_plain_forward(hand_data):
    """Each task file -> `load_task`'s items -> `harness_rows` -> lm-eval: lm-eval must score exactly the
    items' (context, continuation) pairs, with the plain forward's log-likelihoods, and report their
    acc / acc_norm (hand-built items with ties and length-normalised flips)."""
    from shortllm.evaluation.harness import REPORTED, harness_eval

    model, tok = make_tiny("llama", seed=3), make_bpe_tokenizer()
    res = harness_eval(model, tok, SEVEN, data_dir=hand_data, batch_size=4, log_samples=True)
    for name in SEVEN:
        items, t = T.load_task(name, hand_data), res.tasks[name]
        ref = ref_task_scores(model, tok, items)
        samples = sorted(res.samples[name], key=lambda s: s["doc_id"])
        for it, s, ll in zip(items, samples, ref["lls"], strict=True):
            assert [tuple(a) for a in s["arguments"]] == list(zip(it.contexts, it.continuations)), name
            # winogrande's partial scoring: its target is the shared continuation, its gold the doc_to_text index
            assert int(s["doc"]["gold"] if name == "winogrande" else s["target"]) == it.gold, name
            assert [r[0][0] for r in s["resps"]] == pytest.approx(ll, rel=1e-4, abs=1e-4), name
        assert t["n"] == len(items) and t["acc"] == pytest.approx(ref["acc"]), name
        if name not in ("boolq", "winogrande"):  # lm-eval reports acc only for those two
            assert t["acc_norm"] == pytest.approx(ref["acc_norm"]), name
        assert t["metric"] == REPORTED[name] and t["score"] == pytest.approx(ref[REPORTED[name]]), name
    assert res.mean == pytest.approx(sum(res.tasks[n]["score"] for n in SEVEN) / 7)
    lim = harness_eval(model, tok, ["boolq"], limit=1, data_dir=hand_data)
    assert lim.tasks["boolq"]["n"] == 1 and lim.settings["limit"] == 1


def test_load_task_parses_once_and_rereads_a_changed_file(hand_data, monkeypatch):
    calls = []
    spec = T.TASKS["piqa"]
    monkeypatch.setitem(T.TASKS, "piqa", dataclasses.replace(spec, reader=lambda p: calls.append(1) or spec.reader(p)))
    T._parsed.cache_clear()
    first = T.load_task("piqa", hand_data)
    assert T.load_task("piqa", hand_data, limit=1) == first[:1] and len(calls) == 1, "second load must hit the cache"
    first.pop()  # callers get their own list: mutating it must not reach the cache
    assert len(T.load_task("piqa", hand_data)) == 2
    _jsonl(hand_data / "piqa/valid.jsonl", [{"goal": "g", "sol1": "new", "sol2": "bad"}] * 2)
    again = T.load_task("piqa", hand_data)
    assert len(calls) == 2 and again[0].choices == ("new", "bad"), "a rewritten file must be parsed again"
    with pytest.raises(DataError, match="positive"):
        T.load_task("piqa", hand_data, limit=0)
    T._parsed.cache_clear()


def test_malformed_item():
    with pytest.raises(DataError, match="malformed"):
        T.MCItem(("c",), (" a", " b"), ("a", "b"), 0)


def test_unigram_model_prefers_the_likely_continuation(hand_data):
    """End to end with a real forward: a model that puts all its mass on ' good' answers 'good', with the
    log-likelihood known in closed form."""
    from shortllm.evaluation.harness import harness_eval

    tok = make_bpe_tokenizer()
    ctx = "Question: which?\nAnswer:"
    good = tok(ctx + " good")["input_ids"][len(tok(ctx)["input_ids"]):]
    logits = torch.full((128,), -8.0, dtype=torch.float64)
    logits[good] = 8.0
    model = make_unigram_gpt2(logits)
    res = harness_eval(model, tok, ["arc_easy", "piqa"], data_dir=hand_data, log_samples=True)
    arc = sorted(res.samples["arc_easy"], key=lambda s: s["doc_id"])
    lls = [r[0][0] for r in arc[1]["resps"]]  # "bad thing" / "good" / "bad"
    assert max(range(3), key=lls.__getitem__) == 1 and arc[1]["acc"] == 1.0 and arc[1]["acc_norm"] == 1.0
    piqa = sorted(res.samples["piqa"], key=lambda s: s["doc_id"])
    assert [s["acc"] for s in piqa] == [1.0, 0.0]  # the "good" solution each time; gold is 0 both times
    logp = logits.log_softmax(-1)
    assert lls[1] == pytest.approx(sum(logp[t].item() for t in good), rel=1e-9)
