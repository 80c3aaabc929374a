"""`shortllm eval` through lm-eval-harness: against lm-eval run directly, against the raw data files and
lm-eval's own task YAMLs, lm-eval item by item against a plain forward, MMLU and LAMBADA, and the BOS policy."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import make_bpe_tokenizer
from tiny_models import make_tiny

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval-harness (extra 'eval') is not installed")

from shortllm.errors import DataError  # noqa: E402
from shortllm.evaluation import corpus_ppl as ev  # noqa: E402
from shortllm.evaluation import harness as H  # noqa: E402

ZS_AND_LAMBADA = ["boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "hellaswag", "openbookqa",
                  "lambada_openai"]
LIMIT = 5


def bos_tokenizer():
    """The tests' BPE tokenizer made to add BOS to every text (as Gemma's and LLaMA's do)."""
    from tokenizers import processors

    tok = make_bpe_tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


def _direct_lm_eval(model, tok, tasks, task_dir, limit, num_fewshot=0):
    """lm-eval's own entry point on the YAMLs `write_local_tasks` wrote: the oracle of `shortllm eval`."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=tasks,
                                   task_manager=tm, limit=limit, num_fewshot=num_fewshot, log_samples=True,
                                   bootstrap_iters=0)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama", seed=0), make_bpe_tokenizer()


@pytest.fixture(scope="module")
def direct(tiny, data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    H.write_local_tasks(ZS_AND_LAMBADA, d, data_dir, LIMIT)
    return _direct_lm_eval(*tiny, ZS_AND_LAMBADA, d, LIMIT), d


def test_cli_equals_lm_eval_run_directly(tiny, direct, tmp_path, monkeypatch):
    from shortllm.cli.app import main

    model, tok = tiny
    monkeypatch.setattr("shortllm.model.loading.load_model", lambda name, **kw: (model, tok))
    out = tmp_path / "eval.json"
    assert main(["eval", "tiny", "--ppl", "none", "--tasks", ",".join(ZS_AND_LAMBADA), "--limit", str(LIMIT),
                 "-o", str(out), "--no-progress"]) == 0
    rep = json.loads(out.read_text())["harness"]
    raw = direct[0]["results"]
    for t in ZS_AND_LAMBADA:
        assert rep["tasks"][t]["n"] == LIMIT
        for m in ("acc", "acc_norm", "perplexity"):
            if f"{m},none" in raw[t]:
                assert rep["tasks"][t][m] == pytest.approx(raw[t][f"{m},none"], rel=1e-9), (t, m)
    seven = [rep["tasks"][t]["score"] for t in ZS_AND_LAMBADA[:7]]
    assert rep["mean"] == pytest.approx(sum(seven) / 7)
    assert rep["settings"]["bos"] == "tokenizer default: BOS not added" and rep["settings"]["local"] == ZS_AND_LAMBADA
    md = out.with_suffix(".md").read_text()
    assert "| lambada_openai | 5 |" in md and "BOS policy" in md and "mean of 7 zero-shot" in md


def _raw_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_requests_are_lm_eval_prompts_of_the_raw_files(direct, data_dir):
    """The (context, continuation) pairs lm-eval scored, rebuilt here from the raw files by hand."""
    samples = {t: sorted(s, key=lambda s: s["doc_id"]) for t, s in direct[0]["samples"].items()}
    arc = _raw_jsonl(data_dir / "arc" / "arc_easy.jsonl")[0]
    assert [tuple(a) for a in samples["arc_easy"][0]["arguments"]] == [
        (arc["query"] + "\nAnswer:", " " + c) for c in arc["choices"]]
    assert samples["arc_easy"][0]["target"] == arc["gold"]
    piqa = _raw_jsonl(data_dir / "piqa" / "valid.jsonl")[1]
    lab = (data_dir / "piqa" / "valid-labels.lst").read_text().split()[1]
    assert [tuple(a) for a in samples["piqa"][1]["arguments"]] == [
        (f"Question: {piqa['goal']}\nAnswer:", " " + piqa[k]) for k in ("sol1", "sol2")]
    assert samples["piqa"][1]["target"] == int(lab)
    wg = _raw_jsonl(data_dir / "winogrande" / "winogrande.jsonl")[0]
    assert [tuple(a) for a in samples["winogrande"][0]["arguments"]] == [
        (c, " " + wg["continuation"].strip()) for c in wg["context_options"]]
    lam = _raw_jsonl(data_dir / "lambada" / "lambada_openai.jsonl")[2]
    assert tuple(samples["lambada_openai"][2]["arguments"][0]) == (lam["context"], " " + lam["continuation"])
    import gzip
    bq = json.loads(gzip.open(data_dir / "boolq" / "boolq.jsonl.gz", "rt").readline())
    assert samples["boolq"][0]["arguments"][0][0] == bq["query"][len("Passage: "):] + "\nAnswer:"
    ob = _raw_jsonl(data_dir / "openbookqa" / "openbook_qa.jsonl")[0]
    assert [tuple(a) for a in samples["openbookqa"][0]["arguments"]] == [(ob["query"], " " + c) for c in ob["choices"]]


def _yaml_fields(path: Path) -> dict:
    import yaml

    class Loose(yaml.SafeLoader):
        pass

    Loose.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {loader.construct_scalar(node)}")
    return yaml.load(path.read_text(), Loader=Loose)


def test_templates_are_those_of_the_installed_lm_eval():
    """Our YAMLs copy lm-eval 0.4.13's prompts; this fails when a release changes them."""
    root = Path(lm_eval.__file__).parent / "tasks"
    files = {"arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml", "boolq": "super_glue/boolq/default.yaml",
             "hellaswag": "hellaswag/hellaswag.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
             "lambada_openai": "lambada/lambada_openai.yaml"}
    for name, rel in files.items():
        theirs, ours = _yaml_fields(root / rel), H._TEMPLATES[name]
        for k in ("doc_to_text", "doc_to_target", "doc_to_choice", "output_type"):
            if k in theirs:
                assert ours[k] == theirs[k], (name, k)
        assert {m["metric"] for m in ours["metric_list"]} == {m["metric"] for m in theirs["metric_list"]}, name
    mm = _yaml_fields(root / "mmlu/default/_default_template_yaml")
    for k in ("doc_to_text", "doc_to_choice", "doc_to_target", "fewshot_split", "fewshot_config", "output_type"):
        assert H._MMLU[k] == mm[k], k
    wg = (root / "winogrande" / "preprocess_winogrande.py").read_text()
    assert 'doc["sentence"][idx:].strip()' in wg and "[:idx] + opt" in wg  # what our row fields precompute
    # lm-eval's MMLU grouping and descriptions
    from shortllm.data.tasks import MMLU_CATEGORIES
    for subject, cat in MMLU_CATEGORIES.items():
        y = _yaml_fields(root / "mmlu" / "default" / f"mmlu_{subject}.yaml")
        assert y["tag"] == f"mmlu_{cat}_tasks" and y["description"] == H._mmlu_description(subject), subject
    assert len(list((root / "mmlu" / "default").glob("mmlu_*.yaml"))) == len(MMLU_CATEGORIES) == 57


@pytest.mark.parametrize("with_bos", [False, True])
def test_lm_eval_scores_equal_a_plain_forward_item_by_item(data_dir, tmp_path, with_bos):
    """On the real files (first 4 items of the 7 tasks), lm-eval's per-choice log-likelihoods, per-item
    acc / acc_norm and task metrics against a plain full-logit forward on `load_task`'s (context,
    continuation) pairs, with a tokenizer that adds BOS and one that does not (the BOS policy)."""
    from eval_helpers import ref_loglik

    from shortllm.data.tasks import load_task

    model, tok = make_tiny("llama", seed=1), (bos_tokenizer() if with_bos else make_bpe_tokenizer())
    seven = ZS_AND_LAMBADA[:7]
    H.write_local_tasks(seven, tmp_path, data_dir, 4)
    raw = _direct_lm_eval(model, tok, seven, tmp_path, 4)
    for t in seven:
        theirs = sorted(raw["samples"][t], key=lambda s: s["doc_id"])
        hits = []
        for it, s in zip(load_task(t, data_dir, limit=4), theirs, strict=True):
            ll = [ref_loglik(model, tok, c, k) for c, k in zip(it.contexts, it.continuations)]
            assert [r[0][0] for r in s["resps"]] == pytest.approx(ll, rel=1e-4, abs=1e-4), t
            pred = max(range(len(ll)), key=lambda i: (ll[i], -i))
            assert float(pred == it.gold) == s["acc"], t
            if "acc_norm" in s:
                norm = [x / len(ch) for x, ch in zip(ll, it.choices)]
                assert float(max(range(len(ll)), key=lambda i: (norm[i], -i)) == it.gold) == s["acc_norm"], t
            hits.append(float(pred == it.gold))
        assert raw["results"][t]["acc,none"] == pytest.approx(sum(hits) / len(hits)), t


@pytest.mark.slow
def test_mmlu_five_shot_through_cli(tmp_path, monkeypatch, data_dir):
    """`shortllm eval --tasks mmlu --num-fewshot 5 --limit 1`: 57 subjects, lm-eval's categories (size-weighted),
    prompts rebuilt from the raw CSVs, and two subjects checked against lm-eval run directly."""
    from shortllm.cli.app import main
    from shortllm.data.tasks import MMLU_CATEGORIES

    model, tok = make_tiny("llama", seed=2), make_bpe_tokenizer()
    monkeypatch.setattr("shortllm.model.loading.load_model", lambda name, **kw: (model, tok))
    out = tmp_path / "mmlu.json"
    assert main(["eval", "tiny", "--ppl", "none", "--tasks", "mmlu", "--num-fewshot", "5", "--limit", "1",
                 "-o", str(out), "--no-progress"]) == 0
    m = json.loads(out.read_text())["harness"]["tasks"]["mmlu"]
    assert len(m["subjects"]) == 57 and m["n"] == 57
    for cat in ("stem", "humanities", "social_sciences", "other"):
        subs = [v for k, v in m["subjects"].items() if MMLU_CATEGORIES[k] == cat]
        assert m["categories"][cat]["n"] == len(subs)
        assert m["categories"][cat]["acc"] == pytest.approx(sum(s["acc"] for s in subs) / len(subs))
    assert m["acc"] == pytest.approx(sum(s["acc"] for s in m["subjects"].values()) / 57)
    assert "| stem |" in out.with_suffix(".md").read_text()

    H.write_local_tasks(["mmlu"], tmp_path / "t", data_dir, 1)
    raw = _direct_lm_eval(model, tok, ["mmlu_anatomy", "mmlu_virology"], tmp_path / "t", 1, num_fewshot=5)
    for s in ("anatomy", "virology"):
        assert m["subjects"][s]["acc"] == raw["results"][f"mmlu_{s}"]["acc,none"]

    def rows(split):
        with open(data_dir / "mmlu" / split / f"anatomy_{split}.csv", newline="", encoding="utf-8") as f:
            return list(csv.reader(f))

    def fmt(r):
        return r[0].strip() + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", r[1:5])) + "\nAnswer:"

    ctx = ("The following are multiple choice questions (with answers) about anatomy.\n\n"
           + "".join(fmt(r) + f" {r[5]}\n\n" for r in rows("dev")) + fmt(rows("test")[0]))
    sample = raw["samples"]["mmlu_anatomy"][0]
    assert [tuple(a) for a in sample["arguments"]] == [(ctx, f" {L}") for L in "ABCD"]
    assert sample["target"] == "ABCD".index(rows("test")[0][5])


def test_harness_errors(tiny, data_dir, tmp_path, monkeypatch):
    from shortllm.cli.app import main

    model, tok = tiny
    with pytest.raises(DataError, match="no few-shot split"):
        H.harness_eval(model, tok, ["arc_easy"], num_fewshot=2, data_dir=data_dir)
    with pytest.raises(DataError, match="No local data"):
        H.harness_eval(model, tok, ["arc_esay"], source="local", data_dir=data_dir)
    with pytest.raises(DataError, match="nor in lm-eval"):
        H.harness_eval(model, tok, ["arc_esay"], data_dir=data_dir)
    with pytest.raises(DataError, match="Unknown MMLU subject"):
        from shortllm.data.tasks import mmlu_rows
        mmlu_rows("astrology", "test", data_dir)
    monkeypatch.setattr("shortllm.model.loading.load_model", lambda name, **kw: (model, tok))
    out = tmp_path / "e.json"
    assert main(["eval", "tiny", "--ppl", "none", "--tasks", "piqa", "--num-fewshot", "5", "-o", str(out)]) == 2
    assert main(["eval", "tiny", "--ppl", "none", "--tasks", "nope", "--task-source", "local", "-o", str(out)]) == 2
    assert not out.exists()


# ------------------------------------------------------------------ BOS policy
def _ref_nll(model, chunks):
    with torch.no_grad():
        logits = model(chunks).logits.double()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunks[:, 1:].reshape(-1),
                           reduction="sum").item()


def test_bos_policy_follows_the_tokenizer():
    plain, withbos = make_bpe_tokenizer(), bos_tokenizer()
    assert withbos("good answer")["input_ids"][0] == withbos.bos_token_id  # the helper does add BOS
    assert not ev.tokenizer_adds_bos(plain) and ev.tokenizer_adds_bos(withbos)
    assert ev.resolve_bos(plain)[0] == "none" and ev.resolve_bos(withbos)[0] == "every_chunk"
    for mode in ("none", "once"):
        with pytest.raises(DataError, match="adds BOS"):
            ev.resolve_bos(withbos, mode)
    assert ev.resolve_bos(plain, "every_chunk") == ("every_chunk",
                                                    "explicit: bos='every_chunk' (the tokenizer adds no BOS)")
    assert ev.resolve_bos(withbos, "every_chunk")[0] == "every_chunk"


def test_ppl_auto_bos_puts_bos_on_every_chunk_for_a_bos_tokenizer():
    model = make_tiny("llama", dtype=torch.float64, seed=3)
    text = "the quick brown fox jumps over the lazy dog good answer " * 30
    for tok, expect_bos in ((bos_tokenizer(), True), (make_bpe_tokenizer(), False)):
        r = ev.perplexity(model, tok, text, seq_len=16, progress=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        n = len(ids) // 16
        chunks = torch.tensor(ids[: n * 16]).view(n, 16)
        if expect_bos:
            chunks = torch.cat([torch.full((n, 1), tok.bos_token_id), chunks], 1)
        assert r.settings["bos"] == ("every_chunk" if expect_bos else "none")
        assert r.settings["bos_policy"].startswith("auto")
        assert r.nll_sum == pytest.approx(_ref_nll(model, chunks), rel=1e-6)
        assert r.n_tokens == chunks.shape[0] * (chunks.shape[1] - 1)


def test_cli_reports_bos_policy_and_refuses_a_misfit(tmp_path, monkeypatch):
    from shortllm.cli.app import main

    model, tok = make_tiny("llama", seed=0), bos_tokenizer()
    monkeypatch.setattr("shortllm.model.loading.load_model", lambda name, **kw: (model, tok))
    out = tmp_path / "e.json"
    assert main(["eval", "tiny", "--ppl", "wikitext2", "--tasks", "none", "--seq-len", "32", "--max-chunks", "2",
                 "-o", str(out), "--no-progress"]) == 0
    p = json.loads(out.read_text())["perplexity"][0]["settings"]
    assert p["bos"] == "every_chunk" and "adds BOS" in p["bos_policy"]
    assert "BOS policy: auto: the tokenizer adds BOS" in out.with_suffix(".md").read_text()
    out2 = tmp_path / "f.json"
    assert main(["eval", "tiny", "--ppl", "wikitext2", "--tasks", "none", "--bos", "once", "-o", str(out2)]) == 2
    assert not out2.exists()


@pytest.mark.real_model
def test_smollm2_policy_is_the_seed_protocol(smollm2):
    """SmolLM2's tokenizer adds no BOS: auto = the seed protocol (no BOS), as every earlier number."""
    _, tok = smollm2
    assert not ev.tokenizer_adds_bos(tok)
    assert ev.resolve_bos(tok)[0] == "none"


def test_local_rows_cover_the_full_splits(data_dir):
    """Every local file converts whole: the standard split sizes, MMLU's 14,042 test and 285 dev questions, and no
    WinoGrande target that lm-eval would read as a choice index (a digit-only string)."""
    from shortllm.data.tasks import MMLU_SUBJECTS, TASKS, harness_rows, mmlu_rows

    for name, spec in TASKS.items():
        assert len(harness_rows(name, data_dir)) == spec.expected, name
    assert not [r for r in harness_rows("winogrande", data_dir) if r["target"].isdigit()]
    assert len(harness_rows("lambada_openai", data_dir)) == 5153
    assert sum(len(mmlu_rows(s, "test", data_dir)) for s in MMLU_SUBJECTS) == 14042
    assert sum(len(mmlu_rows(s, "dev", data_dir)) for s in MMLU_SUBJECTS) == 285
