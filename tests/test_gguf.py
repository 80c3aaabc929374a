"""GGUF in and out on tiny files: byte-for-byte pruning with per-layer metadata arrays (the bug class of
llama.cpp issue 27976), typed errors that leave nothing behind, Gemma-3's sliding-window constraint, and
export(format="gguf") read back by transformers' GGUF loader (the independent reader)."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from tiny_models import make_tiny

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader, GGUFValueType, GGUFWriter  # noqa: E402

from shortllm.cli.app import main  # noqa: E402
from shortllm.errors import ExportError, ModelLoadError, PlanError  # noqa: E402
from shortllm.io.gguf_files import best_expressible_blocks, layout_problem, prune_gguf  # noqa: E402
from shortllm.pruning.exporting import export  # noqa: E402
from shortllm.pruning.plans import Plan, make_plan  # noqa: E402
from shortllm.pruning.removal import prune  # noqa: E402

L = 4
PER_LAYER = {  # key -> (values, element type): one entry per block, several element types
    "llama.attention.head_count": ([4, 4, 2, 4], GGUFValueType.UINT32),
    "llama.feed_forward_length": ([64, 96, 128, 160], GGUFValueType.INT32),
    "llama.attention.sliding_window_pattern": ([True, False, True, True], GGUFValueType.BOOL),
    "llama.layer_scale": ([0.5, 1.5, 2.5, 3.5], GGUFValueType.FLOAT32),
    "llama.layer_types": (["a", "b", "c", "d"], GGUFValueType.STRING),
}


def _synthetic(path, block_count=L, blocks_with_tensors=L, arch="llama"):
    """A small GGUF with per-layer arrays, non-layer arrays, a tokenizer and mixed tensor types."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", block_count)
    w.add_uint32(f"{arch}.embedding_length", 64)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    for k, (vals, t) in PER_LAYER.items():
        w.add_key_value(k.replace("llama.", f"{arch}."), vals, GGUFValueType.ARRAY, sub_type=t)
    w.add_key_value(f"{arch}.rope.dimension_sections", [1, 2, 3], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    w.add_key_value("tokenizer.ggml.tokens", [f"t{i}" for i in range(L)], GGUFValueType.ARRAY,
                    sub_type=GGUFValueType.STRING)  # length == block_count, but not per layer: not under {arch}.
    w.add_string("general.name", "synthetic")
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 64)).astype(np.float16))
    for b in range(blocks_with_tensors):
        q = gguf.quants.quantize(rng.standard_normal((64, 64)).astype(np.float32) + b, Q.Q8_0)
        w.add_tensor(f"blk.{b}.attn_q.weight", q, raw_dtype=Q.Q8_0)
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.full(64, b, np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _fields(path) -> dict:
    r = GGUFReader(str(path))
    return {k: (f.contents(), [int(t) for t in f.types]) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _tensors(path) -> dict:
    return {t.name: (int(t.tensor_type), t.shape.tolist(), bytes(np.asarray(t.data).tobytes()))
            for t in GGUFReader(str(path)).tensors}


# --------------------------------------------------------------------------- byte-for-byte pruning
def test_prune_rewrites_every_per_layer_array_and_copies_bytes(tmp_path):
    """Regression for the bug class of llama.cpp issue 27976: block_count AND every per-layer array change."""
    src = _synthetic(tmp_path / "m.gguf")
    out = prune_gguf(src, tmp_path / "p.gguf", [1, 2], num_layers=L, model_type="llama",
                     extra_metadata={"shortllm.plan": "x"})
    before, after = _fields(src), _fields(out)
    assert after["llama.block_count"][0] == 2
    for k, (vals, _) in PER_LAYER.items():
        assert after[k][0] == [vals[0], vals[3]], k
        assert after[k][1] == before[k][1], f"{k}: element type must be kept"
    for k in before:  # everything else unchanged (values and types)
        if k != "llama.block_count" and k not in PER_LAYER:
            assert after[k] == before[k], k
    assert after["tokenizer.ggml.tokens"][0] == ["t0", "t1", "t2", "t3"]
    assert after["shortllm.plan"][0] == "x"
    tb, ta = _tensors(src), _tensors(out)
    assert set(ta) == {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight",
                       "blk.1.attn_q.weight", "blk.1.attn_norm.weight"}
    for new, old in ((0, 0), (1, 3)):
        for suffix in ("attn_q.weight", "attn_norm.weight"):
            assert ta[f"blk.{new}.{suffix}"] == tb[f"blk.{old}.{suffix}"], "bytes, type and shape must be copied"
    assert ta["blk.1.attn_q.weight"][0] == int(Q.Q8_0)
    assert ta["token_embd.weight"] == tb["token_embd.weight"]


@pytest.mark.parametrize("case", ["count", "arch", "missing_blocks", "branches", "out_of_range", "exists"])
def test_prune_errors_write_nothing(tmp_path, case):
    src = _synthetic(tmp_path / "m.gguf", blocks_with_tensors=3 if case == "missing_blocks" else L)
    dst = tmp_path / "p.gguf"
    kw = dict(num_layers=L, model_type="llama")
    err, match = PlanError, None
    if case == "count":
        kw["num_layers"], match = 6, "block_count = 4"
    elif case == "arch":
        kw["model_type"], match = "qwen2", "qwen2 model but .* is a llama GGUF"
    elif case == "missing_blocks":
        match = "missing \\[3\\]"
    elif case == "branches":
        kw["removed_branches"], match = [("attn", 2)], "only whole blocks"
    elif case == "out_of_range":
        kw["num_layers"] = L
        removed = [7]
        match = "out of range"
    elif case == "exists":
        dst.write_bytes(b"old")
        err, match = ExportError, "already exists"
    with pytest.raises(err, match=match):
        prune_gguf(src, dst, removed if case == "out_of_range" else [1], **kw)
    assert (dst.read_bytes() == b"old") if case == "exists" else not dst.exists()
    assert not list(tmp_path.glob(".p.*")), "no temp file left behind"


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        prune_gguf(bad, tmp_path / "o.gguf", [0], num_layers=L)
    with pytest.raises(ModelLoadError, match="No GGUF file"):
        prune_gguf(tmp_path / "missing.gguf", tmp_path / "o.gguf", [0], num_layers=L)


# --------------------------------------------------------------------------- Gemma-3 sliding-window layout
def _llama_cpp_sliding(n):  # llama.cpp set_swa_pattern(6): layer i slides unless i % 6 == 5
    return [i % 6 != 5 for i in range(n)]


def test_gemma3_layout_constraint_against_brute_force():
    L18 = 18
    assert layout_problem("gemma3", L18, [12, 13, 14, 15, 16, 17]) is None
    assert layout_problem("gemma3", L18, [0, 1, 2, 3, 4, 5]) is None  # a whole period
    msg = layout_problem("gemma3", L18, [16])
    assert msg and "fixed period of 6" in msg and "global" in msg
    assert layout_problem("llama", 30, [3]) is None
    rng = np.random.default_rng(1)
    values = rng.random(L18).tolist()
    for k, allowed in ((4, range(18)), (6, range(2, 17)), (3, range(18))):
        best, best_cost = None, float("inf")
        for combo in itertools.combinations(allowed, k):
            kept = [i for i in range(L18) if i not in combo]
            ok = [_llama_cpp_sliding(L18)[i] for i in kept] == _llama_cpp_sliding(len(kept))
            cost = sum(values[i] for i in combo)
            if ok and cost < best_cost - 1e-12:
                best, best_cost = list(combo), cost
        got = best_expressible_blocks(values, "gemma3", k, allowed=allowed)
        assert got == best, (k, got, best)
    with pytest.raises(PlanError, match="keeps gemma3's sliding-window period"):
        best_expressible_blocks(values, "gemma3", 3, allowed=[0, 1, 2])


def test_gemma3_gguf_refuses_a_plan_it_cannot_express(tmp_path):
    model = _tiny("gemma3_text", n=8)
    plan = make_plan(None, model=model, blocks=[2])  # block 5 (global) would run at position 4 (sliding)
    prune(model, plan)
    with pytest.raises(PlanError, match="fixed period of 6"):
        export(model, tmp_path / "g.gguf", format="gguf", quant="f32")
    assert not (tmp_path / "g.gguf").exists()


# --------------------------------------------------------------------------- export(format="gguf")
def _reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _ids():
    return torch.randint(3, 128, (2, 21), generator=torch.Generator().manual_seed(3))


TOL = {"f32": (1e-5, 1e-5), "f16": (2e-3, 2e-3), "bf16": (2e-2, 2e-2), "q8_0": (1e-2, 1e-2)}
TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}


def _tiny(model_type, n=6):
    if model_type == "gemma3_text":
        # head_dim = query_pre_attn_scalar = 256 as in Gemma-3-270M: llama.cpp scales by 1/sqrt(head_dim) and
        # transformers' GGUF loader assumes the config default 256, so only then do both readers agree
        return make_tiny(model_type, num_layers=n, sliding_window_pattern=6, final_logit_softcapping=None, seed=1,
                         head_dim=256, query_pre_attn_scalar=256, num_attention_heads=2, num_key_value_heads=1)
    return make_tiny(model_type, num_layers=n, seed=1)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_export_gguf_reloads_in_transformers(tmp_path, model_type, quant):
    gemma = model_type == "gemma3_text"
    model = _tiny(model_type, n=12 if gemma else 6)
    remove = [0, 1, 2, 3, 4, 5] if gemma else [1, 4]  # Gemma-3: a whole period of 6 keeps the layout
    plan = make_plan(None, model=model, blocks=remove)
    prune(model, plan)
    out = export(model, tmp_path / "m.gguf", format="gguf", quant=quant)
    r = GGUFReader(str(out))
    arch = "gemma3" if model_type == "gemma3_text" else "llama"
    assert r.get_field(f"{arch}.block_count").contents() == model.config.num_hidden_layers
    assert json.loads(r.get_field("shortllm.plan").contents())["removed"] == remove
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == TYPES[quant] and types["blk.0.attn_norm.weight"] == Q.F32
    back = _reload(out)
    assert back.config.num_hidden_layers == model.config.num_hidden_layers
    want_sd = model.state_dict()
    rtol, atol = TOL[quant]
    for k, v in back.state_dict().items():  # weights: undone permutation / norm offset, within the type's rounding
        torch.testing.assert_close(v, want_sd[k], rtol=rtol, atol=atol * float(want_sd[k].abs().max()), msg=k)
    with torch.no_grad():
        a, b = model(_ids()).logits, back(_ids()).logits
    if quant == "f32":
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    else:
        assert (a - b).abs().max() < 0.05 * a.abs().max(), float((a - b).abs().max())


def test_export_gguf_option_errors(tmp_path):
    model = _tiny("llama")
    with pytest.raises(ExportError, match="quant="):
        export(model, tmp_path / "m.gguf", format="gguf", quant="q4_0")
    with pytest.raises(ExportError, match="only apply to format='gguf'"):
        export(model, tmp_path / "d", quant="q8_0")
    with pytest.raises(ExportError, match="format="):
        export(model, tmp_path / "d", format="onnx")
    with pytest.raises(ExportError, match="fused=True does not apply"):
        export(model, tmp_path / "m.gguf", format="gguf", fused=True)
    from shortllm.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="GGUF export supports"):
        export(make_tiny("gpt2"), tmp_path / "g.gguf", format="gguf")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- CLI on a GGUF file
def test_cli_prune_gguf_file(tmp_path, capsys):
    model = _tiny("llama", n=5)
    src = export(model, tmp_path / "src.gguf", format="gguf", quant="q8_0")
    out = tmp_path / "out.gguf"
    assert main(["prune", str(src), "--blocks", "1,3", "-o", str(out), "--plan-out", str(tmp_path / "plan.json")]) == 0
    assert "byte for byte" in capsys.readouterr().out
    tb, ta = _tensors(src), _tensors(out)
    assert ta["blk.1.ffn_down.weight"] == tb["blk.2.ffn_down.weight"]
    assert ta["blk.2.attn_k.weight"] == tb["blk.4.attn_k.weight"] and "blk.3.attn_q.weight" not in ta
    assert Plan.load(tmp_path / "plan.json").removed == [1, 3]
    # the pruned GGUF equals prune(model loaded from the original GGUF), through transformers' loader
    orig = _reload(src)
    prune(orig, make_plan(None, model=orig, blocks=[1, 3]))
    with torch.no_grad():
        torch.testing.assert_close(_reload(out)(_ids()).logits, orig(_ids()).logits, rtol=1e-5, atol=1e-5)
    # --plan on the file; the same plan again is refused on the pruned file (block count differs)
    assert main(["prune", str(src), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "o2.gguf")]) == 0
    assert _tensors(tmp_path / "o2.gguf") == ta
    assert main(["prune", str(out), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "o3.gguf")]) == 2
    assert "block_count = 3" in capsys.readouterr().err and not (tmp_path / "o3.gguf").exists()
    # options that do not apply
    assert main(["prune", str(src), "--blocks", "1", "-o", str(tmp_path / "dir")]) == 2
    assert "-o NAME.gguf" in capsys.readouterr().err
    assert main(["prune", str(src), "--blocks", "1", "--fused", "-o", str(tmp_path / "x.gguf")]) == 2
    assert "--fused" in capsys.readouterr().err
    assert main(["prune", str(src), "--blocks", "1", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_models_lists_builtins(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTLLM_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert "smollm2-135m" in text and "gemma3-270m" in text and "gemma3" in text
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["gemma3-270m"]["blocks"] == 18 and rows["smollm2-135m"]["blocks"] == 30
    assert rows["gemma3-270m"]["cached"] is False, "an empty cache dir holds no converted model"


# --------------------------------------------------------------------------- exported tiny models in llama.cpp
V_CPP = 320  # room for SentencePiece's 256 byte tokens, which llama.cpp's vocabulary loader looks up


def _tokenizer_gguf(path, arch):
    """A GGUF holding only a minimal SentencePiece-style vocabulary (what llama.cpp needs to load a model)."""
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    toks += [f"\u2581w{i}" for i in range(V_CPP - len(toks))]
    types = [2, 3, 3] + [6] * 256 + [1] * (V_CPP - 259)
    w = GGUFWriter(str(path), arch)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_key_value("tokenizer.ggml.tokens", toks, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_key_value("tokenizer.ggml.scores", [0.0] * V_CPP, GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    w.add_key_value("tokenizer.ggml.token_type", types, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    for k, v in (("bos", 1), ("eos", 2), ("unknown", 0)):
        w.add_uint32(f"tokenizer.ggml.{k}_token_id", v)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_exported_tiny_gguf_in_llamacpp(tmp_path, model_type, quant):
    """llama.cpp's log-probabilities on an exported, pruned tiny model equal transformers' on the same weights
    (reloaded from the file): f32 to float tolerance, q8_0 within its activation quantization."""
    from shortllm.testing import llamacpp as LC

    if LC.available() is not None:
        pytest.skip(LC.available())
    gemma = model_type == "gemma3_text"
    model = _tiny(model_type, n=12 if gemma else 6) if not gemma else make_tiny(
        model_type, num_layers=12, sliding_window_pattern=6, final_logit_softcapping=None, seed=1, head_dim=256,
        query_pre_attn_scalar=256, num_attention_heads=2, num_key_value_heads=1, vocab_size=V_CPP)
    if not gemma:
        model = make_tiny(model_type, num_layers=6, seed=1, vocab_size=V_CPP)
    prune(model, make_plan(None, model=model, blocks=[0, 1, 2, 3, 4, 5] if gemma else [2]))
    arch = "gemma3" if gemma else "llama"
    out = export(model, tmp_path / "m.gguf", format="gguf", quant=quant,
                 tokenizer_from=_tokenizer_gguf(tmp_path / "tok.gguf", arch))
    back = _reload(out)
    # word tokens only: a lone byte token is incomplete UTF-8, which llama.cpp holds back with its log-prob
    ids = torch.randint(259, V_CPP, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        want = torch.log_softmax(back(torch.tensor([ids])).logits[0, :-1].double(), -1)
    want = want.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    with LC.LlamaCpp(out, n_ctx=64, threads=1) as lc:
        got = lc.sequence_logprobs(ids)
        assert None not in got, "word tokens are complete UTF-8: llama.cpp reports every log-prob"
        got = torch.tensor(got, dtype=torch.float64)
        assert len(lc.generate(ids[:4], 4)) > 0
    tol = 2e-3 if quant == "f32" else 5e-2
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


# --------------------------------------------------------------------------- choosing expressible plans
def test_make_gguf_plan_and_cli_flag(tmp_path, capsys):
    from tiny_models import random_batch

    from shortllm.pruning.gguf_plans import make_gguf_plan
    from shortllm.scoring.engine import score_fast

    model = _tiny("gemma3_text", n=12)
    data = [random_batch(batch=2, seq=9, seed=s, pad=False) for s in range(2)]
    scores = score_fast(model, data, metrics=("bi",), progress=False)
    values = scores.per_block("bi").tolist()
    plan = make_gguf_plan(scores, "bi", model=model, remove=3)
    assert len(plan.removed) == 3 and layout_problem("gemma3", 12, plan.removed) is None
    assert plan.removed == best_expressible_blocks(values, "gemma3", 3)
    greedy = make_plan(scores, "bi", model=model, remove=3)
    if layout_problem("gemma3", 12, greedy.removed) is None:
        assert plan.removed == greedy.removed, "an expressible greedy plan is kept as it is"
    else:
        assert plan.mode == "remove+gguf_expressible"
        assert sum(values[i] for i in plan.removed) >= sum(values[i] for i in greedy.removed)
    # a llama plan is never constrained
    llama = _tiny("llama")
    ls = score_fast(llama, data, metrics=("bi",), progress=False)
    assert make_gguf_plan(ls, "bi", model=llama, remove=2).removed == make_plan(ls, "bi", model=llama, remove=2).removed
    # CLI on a checkpoint dir: --gguf-expressible picks the same plan; it is refused where it cannot apply
    model.save_pretrained(tmp_path / "g")
    scores.save(tmp_path / "s.json")
    assert main(["prune", str(tmp_path / "g"), "--scores", str(tmp_path / "s.json"), "--metric", "bi", "--remove",
                 "3", "--gguf-expressible", "-o", str(tmp_path / "out"), "--plan-out", str(tmp_path / "p.json")]) == 0
    assert Plan.load(tmp_path / "p.json").removed == plan.removed
    capsys.readouterr()
    assert main(["prune", str(tmp_path / "g"), "--blocks", "2", "--gguf-expressible", "-o", str(tmp_path / "o2")]) == 2
    assert "--gguf-expressible" in capsys.readouterr().err
