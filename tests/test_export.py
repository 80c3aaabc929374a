"""export(): every architecture loads back in a fresh process WITHOUT shortllm (plain
AutoModelForCausalLM.from_pretrained) with identical logits and cached == uncached greedy generation;
sharded indexes are complete; bad output dirs raise ExportError with nothing half written; mergekit."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import TINY_ARCHS, make_tiny, random_batch

from shortllm.errors import ExportError
from shortllm.model.adapters import get_adapter
from shortllm.pruning.exporting import export
from shortllm.pruning.mergekit import mergekit_yaml
from shortllm.pruning.plans import Plan, make_plan
from shortllm.pruning.removal import prune

CHILD = r"""
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
jobs = json.load(open(sys.argv[1]))
res = {}
for arch, d in jobs["dirs"].items():
    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    model.eval()
    ids = torch.tensor(jobs["ids"]); mask = torch.tensor(jobs["mask"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        p = ids[:1, :7]
        kw = dict(attention_mask=torch.ones_like(p), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                  pad_token_id=0)
        g1 = model.generate(p, use_cache=True, **kw)
        g0 = model.generate(p, use_cache=False, **kw)
    save_file({"logits": logits.contiguous()}, d + "/child_logits.safetensors")
    res[arch] = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                 "cached": g1.tolist(), "uncached": g0.tolist(), "num_layers": model.config.num_hidden_layers}
res["shortllm_imported"] = any(m == "shortllm" or m.startswith("shortllm.") for m in sys.modules)
json.dump(res, open(sys.argv[2], "w"))
"""


def _greedy(model, ids, cache):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, use_cache=cache, pad_token_id=0)


def _check_index(d: Path) -> None:
    """Independent of shortllm: every shard listed exists and the map is exactly what the shards hold."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    held, nbytes = {}, 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(d / shard), framework="pt") as f:
            for k in f.keys():
                held[k] = shard
                t = f.get_tensor(k)
                nbytes += t.numel() * t.element_size()
    assert held == index["weight_map"], "index does not match the shards"
    assert sorted(p.name for p in d.glob("model*.safetensors")) == sorted(set(held.values())), "stray shard files"
    assert index["metadata"]["total_size"] == nbytes


def test_export_every_arch_loads_without_shortllm(tmp_path):
    batch = random_batch(2, 10, seed=8)
    expect, dirs = {}, {}
    for arch in TINY_ARCHS:
        model = make_tiny(arch, 5, seed=21)
        plan = make_plan(None, model=model, blocks=[1, 2], branches=[("mlp", 0)])
        pruned = prune(model, plan)
        d = export(pruned, tmp_path / arch, max_shard_size="40KB")
        _check_index(d)
        meta = json.loads((d / "shortllm.json").read_text())
        assert Plan.from_dict(meta["plan"]).to_dict() == plan.to_dict()
        layers_key = pruned.config.__class__.attribute_map.get("num_hidden_layers", "num_hidden_layers")
        assert meta["config_changes"][layers_key][1] == 3
        with torch.no_grad():
            logits = pruned(**batch, use_cache=False).logits
        p = batch["input_ids"][:1, :7]
        expect[arch] = (logits, _greedy(pruned, p, True).tolist(), _greedy(pruned, p, False).tolist())
        dirs[arch] = str(d)
    (tmp_path / "jobs.json").write_text(json.dumps({"dirs": dirs, "ids": batch["input_ids"].tolist(),
                                                    "mask": batch["attention_mask"].tolist()}))
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "jobs.json"),
                           str(tmp_path / "res.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res.pop("shortllm_imported") is False
    for arch, (logits, cached, uncached) in expect.items():
        r = res[arch]
        assert r["missing"] == [] and r["unexpected"] == [], (arch, r["missing"], r["unexpected"])
        assert r["num_layers"] == 3
        child = load_file(str(Path(dirs[arch]) / "child_logits.safetensors"))["logits"]
        torch.testing.assert_close(child, logits, rtol=1e-5, atol=1e-5, msg=f"{arch}: reloaded logits differ")
        assert r["cached"] == r["uncached"] == cached == uncached, f"{arch}: generation differs"


def _tiny_pruned():
    model = make_tiny("llama", 4, seed=1)
    return prune(model, make_plan(None, model=model, blocks=[2]))


def test_existing_dir_refused_unless_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    pruned = _tiny_pruned()
    with pytest.raises(ExportError, match="overwrite=True"):
        export(pruned, out)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    export(pruned, out, overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "temp dirs left behind"


def test_unwritable_and_failing_exports_leave_nothing(tmp_path, monkeypatch):
    pruned = _tiny_pruned()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="writable"):
        export(pruned, blocker / "sub")
    with pytest.raises(ExportError, match="not a directory"):
        export(pruned, blocker, overwrite=True)

    def disk_full(self, path, **kw):
        Path(path, "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(pruned), "save_pretrained", disk_full)
    with pytest.raises(ExportError, match="No space left"):
        export(pruned, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"], "a partial checkpoint or temp dir was left behind"


def test_mergekit_yaml_ranges_are_0_based_end_exclusive():
    model = make_tiny("llama", 8)
    plan = make_plan(None, model=model, blocks=[0, 3, 4, 7], branches=[("attn", 5)])
    text = mergekit_yaml(plan, "src/model")
    import re

    ranges = [tuple(map(int, m)) for m in re.findall(r"layer_range: \[(\d+), (\d+)\]", text)]
    assert ranges == [(1, 3), (5, 6), (6, 7)]
    assert "merge_method: passthrough" in text and 'filter: "self_attn.o_proj"' in text
    covered = [i for a, b in ranges for i in range(a, b)]
    assert covered == plan.kept
    qwen = make_tiny("qwen2", 4)
    assert "WARNING" in mergekit_yaml(make_plan(None, model=qwen, blocks=[1]), "q")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox"])
def test_mergekit_filters_name_exactly_the_removed_branch_output_projection(arch):
    """Each filter (a substring match on tensor names, as mergekit applies it) hits exactly the weight (and bias)
    of that branch's output projection in the model's own parameter names, and nothing else in the block."""
    import re

    model = make_tiny(arch, 4)
    plan = make_plan(None, model=model, blocks=[0], branches=[("attn", 1), ("mlp", 2)])
    text = mergekit_yaml(plan, "src", config=model.config)
    filters = dict(zip(("attn", "mlp"), re.findall(r'filter: "([^"]+)"', text)))
    adapter = get_adapter(model)
    for kind, block in (("attn", 1), ("mlp", 2)):
        names = [n for n, _ in adapter.blocks()[block].named_parameters()]
        hit = sorted(n for n in names if filters[kind] in n)
        proj = adapter.attn_out if kind == "attn" else adapter.mlp_out
        want = sorted(f"{filters[kind]}.{leaf}" for leaf, _ in proj(adapter.blocks()[block]).named_parameters())
        assert hit == want and hit, (arch, kind, hit, want)


def test_mergekit_refuses_what_it_cannot_express():
    from shortllm.errors import PlanError
    from shortllm.pruning.mergekit import MergekitWarning
    from shortllm.pruning.plans import Plan

    opt = make_tiny("opt", 4)
    with pytest.raises(PlanError, match="no architecture definition for 'opt'"):
        mergekit_yaml(make_plan(None, model=opt, blocks=[1]), "o")
    unknown = Plan(num_layers=4, removed=[], removed_branches=[("attn", 1)], model_type="somearch")
    with pytest.raises(PlanError, match="somearch.*whole blocks only"):
        mergekit_yaml(unknown, "u")
    gpt2 = make_tiny("gpt2", 4)
    gpt2.config.scale_attn_by_inverse_layer_idx = True
    with pytest.warns(MergekitWarning, match="scale_attn_by_inverse_layer_idx"):
        text = mergekit_yaml(make_plan(None, model=gpt2, blocks=[1]), "g", config=gpt2.config)
    assert "# WARNING: GPT-2" in text
    gpt2.config.scale_attn_by_inverse_layer_idx = False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mergekit_yaml(make_plan(None, model=gpt2, blocks=[1]), "g", config=gpt2.config)
        mergekit_yaml(make_plan(None, model=gpt2, blocks=[3]), "g")  # nothing renumbered: no scale changes


def _mergekit_cmd():
    exe = os.environ.get("SHORTLLM_MERGEKIT")  # e.g. a throwaway venv's bin/mergekit-yaml
    if exe and Path(exe).exists():
        return [exe]
    try:
        import mergekit  # noqa: F401
    except ImportError:
        return None
    found = shutil.which("mergekit-yaml")
    return [found] if found else None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mergekit_output_equals_shortllm_export(tmp_path, arch):
    cmd = _mergekit_cmd()
    if cmd is None:
        pytest.skip("mergekit is not installed (pip install mergekit in a separate venv and set "
                    "SHORTLLM_MERGEKIT=/path/to/venv/bin/mergekit-yaml)")
    src = make_tiny(arch, 6, seed=4)
    src.save_pretrained(tmp_path / "src")
    plan = make_plan(None, model=src, blocks=[1, 3], branches=[("attn", 4), ("mlp", 0)])
    (tmp_path / "plan.yaml").write_text(mergekit_yaml(plan, str(tmp_path / "src"), dtype="float32", config=src.config))
    proc = subprocess.run(cmd + [str(tmp_path / "plan.yaml"), str(tmp_path / "mk"), "--no-copy-tokenizer"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = export(prune(src, plan), tmp_path / "ours")
    a = {k: v for f in (tmp_path / "mk").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    b = {k: v for f in ours.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_prune(tmp_path, capsys):
    from shortllm.cli.app import main
    from shortllm.scoring.engine import score_fast

    model = make_tiny("llama", 8, seed=5)
    model.save_pretrained(tmp_path / "m")
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    score_fast(model, [batch], metrics=("mag",), progress=False).save(tmp_path / "s.json")
    argv = ["prune", str(tmp_path / "m"), "--scores", str(tmp_path / "s.json"), "--metric", "mag", "--remove", "2",
            "-o", str(tmp_path / "out"), "--mergekit", str(tmp_path / "plan.yaml"),
            "--plan-out", str(tmp_path / "p.json")]
    assert main(argv) == 0
    plan = Plan.load(tmp_path / "p.json")
    assert len(plan.removed) == 2 and all(4 <= i < 6 for i in plan.removed)  # Mag+ protects (4, 2)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    assert "passthrough" in (tmp_path / "plan.yaml").read_text()
    capsys.readouterr()
    assert main(argv) == 2  # same output again: refused, exit code 2, one line
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("shortllm: error:") and "overwrite" in last
    assert main(argv[:-6] + ["-o", str(tmp_path / "o2"), "--remove", "3"]) == 2  # Mag+ on 8 blocks leaves 2
    assert not (tmp_path / "o2").exists()


@pytest.mark.real_model
def test_smollm2_prune_export_reload_generate(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shortllm.pruning.fusion import fuse
    from shortllm.scoring.engine import score_fast

    model, tok = smollm2
    ones = torch.ones(1, 4, dtype=torch.long)
    scores = score_fast(model, [{"input_ids": ones, "attention_mask": ones}], metrics=("mag",), progress=False)
    plan = make_plan(scores, "mag", model=model, ratio=0.2)
    assert 0.15 < plan.removed_fraction < 0.25 and all(4 <= i < 28 for i in plan.removed)
    pruned = prune(model, plan, inplace=False)
    out = export(pruned, tmp_path / "smol", tokenizer=tok, scores=scores)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    ids = tok2("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tok("The capital of France is", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, pruned(ids).logits, rtol=1e-5, atol=1e-4)
    g = _greedy(back, ids, True)
    assert g.tolist() == _greedy(back, ids, False).tolist() == _greedy(fuse(pruned), ids, True).tolist()
    meta = json.loads((out / "shortllm.json").read_text())
    assert meta["scores"]["meta"]["fingerprint"] == scores.meta["fingerprint"]


def test_cli_prune_from_plan_file(tmp_path):
    from shortllm.cli.app import main

    model = make_tiny("qwen3", 5, seed=6)
    model.save_pretrained(tmp_path / "m")
    make_plan(None, model=model, blocks=[3], branches=[("attn", 1), ("mlp", 0)]).save(tmp_path / "plan.json")
    assert main(["prune", str(tmp_path / "m"), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out"),
                 "--fused"]) == 0
    from shortllm.pruning.fusion import load_fused

    fused = load_fused(tmp_path / "out")
    assert fused.config.num_hidden_layers == 4 and sorted(fused.shortllm_dropped) == [("attn", 1), ("mlp", 0)]
    plan = make_plan(None, model=model, blocks=[3], branches=[("attn", 1), ("mlp", 0)])
    ref = prune(model, plan)
    batch = random_batch(2, 8, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, ref(**batch).logits, rtol=1e-5, atol=1e-5)
