"""score_fast (one streaming pass) against the anchors-style references of shortllm.reference."""
import math

import pytest
import torch
from tiny_models import TINY_ARCHS, make_tiny, random_batch

import shortllm
from shortllm.errors import EmptyLoaderError, MetricError, NonFiniteError, ScoresMismatchError, SequenceTooLongError
from shortllm.scoring.scores import Scores
from shortllm.testing.reference import score_reference

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
FULLY_FLOAT64 = ("gpt2", "opt", "gpt_neox")


def _batches(n=2, batch=3, seq=17):
    return [random_batch(batch=batch, seq=seq, seed=10 + s, pad=True) for s in range(n)]


def _assert_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan_g, nan_w = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_g, nan_w), f"{what}: NaN pattern differs\n{got}\n{want}"
    g, w = got[~nan_g].double(), want[~nan_w].double()
    err = ((g - w).abs() / w.abs().clamp_min(1e-12)).max().item() if g.numel() else 0.0
    assert err <= rel, f"{what}: max relative error {err:.3g} > {rel:g}\n{got}\n{want}"


def _float64_model(arch, num_layers=5):
    """float64 end to end: HF's eager attention softmax runs in float32 even for float64 models, which
    caps gradient agreement near 1e-8; SDPA stays in float64 (gemma2 needs eager for its softcapping)."""
    model = make_tiny(arch, num_layers=num_layers, dtype=torch.float64)
    if arch != "gemma2":
        model.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_score_fast_matches_reference_float64(arch):
    model = _float64_model(arch)
    data = _batches()
    got = shortllm.score_fast(model, data, n_max=3, progress=False)
    want = score_reference(model, data, n_max=3)
    for m in ("bi", "angular", "taylor", "mag"):
        # HF's RMSNorms compute in float32 even for float64 models, so gradients through them carry
        # float32 rounding and Taylor agrees to ~1e-8 only; LayerNorm architectures stay float64.
        tol = 1e-7 if (m == "taylor" and arch not in FULLY_FLOAT64) else TOL[torch.float64]
        _assert_close(got.values[m], want[m], tol, f"{arch}/{m}")
    assert got.meta["n_tokens"] == sum(int(b["attention_mask"].sum()) for b in data)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "opt"])
def test_score_fast_matches_reference_float32(arch):
    model = make_tiny(arch, num_layers=4, dtype=torch.float32)
    data = _batches()
    got = shortllm.score_fast(model, data, n_max=2, progress=False)
    want = score_reference(model, data, n_max=2)
    for m in ("bi", "angular", "mag"):
        _assert_close(got.values[m], want[m], TOL[torch.float32], f"{arch}/{m}")
    # Taylor sums signed products of gradients computed in a different order: looser, still tight
    _assert_close(got.values["taylor"], want["taylor"], 1e-4, f"{arch}/taylor")


@pytest.mark.parametrize("mode", ["exact", "streaming"])
def test_taylor_modes_differ_and_match_their_definitions(mode):
    model = _float64_model("gpt_neox", num_layers=4)
    data = _batches(n=3)
    got = shortllm.score_fast(model, data, metrics="taylor", taylor_mode=mode, progress=False)
    want = score_reference(model, data, metrics=("taylor",), taylor_mode=mode)
    _assert_close(got.values["taylor"], want["taylor"], 1e-9, f"taylor/{mode}")
    other = score_reference(model, data, metrics=("taylor",), taylor_mode="streaming" if mode == "exact" else "exact")
    assert not torch.allclose(got.values["taylor"], other["taylor"], rtol=1e-6), "exact and streaming should differ"


def test_taylor_bf16_upcasts_and_exact_accumulates_in_fp32():
    model = make_tiny("llama", num_layers=3, dtype=torch.bfloat16)
    data = _batches(n=2)
    got = shortllm.score_fast(model, data, metrics="taylor", progress=False)
    assert torch.isfinite(got.values["taylor"]).all() and (got.values["taylor"] > 0).all()
    ref = make_tiny("llama", num_layers=3, dtype=torch.float64)
    ref.load_state_dict({k: v.to(torch.float64) for k, v in model.state_dict().items()})
    want = score_reference(ref, data, metrics=("taylor",))["taylor"]
    _assert_close(got.values["taylor"], want, 0.1, "bf16 taylor vs float64")


def test_angular_last_token_mode_and_separate_bi():
    model = make_tiny("mistral", num_layers=5, dtype=torch.float64)
    data = _batches()
    got = shortllm.score_fast(model, data, metrics=("bi", "angular"), n_max=4, angular_tokens="last", progress=False)
    want = score_reference(model, data, metrics=("bi", "angular"), n_max=4, angular_tokens="last")
    _assert_close(got.values["angular"], want["angular"], 1e-9, "angular/last")
    _assert_close(got.values["bi"], want["bi"], 1e-9, "bi with angular=last")
    all_tok = shortllm.score_fast(model, data, metrics=("angular",), n_max=4, progress=False)
    assert not torch.allclose(all_tok.values["angular"][0], got.values["angular"][0])


def test_angular_matrix_layout():
    model = make_tiny("llama", num_layers=4, dtype=torch.float64)
    s = shortllm.score_fast(model, _batches(n=1), metrics=("angular",), n_max=3, progress=False)
    a = s.values["angular"]
    assert a.shape == (3, 4)
    for n in range(1, 4):
        for start in range(4):
            assert math.isnan(a[n - 1, start]) == (start + n > 4), (n, start)


def test_gradient_checkpointing_same_scores_and_hooks_fire_once():
    model = make_tiny("gemma", num_layers=4, dtype=torch.float64)
    data = _batches()
    a = shortllm.score_fast(model, data, progress=False)
    b = shortllm.score_fast(model, data, gradient_checkpointing=True, progress=False)
    for m in a.values:
        _assert_close(b.values[m], a.values[m], 1e-12, m)
    assert type(model.model.layers[0]).forward is not None and "forward" not in vars(model.model.layers[0])


def test_model_state_restored_even_on_error():
    model = make_tiny("llama", num_layers=3)
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    g = torch.ones_like(model.lm_head.weight)
    model.lm_head.weight.grad = g
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(*_):
        raise RuntimeError("boom")

    h = model.model.layers[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        shortllm.score_fast(model, _batches(n=1), progress=False)
    h.remove()
    assert model.training
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert model.lm_head.weight.grad is g
    assert model.model.layers[0].mlp.up_proj.weight.grad is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in model.model.layers)


@pytest.mark.parametrize("metrics", [("bi",), ("taylor",)])
def test_nan_names_block_and_batch(metrics):
    model = make_tiny("llama", num_layers=4)
    data = _batches(n=3)
    calls = {"n": 0}

    def poison(_m, _a, out):
        calls["n"] += 1
        if calls["n"] == 2:  # second batch
            return out * float("nan")
        return out

    model.model.layers[2].register_forward_hook(poison)
    with pytest.raises(NonFiniteError, match=r"block 2 .*batch 1"):
        shortllm.score_fast(model, data, metrics=metrics, progress=False)


def test_bad_inputs_are_typed():
    model = make_tiny("llama", num_layers=4)
    with pytest.raises(EmptyLoaderError, match="empty"):
        shortllm.score_fast(model, [], progress=False)
    with pytest.raises(EmptyLoaderError, match="no valid token"):
        shortllm.score_fast(model, [{"input_ids": torch.ones(2, 5, dtype=torch.long),
                                     "attention_mask": torch.zeros(2, 5, dtype=torch.long)}], progress=False)
    with pytest.raises(SequenceTooLongError, match="positions"):
        shortllm.score_fast(model, [random_batch(batch=1, seq=300, pad=False)], progress=False)
    with pytest.raises(MetricError, match="choose from"):
        shortllm.score_fast(model, _batches(n=1), metrics=("bi", "fisher"), progress=False)
    with pytest.raises(MetricError, match="n_max"):
        shortllm.score_fast(model, _batches(n=1), n_max=4, progress=False)
    with pytest.raises(MetricError, match="taylor_mode"):
        shortllm.score_fast(model, _batches(n=1), metrics="taylor", taylor_mode="fast", progress=False)


def test_mag_needs_no_data():
    model = make_tiny("phi3", num_layers=3)
    s = shortllm.score_fast(model, None, metrics="mag", progress=False)
    _assert_close(s.values["mag"], score_reference(model, [], metrics=("mag",))["mag"], 1e-6, "mag")


def test_scores_json_roundtrip_markdown_plot(tmp_path):
    model = make_tiny("qwen3", num_layers=4)
    s = shortllm.score_fast(model, _batches(n=1), n_max=2, progress=False)
    p = s.save(tmp_path / "scores.json")
    back = Scores.load(p, model=model)
    for m in s.values:
        _assert_close(back.values[m], s.values[m], 0.0, m)
    assert back.ranking("taylor") == s.ranking("taylor")
    md = s.to_markdown()
    assert md.startswith("| block |") and md.count("\n| ") == 4 and "Ranking" in md  # header + 4 rows
    png = s.plot(tmp_path / "scores.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = make_tiny("qwen3", num_layers=4, seed=5)
    with pytest.raises(ScoresMismatchError, match="different weights"):
        Scores.load(p, model=other)
    with pytest.raises(ScoresMismatchError, match="blocks"):
        Scores.load(p, model=make_tiny("qwen3", num_layers=3))
    assert not list(tmp_path.glob(".*tmp")), "temp files left behind"


def test_ranking_lower_first_nan_last_stable():
    s = Scores({"bi": torch.tensor([0.3, 0.1, float("nan"), 0.1])}, {"num_layers": 4})
    assert s.ranking("bi") == [1, 3, 0, 2]


@pytest.mark.real_model
def test_real_model_matches_reference(smollm2):
    model, tok = smollm2
    from shortllm.data.calibration import calibration_loader

    data = calibration_loader("wikitext2", tok, n_samples=2, seq_len=64, batch_size=2, seed=0)
    got = shortllm.score_fast(model, data, n_max=3, progress=False)
    want = score_reference(model, list(data), n_max=3)
    for m in ("bi", "angular", "mag"):
        _assert_close(got.values[m], want[m], 1e-5, f"smollm2/{m}")
    _assert_close(got.values["taylor"], want["taylor"], 1e-3, "smollm2/taylor")
    assert got.values["bi"].shape == (30,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metrics", [("bi", "angular"), ("taylor",), ("taylor", "mag")])
def test_nan_in_padded_rows_never_reaches_a_score(backend, dtype, metrics):
    """Padding rows may hold anything (eager attention in fp64 gives NaN for a fully masked query row): they
    are not tokens, so scores equal those of the same batch with finite padding rows, on every backend, and
    no NonFiniteError is raised. NaN is planted in the pad rows of the last block's output (only the final
    norm and the LM head read it, and the loss ignores those rows)."""
    model = make_tiny("llama", 4, seed=7).to(dtype)
    # SDPA keeps valid rows finite with left padding (eager fp64 turns the fully masked pad queries into NaN, which
    # then reach valid rows through 0 * NaN in the next block: a real non-finite model output, rightly refused)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    data = [{"input_ids": ids, "attention_mask": mask}]
    clean = shortllm.score_fast(model, data, metrics=metrics, n_max=2, progress=False)

    def poison(_mod, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.masked_fill((mask == 0)[..., None], float("nan"))
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = model.model.layers[-1].register_forward_hook(poison)
    try:
        got = shortllm.score_fast(model, data, metrics=metrics, n_max=2, progress=False)
    finally:
        handle.remove()
    for m in clean.values:
        a, b = got.values[m], clean.values[m]
        assert torch.equal(torch.isnan(a), torch.isnan(b)), m
        torch.testing.assert_close(a[~torch.isnan(a)], b[~torch.isnan(b)], rtol=1e-6, atol=1e-9, msg=m)


def test_batch_loss_runs_on_the_heads_device():
    """With device_map the LM head can live on another device than the last block: the loss inputs follow the
    head (`meta` plays the second device: the op's fake implementation checks devices without computing)."""
    from types import SimpleNamespace

    from shortllm.scoring.context import batch_context
    from shortllm.scoring.engine import batch_loss

    model = make_tiny("llama", 2, seed=1)
    batch = random_batch(2, 9, seed=3)
    ctx = batch_context(0, batch, model, torch.device("cpu"))
    w = torch.empty(model.config.vocab_size, model.config.hidden_size, device="meta")
    adapter = SimpleNamespace(head_params=lambda: {"weight": w, "bias": None, "softcap": 0.0, "scale": 1.0})
    loss = batch_loss(adapter, torch.randn(2, 9, model.config.hidden_size), ctx)
    assert loss.device.type == "meta" and loss.dim() == 0


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_taylor_and_mag_cover_experts_and_routers(arch):
    """Fused experts (3-D parameters named without 'weight') and routers count for Mag and Taylor; biases never.
    Oracle: Mag summed by hand over the block's non-bias parameters; Taylor from a plain autograd backward of
    the same loss."""
    import transformers as tf

    if arch == "mixtral":
        cfg = tf.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
                               max_position_embeddings=64)
        model = tf.MixtralForCausalLM(cfg)
    else:
        cfg = tf.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_experts=4,
                                num_experts_per_tok=2, head_dim=8, max_position_embeddings=64)
        model = tf.Qwen3MoeForCausalLM(cfg)
    torch.manual_seed(0)
    model = model.eval()  # fp32: transformers' grouped expert matmul has no float64 kernel
    blocks = model.model.layers
    names = [n for n, _ in blocks[0].named_parameters()]
    assert any("experts" in n and "weight" not in n for n in names), names  # fused experts exist
    data = [random_batch(2, 9, seed=2)]
    s = shortllm.score_fast(model, data, metrics=("taylor", "mag"), progress=False)
    mag = [sum(float(p.double().abs().sum()) for n, p in b.named_parameters() if "bias" not in n.split(".")[-1])
           for b in blocks]
    torch.testing.assert_close(s.values["mag"], torch.tensor(mag, dtype=torch.float64), rtol=1e-6, atol=0)
    # Taylor oracle: one batch, so sum |W * dL/dW| over the same parameters from a plain backward
    model.zero_grad(set_to_none=True)
    b = data[0]
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    logits = model(**b, use_cache=False).logits  # no router aux loss: output_router_logits is off
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    taylor = [sum(float((p.detach().double() * p.grad.double()).abs().sum()) for n, p in blk.named_parameters()
                  if "bias" not in n.split(".")[-1] and p.grad is not None) for blk in blocks]
    experts = [sum(float((p.detach().double() * p.grad.double()).abs().sum()) for n, p in blk.named_parameters()
                   if "experts" in n and "weight" not in n and p.grad is not None) for blk in blocks]
    model.zero_grad(set_to_none=True)
    # the fused experts carry a real share, so a scorer that skipped them could not pass the comparison below
    assert all(e > 1e-2 * t for e, t in zip(experts, taylor)), (experts, taylor)
    torch.testing.assert_close(s.values["taylor"], torch.tensor(taylor, dtype=torch.float64), rtol=1e-4, atol=1e-9)
