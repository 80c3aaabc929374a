"""benchmarks/gpu_check.py in its CPU mode (what CI runs), its checks failing on wrong kernels, and the
multi-device code paths of the collectors checked without a GPU.

A second device is played by `meta`: tensors there have shapes but no values, so a kernel given tensors
on two devices, a number read back to the host (`.item()`, `float()`), or a copy out of it all raise.
Values computed on the CPU for a collector whose home device is `meta` land in its CPU-side copy, where
the test reads them and compares them with the independent oracles.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny, random_batch

from shortllm.model.adapters import get_adapter
from shortllm.model.hooks import block_io_hooks
from shortllm.model.replay import BlockCall
from shortllm.ops import _backend, cosine_stats_ref
from shortllm.scoring import collectors as collectors_mod
from shortllm.scoring.collectors import CosineCollector, DeviceSums, MagCollector, TaylorCollector
from shortllm.scoring.context import RunContext, batch_context
from shortllm.scoring.engine import batch_loss
from shortllm.scoring.ppl import HeadLoss, PPLCollector, removal_ppl_naive
from shortllm.testing.reference import taylor_reference

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
CPU, META = torch.device("cpu"), torch.device("meta")


def _script():
    sys.path.insert(0, str(SCRIPT.parent))  # its `_common` import
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- the script's CPU mode, end to end ------------------------------------------------------------

def test_cpu_mode_records_every_section(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_cpu_mode.json").read_text())
    assert not (tmp_path / "gpu.json").exists(), "a CPU run must never write the GPU results file"
    assert res["mode"] == "cpu" and res["correctness_ok"] is True and res["failed_sections"] == []
    assert {"date", "commit", "torch", "cpu"} <= set(res["stamp"]) and res["stamp"]["commit"] in res["stamp_line"]
    names = [s[0] for s in _script().SECTIONS]
    assert set(names) <= set(res["sections"]), "every section must be recorded"
    for name in names:
        sec = res["sections"][name]
        assert sec["status"] in ("pass", "skip", "measured"), (name, sec.get("status"), sec.get("reason"))
    for name in ("ops", "e2e_tiny"):  # the CPU-capable correctness checks ran, and all passed
        sec = res["sections"][name]
        assert sec["status"] == "pass" and sec["n_checks"] > 0 and sec["n_failed"] == 0, sec
    assert res["sections"]["ops"]["n_checks"] >= 50, "cpu and interpreted triton backends, every op"
    for name in ("device_map", "host_syncs"):  # GPU-only: skipped, saying why
        sec = res["sections"][name]
        assert sec["status"] == "skip" and "CUDA" in sec["reason"], sec
    assert any("cuda" in s and "CUDA device" in s for s in res["sections"]["ops"]["skipped_checks"])
    fsdp = res["sections"]["retrain_fsdp"]  # without CUDA: its harness, with accelerate's one-CPU launch
    assert fsdp["status"] == "pass" and fsdp["n_checks"] == 3, fsdp
    assert all("launched (NO)" in c["name"] and "max rel diff" in c["detail"] for c in fsdp["checks"]), fsdp
    for name in ("perf_ops_bandwidth", "perf_bi_angular", "perf_ppl", "perf_taylor", "perf_fused_decode"):
        assert res["sections"][name]["status"] == "measured", res["sections"][name]
    assert res["sections"]["perf_ppl"]["scores_equal_rtol_1e-2"] is True
    assert set(res["targets"]) == set(_script().TARGETS)
    for t in res["targets"].values():  # ratios of a tiny CPU model are recorded, never judged
        assert t["value"] is not None and t["met"] is None, t
    md = (tmp_path / "gpu_cpu_mode.md").read_text()
    assert res["stamp_line"] in md and "## Skipped" in md and "device_map" in md


# ---- the checks fail when the code is wrong -------------------------------------------------------

@pytest.fixture
def cpu_impls(monkeypatch):
    if not _backend.available_backends()["cpu"]:
        pytest.skip("shortllm._cpu not built")
    impls = _backend._loaded["cpu"]
    return impls


def test_op_checks_fail_on_a_kernel_that_reads_padded_rows(cpu_impls, monkeypatch):
    gc = _script()
    good = cpu_impls["cosine_stats"]
    monkeypatch.setitem(cpu_impls, "cosine_stats", lambda x, y, mask, acc: good(x, y, None, acc))  # mask ignored
    with pytest.raises(AssertionError, match="count|non-finite"):
        gc.cosine_case(CPU, "cpu", 37, 129, torch.float32, "some", True, seed=1)
    gc.cosine_case(CPU, "cpu", 37, 129, torch.float32, "none", True, seed=1)  # still right without a mask
    checks = gc.Checks()
    checks.run("padded", gc.cosine_case, CPU, "cpu", 37, 129, torch.bfloat16, "some", True, 1, plant=True)
    assert checks.result()["status"] == "fail"


def test_op_checks_fail_on_a_slightly_wrong_reduction(cpu_impls, monkeypatch):
    gc = _script()
    good = cpu_impls["taylor_stats"]

    def off(w, g, acc):  # 0.1% too large on the Taylor terms
        good(w, None if g is None else g * 1.001, acc)
    monkeypatch.setitem(cpu_impls, "taylor_stats", off)
    with pytest.raises(AssertionError):
        gc.taylor_case(CPU, "cpu", (129, 577), torch.float32, seed=3)
    gc.taylor_case(CPU, "cpu", (129, 577), torch.float32, seed=3, with_g=False)  # magnitude untouched


def test_e2e_check_fails_when_a_score_is_off(cpu_impls, monkeypatch):
    gc = _script()
    tm = gc._tiny()
    data = gc._e2e_data(tm)
    (name, ok), = gc.e2e_arch(tm, "llama", CPU, ("cpu",), data)
    ok()
    good = cpu_impls["taylor_stats"]
    monkeypatch.setitem(cpu_impls, "taylor_stats", lambda w, g, acc: good(w, None if g is None else g * 1.01, acc))
    (_, bad), = gc.e2e_arch(tm, "llama", CPU, ("cpu",), data)
    with pytest.raises(AssertionError, match="taylor"):
        bad()


# ---- DeviceSums ------------------------------------------------------------------------------------

def test_retrain_launch_check_fails_when_the_launched_run_differs(monkeypatch):
    """The FSDP section's harness catches a launched run that trains differently (here: another LR)."""
    gc = _script()
    real = gc._retrain_cli

    def other_lr(launcher, args, out, env):
        return real(launcher, args + (["--lr", "1e-3"] if len(launcher) > 1 else []), out, env)

    monkeypatch.setattr(gc, "FSDP_METHODS", ("cpt",))
    monkeypatch.setattr(gc, "_retrain_cli", other_lr)
    ctx = {"gpu": False}
    res = gc.section_retrain_fsdp(ctx)
    assert res["status"] == "fail" and res["n_failed"] == 1, res
    assert "max rel diff" in res["failed"][0], res["failed"]


def test_device_sums_route_by_device_and_merge():
    main = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    s = DeviceSums(main)
    assert s.on(CPU) is main
    m = s.on(META)
    assert m.device == META and m.shape == main.shape and m.dtype == torch.float64 and s.on(META) is m
    # merge only moves each copy to the home device: a CPU tensor under a CUDA key checks the arithmetic
    s.copies = {torch.device("cuda", 7): torch.tensor([[0.5, 0.5, -1.0]], dtype=torch.float64)}
    assert s.merge() is main
    assert main.tolist() == [[1.5, 2.5, 2.0]]
    assert s.copies[torch.device("cuda", 7)].abs().sum() == 0, "a merged copy must be zeroed (else added twice)"
    s.merge()
    assert main.tolist() == [[1.5, 2.5, 2.0]]


# ---- CosineCollector: the ring and the accumulators across devices ---------------------------------

def _ctx(batch):
    return batch_context(0, batch, types.SimpleNamespace(config=types.SimpleNamespace()), CPU)


def _states(L, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 6, d, generator=g) for _ in range(L + 1)]


def _want(hs, start, n, valid):
    return cosine_stats_ref(hs[start].reshape(-1, hs[0].shape[-1]), hs[start + n].reshape(-1, hs[0].shape[-1]), valid)


def test_cosine_collector_moves_the_ring_to_the_output_device(monkeypatch):
    """Blocks 0-1 on the CPU, 2-3 on another device (meta): with device_map, a block's input is still on the
    previous block's device when the scorer sees it. Every reduction must get inputs, mask and accumulator
    on one device, and the CPU-side spans must be exact."""
    L, n_max = 4, 3
    ctx = _ctx(random_batch(2, 6, seed=3))
    hs = _states(L)
    calls = []

    def spying(real):
        def spy(x, y, mask, acc):
            xs = x if isinstance(x, (list, tuple)) else [x]  # the one-pass op takes every span's input at once
            devices = {t.device for t in xs} | {y.device, acc.device} | ({mask.device} if mask is not None else set())
            assert len(devices) == 1, f"a reduction got tensors on {devices}"
            calls.append(y.device.type)
            real(x, y, mask, acc)
        return spy
    for name in ("cosine_stats_", "cosine_span_stats_"):
        if hasattr(collectors_mod, name):
            monkeypatch.setattr(collectors_mod, name, spying(getattr(collectors_mod, name)))
    c = CosineCollector(L, n_max, "all", True, True, CPU)
    out_dev = [CPU, CPU, META, META]
    for j in range(L):
        h_in = hs[j].to(out_dev[j - 1]) if j > 0 else hs[0]
        c.on_block(j, h_in, hs[j + 1].to(out_dev[j]), ctx)
        assert calls and calls[-1] == out_dev[j].type, "each block's spans reduce on its output's device"
    assert META in c.sums.copies and len(c._masks) == 1, "the mask is copied once per device, not per span"
    for n, start in ((1, 0), (1, 1), (2, 0)):  # spans that end on the CPU: exact, in the home accumulator
        torch.testing.assert_close(c.acc[n - 1, start], _want(hs, start, n, ctx.valid), rtol=1e-12, atol=1e-12)
    assert c.acc[0, 2:].abs().sum() == 0 and c.acc[2, :].abs().sum() == 0, "spans ending on meta stay on meta"


def test_cosine_collector_sums_on_the_block_device_then_merges():
    """Home device meta, blocks on the CPU: every statistic lands in the CPU copy (no per-call copy to the
    home device), equal to the oracle; end_batch folds it home once and zeroes it."""
    L, n_max = 4, 3
    ctx = _ctx(random_batch(2, 6, seed=4))
    hs = _states(L, seed=1)
    c = CosineCollector(L, n_max, "all", True, True, META)
    for j in range(L):
        c.on_block(j, hs[j], hs[j + 1], ctx)
    local = c.sums.copies[CPU]
    for n in range(1, n_max + 1):
        for start in range(L - n + 1):
            torch.testing.assert_close(local[n - 1, start], _want(hs, start, n, ctx.valid), rtol=1e-12, atol=1e-12)
    c.end_batch(ctx)
    assert local.abs().sum() == 0 and c.acc.device == META and not c.ring


def test_cosine_hot_path_never_syncs_with_the_host():
    """On meta any host read raises: the per-block path (ring, masks, spans, separate BI) must have none."""
    L = 5
    ctx = _ctx(random_batch(2, 6, seed=5))
    hs = [h.to(META) for h in _states(L, seed=2)]
    c = CosineCollector(L, 3, "last", True, True, META)  # last-token angular + separate all-token BI
    for j in range(L):
        c.on_block(j, hs[j], hs[j + 1], ctx)
    c.end_batch(ctx)


# ---- Mag, Taylor and PPL: reduced on the device of the weights / the head ------------------------

def test_mag_reduces_each_weight_where_it_lives(monkeypatch):
    """A block weight on the CPU (a CPU block, or an offloaded weight's CPU copy) is reduced there, into a
    CPU-side sum, not first copied whole to the accumulator's device."""
    model = make_tiny("llama", num_layers=2, seed=3)
    seen = []
    real = collectors_mod.taylor_stats_

    def spy(w, g, acc):
        seen.append((w.device, acc.device))
        real(w, g, acc)
    monkeypatch.setattr(collectors_mod, "taylor_stats_", spy)
    c = MagCollector(2, META)
    c.start(RunContext(model=model, adapter=get_adapter(model), device=META))
    assert seen and all(d == (CPU, CPU) for d in seen), seen
    assert c.acc.device == META



def test_taylor_gradients_reduce_on_the_weights_device():
    model = make_tiny("llama", num_layers=3, seed=2)
    adapter = get_adapter(model)
    batch = random_batch(2, 9, seed=6)
    c = TaylorCollector(3, "streaming", META, n_batches=1)
    c.start(RunContext(model=model, adapter=adapter, device=META))
    try:
        ctx = batch_context(0, batch, model, CPU)
        with torch.enable_grad():
            out = model.base_model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, use_cache=False)
            batch_loss(adapter, out[0], ctx).backward()
        got = c.sums.copies[CPU][:, 1].clone()
        c.end_batch(ctx)
        assert c.sums.copies[CPU].abs().sum() == 0
    finally:
        c.close()
    model.zero_grad(set_to_none=True)
    want = taylor_reference(model, [batch], mode="streaming")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_ppl_sums_on_the_head_device_and_matches_deletion():
    model = make_tiny("llama", num_layers=3, seed=4)
    adapter = get_adapter(model)
    batch = random_batch(3, 11, seed=7)
    c = PPLCollector(3, META)
    c.start(RunContext(model=model, adapter=adapter, device=META))
    ctx = batch_context(0, batch, model, CPU)
    c.begin_batch(ctx)
    n = c.loss.n_tokens
    with torch.no_grad(), block_io_hooks(adapter.blocks(), lambda i, a, b: c.on_block(i, a, b, ctx)):
        model.base_model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, use_cache=False)
    got = torch.exp(c.sums.copies[CPU] / n)
    c.end_batch(ctx)
    c.close()
    torch.testing.assert_close(got, removal_ppl_naive(model, [batch]), rtol=1e-5, atol=0)


def _to_meta(v):
    if isinstance(v, torch.Tensor):
        return v.to(META)
    if isinstance(v, tuple):
        return tuple(_to_meta(x) for x in v)
    if isinstance(v, list):
        return [_to_meta(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_meta(x) for k, x in v.items()}
    return v


@pytest.mark.parametrize("head", ["torch", "op"])  # "op" is the CUDA default: shortllm.ops.lm_head_nll
def test_ppl_replay_and_head_on_another_device_without_a_host_sync(head):
    """The batch (rows, targets) on the CPU, the blocks, final norm and head on another device (meta): the
    replays and the head must run there, with the rows moved across, and the per-block loss must stay a
    device tensor (a float() per block would be a host sync; on meta it raises)."""
    model = make_tiny("llama", num_layers=3, seed=1)
    adapter = get_adapter(model)
    c = PPLCollector(3, META, ppl_head=head)
    c.start(RunContext(model=model, adapter=adapter, device=META))
    ctx = batch_context(0, random_batch(2, 9, seed=8), model, CPU)
    c.begin_batch(ctx)  # captures the calls on the CPU
    model.to(META)
    c.calls = [BlockCall(_to_meta(k.args), _to_meta(k.kwargs), k.hidden_in_kwargs) for k in c.calls]
    h = torch.randn(2, 9, 64).to(META)
    for i in range(3):
        c.on_block(i, h, h, ctx)
    assert c.nll.device == META and not c.sums.copies
    # meta kernels do not check an index's device: that the rows were moved is checked directly
    assert {("rows", META), ("targets", META)} <= set(c.loss._moved)
    c.end_batch(ctx)
    c.close()


def test_head_loss_follows_the_head_device():
    model = make_tiny("llama", num_layers=2, seed=5)
    adapter = get_adapter(model)
    b = random_batch(2, 7, seed=9)
    loss = HeadLoss(adapter, b["input_ids"], b["attention_mask"])
    h = torch.randn(2, 7, 64)
    want = loss.nll_sum(h)
    assert math.isfinite(want) and loss.nll_sum_tensor(h).item() == pytest.approx(want, rel=1e-12)
    model.model.norm.to(META)
    model.lm_head.to(META)
    out = HeadLoss(get_adapter(model), b["input_ids"], b["attention_mask"]).nll_sum_tensor(h)
    assert out.device == META and out.shape == () and out.dtype == torch.float64
