"""Both built-in models' original (quantized) GGUF files pruned by 20% and 35% of their blocks, proven by the
real consumers: transformers' GGUF loader (logits equal prune(model loaded from the original GGUF)) and
llama.cpp through xllamacpp (loads, generates, and its perplexity on a fixed WikiText-2 slice matches
transformers' on the same pruned weights).

Tolerance for llama.cpp vs transformers: mean token NLL within 1% (|ln ppl_llama.cpp - ln ppl_transformers|
<= 0.01 ln ppl_transformers). The two run the same quantized weights, but llama.cpp multiplies them against
activations quantized to 8 bits (its q8 dot products) while transformers runs fp32 on the dequantized
weights, and that error grows with the size of the logits: measured here on 2 x 64 WikiText-2 tokens,
unpruned SmolLM2 0.0008 nats apart (0.02% of its NLL), unpruned Gemma-3 0.019 (0.5%), SmolLM2 with 10 late
blocks removed (perplexity 1e7) 0.054 (0.3%), Gemma-3 without a whole period (perplexity ~5000) 0.064 (0.8%).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from shortllm.io.gguf_files import layout_problem, read_header
from shortllm.model.loading import builtin_gguf
from shortllm.pruning.gguf_plans import prune_gguf_file
from shortllm.pruning.plans import make_plan
from shortllm.pruning.removal import prune
from shortllm.testing import llamacpp as LC

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
SKIP = LC.available()
if SKIP and os.environ.get("SHORTLLM_REQUIRE_LLAMACPP"):  # set by .ci/run: CI must not skip these
    raise RuntimeError(f"CI must run the llama.cpp tests: {SKIP}")
need_llamacpp = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

# Removed blocks: 20% and 35% of the blocks. SmolLM2: BI's choice on 8 x 128 WikiText-2 calibration tokens
# (as in benchmarks/bench_gguf_quant.py; a plan that destroys the model, perplexity in the millions, makes
# the two readers' rounding differences dominate). Gemma-3's must keep the fixed sliding/global period of 6
# (llama.cpp derives the layer kinds from it): [13, 14, 15, 17] and the whole period [11..16].
PLANS = {
    ("smollm2-135m", 0.2): [12, 13, 14, 15, 17, 25],
    ("smollm2-135m", 0.35): [3, 9, 12, 13, 14, 15, 16, 17, 25, 26],
    ("gemma3-270m", 0.2): [13, 14, 15, 17],
    ("gemma3-270m", 0.35): [11, 12, 13, 14, 15, 16],
}
BOS = {"smollm2-135m": False, "gemma3-270m": True}
NLL_RTOL = 0.01  # of the mean token NLL


def _load_gguf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def builtin(request):
    """(name, original GGUF path, tokenizer, 2 x 64-token WikiText-2 chunks)."""
    from shortllm.model.loading import load_model

    torch.set_num_threads(2)
    name = request.param
    _, tok = load_model(name)
    path = builtin_gguf(name)
    return name, path, tok, LC.wikitext2_chunks(tok, 2, 64, bos=BOS[name])


@pytest.mark.parametrize("ratio", [0.2, 0.35])
def test_pruned_builtin_gguf_in_transformers_and_llamacpp(builtin, ratio, tmp_path):
    name, src, tok, chunks = builtin
    removed = PLANS[(name, ratio)]
    header = read_header(src)
    assert layout_problem(header.arch, header.block_count, removed) is None
    orig = _load_gguf_model(src)
    plan = make_plan(None, model=orig, blocks=removed)
    out = prune_gguf_file(src, plan, tmp_path / "pruned.gguf")
    pruned_header = read_header(out)
    assert pruned_header.block_count == header.block_count - len(removed)
    assert {k: v for k, v in pruned_header.metadata.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in header.metadata.items() if k.startswith("tokenizer.")}

    # transformers' GGUF loader on the pruned file == prune(model loaded from the original GGUF)
    prune(orig, plan)
    back = _load_gguf_model(out)
    assert back.config.num_hidden_layers == orig.config.num_hidden_layers
    nll, n = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([chunk])
            logits = back(ids).logits
            torch.testing.assert_close(logits, orig(ids).logits, rtol=1e-4, atol=1e-4)
            logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
            nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
            n += len(chunk) - 1
    if name == "gemma3-270m":  # the kept layers keep their attention kind
        kept = plan.kept
        full = ["sliding_attention" if i % 6 != 5 else "full_attention" for i in range(header.block_count)]
        assert back.config.layer_types == [full[i] for i in kept]
    ppl_hf = math.exp(nll / n)

    if SKIP is not None:
        pytest.skip(SKIP)
    with LC.LlamaCpp(out, n_ctx=256, threads=1) as lc:
        prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
        text = lc.generate(([tok.bos_token_id] if BOS[name] else []) + prompt, 8)
        assert len(text.strip()) > 0, "llama.cpp generated nothing from the pruned file"
        ppl_cpp, mask = lc.perplexity(chunks)
    assert sum(map(sum, mask)) >= 0.95 * n, "llama.cpp withheld the log-probability of too many tokens"
    ppl_hf = LC.hf_perplexity(back, chunks, mask) if not all(map(all, mask)) else ppl_hf
    assert abs(math.log(ppl_cpp / ppl_hf)) <= NLL_RTOL * math.log(ppl_hf), (name, ratio, ppl_cpp, ppl_hf)


@need_llamacpp
def test_llamacpp_logprob_route_agrees_with_grammar_forcing(builtin):
    """The logit-bias route reports the raw log-probabilities: the same numbers as a continuation forced
    token by token with a token-id grammar (a second route through llama.cpp's sampler)."""
    name, src, tok, chunks = builtin
    ids = chunks[0][:6]
    with LC.LlamaCpp(src, n_ctx=128, threads=1) as lc:
        via_bias = lc.sequence_logprobs(ids)[2:]
        grammar = "root ::= " + " ".join(f"<[{t}]>" for t in ids[3:])
        r = lc._complete({"prompt": ids[:3], "n_predict": len(ids) - 3, "temperature": 0.0, "n_probs": 1,
                          "post_sampling_probs": False, "grammar": grammar, "ignore_eos": True,
                          "cache_prompt": False})
        via_grammar = [c["logprob"] for c in r["choices"][0]["logprobs"]["content"]]
    assert [c["id"] for c in r["choices"][0]["logprobs"]["content"]] == ids[3:]
    assert None not in via_bias and via_bias == pytest.approx(via_grammar, abs=1e-3)


def test_cli_score_and_prune_smollm2_gguf(tmp_path, data_dir):
    """`shortllm score FILE.gguf` then `shortllm prune FILE.gguf --scores ... -o pruned.gguf`."""
    from shortllm.cli.app import main

    src = builtin_gguf("smollm2-135m")
    scores = tmp_path / "s.json"
    assert main(["score", str(src), "--metrics", "bi", "--samples", "2", "--seq-len", "32", "-q",
                 "-o", str(scores)]) == 0
    out = tmp_path / "p.gguf"
    assert main(["prune", str(src), "--scores", str(scores), "--metric", "bi", "--remove", "6",
                 "-o", str(out)]) == 0
    h = read_header(out)
    assert h.block_count == 24 and sorted(h.block_tensors) == list(range(24))
