"""Per-expert REAP statistics of MoE blocks (shortllm.scoring.experts), collected in the scoring pass.

Oracle: a plain float64 recomputation from the model's weights — the MoE block's input (captured by a hook
in an ordinary forward), the router written out by hand per family (softmax / top-k / renormalisation, or
gpt-oss's top-k-then-softmax with router bias), each expert's MLP written out by hand from its fused 3-D
weights — never the module the collector re-runs.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from shortllm.cli.app import main
from shortllm.model.discovery import expert_modules
from shortllm.scoring.engine import score_fast
from shortllm.scoring.scores import Scores

VOCAB = 128
E, K = 4, 2


def tiny_moe(arch: str):
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, num_experts_per_tok=K, max_position_embeddings=64)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=48, num_local_experts=E, **common)
        cls = tf.MixtralForCausalLM
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=E, head_dim=8,
                                norm_topk_prob=False, **common)
        cls = tf.Qwen3MoeForCausalLM
    elif arch == "gpt_oss":
        cfg = tf.GptOssConfig(intermediate_size=24, num_local_experts=E, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"], **common)
        cls = tf.GptOssForCausalLM
    else:
        raise ValueError(arch)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # gpt-oss initialises its router (and biases) to zero: give the routing something to do
        for n, p in model.named_parameters():
            if "router" in n or "bias" in n:
                p.normal_(0, 0.5)
    return model


def batches(pad: bool):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(2):
        ids = torch.randint(3, VOCAB, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[1, 6:] = 0  # right padding: these tokens are routed by the model but must not count
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _route(arch, mlp, x):
    """(indices [N, K], weights [N, K]) of the router, written out in float64."""
    if arch == "gpt_oss":
        logits = x @ mlp.router.weight.double().T + mlp.router.bias.double()
        top, idx = torch.topk(logits, K, dim=-1)
        return idx, torch.softmax(top, dim=-1)
    probs = torch.softmax(x @ mlp.gate.weight.double().T, dim=-1)
    top, idx = torch.topk(probs, K, dim=-1)
    if arch == "mixtral":  # Mixtral always renormalises the top-k; the Qwen3-MoE config above does not
        top = top / top.sum(-1, keepdim=True)
    return idx, top


def _expert(arch, ex, e, x):
    """Expert e's output on x (before its routing weight), written out in float64."""
    if arch == "gpt_oss":
        gu = x @ ex.gate_up_proj[e].double() + ex.gate_up_proj_bias[e].double()
        gate, up = gu[..., ::2].clamp(max=ex.limit), gu[..., 1::2].clamp(-ex.limit, ex.limit)
        glu = gate * torch.sigmoid(gate * ex.alpha)
        return ((up + 1) * glu) @ ex.down_proj[e].double() + ex.down_proj_bias[e].double()
    gate, up = (x @ ex.gate_up_proj[e].double().T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ ex.down_proj[e].double().T


def reference(arch, model, data):
    """{layer: {"count", "reap_sum", "norm_sum"}} from a plain forward and the hand-written router/experts."""
    layers = model.model.layers
    seen: dict[int, list] = {i: [] for i in range(len(layers))}
    hs = [blk.mlp.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach()))
          for i, blk in enumerate(layers)]
    out = {i: torch.zeros(E, 3, dtype=torch.float64) for i in seen}
    try:
        for b in data:
            for i in seen:
                seen[i].clear()
            with torch.no_grad():
                model(**b, use_cache=False)
            valid = b["attention_mask"].reshape(-1) != 0
            for i, blk in enumerate(layers):
                x = seen[i][0].reshape(-1, seen[i][0].shape[-1]).double()[valid]
                idx, w = _route(arch, blk.mlp, x)
                for e in range(E):
                    tok, slot = torch.where(idx == e)
                    norm = _expert(arch, blk.mlp.experts, e, x[tok]).norm(dim=-1)
                    out[i][e] += torch.stack([torch.tensor(float(tok.numel()), dtype=torch.float64),
                                              (w[tok, slot] * norm).sum(), norm.sum()])
    finally:
        for h in hs:
            h.remove()
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_reap_statistics_equal_a_plain_recomputation(arch):
    model = tiny_moe(arch)
    assert [p for p, _ in expert_modules(model.model.layers[0])] == ["mlp.experts"]
    data = batches(pad=True)
    # ppl replays blocks and gradient checkpointing recomputes them: neither may count a token twice
    s = score_fast(model, data, metrics=("bi", "taylor", "ppl"), gradient_checkpointing=True, progress=False)
    ref = reference(arch, model, data)
    n_valid = sum(int(b["attention_mask"].sum()) for b in data)
    assert sorted(s.experts) == [0, 1, 2]
    for i, r in ref.items():
        got = s.experts[i]
        assert float(got["count"].sum()) == K * n_valid  # every valid token picked K experts, padding none
        torch.testing.assert_close(got["count"], r[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(got["reap_sum"], r[:, 1], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got["norm_sum"], r[:, 2], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got["reap_mean"], r[:, 1] / r[:, 0], rtol=1e-4, atol=1e-7, equal_nan=True)
    # the statistic tells the experts apart (a constant would pass none of the comparisons above either)
    assert float(s.experts[0]["reap_sum"].std()) > 0


def test_expert_statistics_round_trip_through_the_scores_file(tmp_path):
    model = tiny_moe("mixtral")
    s = score_fast(model, batches(pad=False), metrics=("bi",), progress=False)
    path = s.save(tmp_path / "scores.json")
    raw = json.loads(path.read_text())
    assert set(raw["experts"]) == {"0", "1", "2"}
    back = Scores.load(path, model=model)
    for i in range(3):
        for k in ("count", "reap_sum", "norm_sum", "reap_mean"):
            torch.testing.assert_close(back.experts[i][k], s.experts[i][k], rtol=0, atol=0)
    # a dense model has no expert statistics and its file no "experts" entry
    dense = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    d = score_fast(dense, batches(pad=False), metrics=("bi",), progress=False)
    assert d.experts == {} and "experts" not in json.loads(d.save(tmp_path / "d.json").read_text())


def test_cli_score_saves_expert_statistics(tmp_path):
    """`shortllm score` on a saved MoE checkpoint writes the per-expert statistics into the scores file."""
    import shutil
    from pathlib import Path

    tok_dir = Path.home() / ".cache" / "shortllm" / "smollm2-135m"
    if not (tok_dir / "tokenizer.json").is_file():
        pytest.skip("the built-in SmolLM2 tokenizer is not cached")
    cfg = tf.Qwen3MoeConfig(hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=49152,
                            num_experts=E, num_experts_per_tok=K, max_position_embeddings=64)
    torch.manual_seed(0)
    tf.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "m")
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "scores.json"
    assert main(["score", str(tmp_path / "m"), "--data", str(text), "--samples", "2", "--seq-len", "16",
                 "--metrics", "bi", "-q", "-o", str(out)]) == 0
    s = Scores.load(out)
    assert sorted(s.experts) == [0, 1]
    # 2 sequences of 16 tokens, each token routed to K experts
    assert all(float(s.experts[i]["count"].sum()) == 2 * 16 * K for i in (0, 1))


def test_router_aux_loss_never_enters_taylor():
    """With output_router_logits and a large router_aux_loss_coef the model's own loss includes the
    load-balancing term; Taylor must be the gradient of the token cross-entropy alone."""
    model = tiny_moe("mixtral")
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = model.router_aux_loss_coef = 1000.0  # the head copies it at init
    with torch.no_grad():  # a confident router: the load-balancing term then has a gradient worth seeing
        for blk in model.model.layers:
            blk.mlp.gate.weight.normal_(0, 1.0)
    b = batches(pad=True)[0]
    s = score_fast(model, [b], metrics=("taylor",), progress=False)

    def taylor(with_aux: bool):
        model.zero_grad(set_to_none=True)
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        out = model(**b, use_cache=False, labels=labels if with_aux else None)
        if with_aux:
            assert out.aux_loss is not None and float(out.aux_loss) > 0
            loss = out.loss
        else:
            lg = out.logits
            loss = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        t = torch.tensor([sum(float((p.detach().double() * p.grad.double()).abs().sum())
                              for n, p in blk.named_parameters()
                              if "bias" not in n.split(".")[-1] and p.grad is not None)
                          for blk in model.model.layers], dtype=torch.float64)
        model.zero_grad(set_to_none=True)
        return t

    ce_only, with_aux = taylor(False), taylor(True)
    # the aux term would show if it leaked in: far beyond the tolerance of the comparison below
    assert float(((with_aux - ce_only).abs() / ce_only).max()) > 1e-3, (ce_only, with_aux)
    torch.testing.assert_close(s.values["taylor"], ce_only, rtol=1e-4, atol=1e-9)


def test_inspect_lists_the_experts_of_each_block(tmp_path, capsys):
    tiny_moe("gpt_oss").save_pretrained(tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [b["experts"] for b in out["branches"]] == [[{"path": "mlp.experts", "count": E}]] * 3
    assert main(["inspect", str(tmp_path / "m")]) == 0
    assert "experts mlp.experts x4" in capsys.readouterr().out
