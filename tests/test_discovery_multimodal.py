"""Multimodal wrappers whose language model is a decoder (Gemma-3, Qwen2.5-VL `...ForConditionalGeneration`):
discovery finds the language model's blocks through the wrapper (depth in `text_config`), scoring and pruning
run on them with text-only data, and the export reloads in the same wrapper class with logits equal to the
wrapper with the block deleted by hand (oracle: layer list and text_config edited directly, no shortllm code).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf

from shortllm.cli.app import main
from shortllm.model.adapters import get_adapter
from shortllm.pruning.exporting import export
from shortllm.pruning.plans import make_plan
from shortllm.pruning.removal import prune
from shortllm.scoring.engine import score_fast

VOCAB = 128
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def gemma3():
    cfg = tf.Gemma3Config(
        text_config=dict(TEXT, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
                         final_logit_softcapping=5.0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4)
    return tf.Gemma3ForConditionalGeneration, cfg


def qwen2_5_vl():
    cfg = tf.Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                "rope_theta": 10000.0}),
        vision_config=dict(hidden_size=16, intermediate_size=32, depth=1, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]))
    return tf.Qwen2_5_VLForConditionalGeneration, cfg


BUILDERS = {"gemma3": gemma3, "qwen2_5_vl": qwen2_5_vl}


def build(name: str):
    cls, cfg = BUILDERS[name]()
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # norms start at ones/zeros: perturbed so a misplaced final norm shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def text_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 8), generator=g)  # text ids only: below every image/video special token
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, b):
    with torch.no_grad():
        return model(**b, use_cache=False).logits


def by_hand_without(model, block: int):
    ref = copy.deepcopy(model)
    lm = ref.model.language_model
    lm.layers = torch.nn.ModuleList([m for i, m in enumerate(lm.layers) if i != block])
    tc = ref.config.text_config
    tc.num_hidden_layers -= 1
    if getattr(tc, "layer_types", None):
        tc.layer_types = [t for i, t in enumerate(tc.layer_types) if i != block]
    return ref


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_wrapper_scored_pruned_and_exported_in_the_same_class(name, tmp_path):
    model = build(name)
    ad = get_adapter(model)
    assert ad.spec.blocks == "model.language_model.layers" and ad.num_layers == 4
    assert ad.spec.config_path == "text_config" and ad.depth_config() is model.config.text_config
    if name == "gemma3":  # the text config's softcap is reproduced by the chunked head
        assert ad.head_params()["softcap"] == 5.0
    b = text_batch()
    s = score_fast(model, [b], metrics=("bi", "angular", "taylor", "mag", "ppl"), progress=False)
    for m in ("bi", "taylor", "mag", "ppl"):
        assert s.per_block(m).shape == (4,) and torch.isfinite(s.per_block(m)).all(), (m, s.per_block(m))
    # PPL with block i removed equals the wrapper with block i deleted by hand (the same loss, in float64)
    ref = by_hand_without(model, 1)
    lg = logits(ref, b).double()
    t = b["input_ids"][:, 1:].masked_fill((b["attention_mask"][:, 1:] == 0) | (b["attention_mask"][:, :-1] == 0), -100)
    nll = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, VOCAB), t.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(s.per_block("ppl")[1], torch.exp(nll), rtol=1e-4, atol=0)

    vision_before = {k: v.clone() for k, v in model.state_dict().items() if "visual" in k or "vision" in k}
    pruned = prune(model, make_plan(None, model=model, blocks=[1]), inplace=False)
    torch.testing.assert_close(logits(pruned, b), logits(ref, b), rtol=1e-5, atol=1e-5)
    export(pruned, tmp_path / "out")
    back = type(model).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back) is type(model) and back.config.text_config.num_hidden_layers == 3
    torch.testing.assert_close(logits(back, b), logits(ref, b), rtol=1e-5, atol=1e-5)
    after = back.state_dict()
    assert vision_before and all(torch.equal(after[k], v) for k, v in vision_before.items())
    # cached generation equals uncached on the reloaded wrapper
    ids = b["input_ids"][:1, :5]
    gen = [back.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, use_cache=c, pad_token_id=0) for c in (True, False)]
    assert torch.equal(gen[0], gen[1])


def test_inspect_shows_the_language_model_of_a_wrapper(tmp_path, capsys):
    build("gemma3").save_pretrained(tmp_path / "g3")
    assert main(["inspect", str(tmp_path / "g3"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["class"] == "Gemma3ForConditionalGeneration"
    assert out["blocks"] == {"path": "model.language_model.layers", "count": 4, "config_key": "num_hidden_layers",
                             "config_path": "text_config"}
