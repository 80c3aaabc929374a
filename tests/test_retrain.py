"""Retraining (LoRA / CPT): loss goes down, merged export is exact, resume is bit-identical, errors are typed."""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny

from shortllm.errors import CheckpointError, DataError, ExportError, RetrainConfigError, ShortLLMError
from shortllm.retrain.config import RetrainConfig
from shortllm.retrain.train_data import RetrainData, instruction_data, load_retrain_data, text_data
from shortllm.retrain.training import _wrap_lora, lora_target_modules, save_retrained
from shortllm.retrain.training import retrain_model as retrain

pytest.importorskip("peft")

_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,\n#:!?'-")


def char_tokenizer():
    """A character-level fast tokenizer whose ids fit the tiny models' 128-token vocab."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(_CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def toy_corpus(n_sentences: int = 400, seed: int = 0) -> str:
    """Sentences from a tiny grammar: far more predictable than a random model's uniform guess."""
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "the bird", "my fish"]
    verb, obj = ["sat on", "ran to", "saw"], ["the mat", "a tree", "the sea"]
    return "\n".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(n_sentences))


def cfg(**kw) -> RetrainConfig:
    base = dict(steps=12, lr=3e-3, micro_batch_size=4, seq_len=32, lora_r=4, warmup_steps=2, eval_max_examples=8,
                heldout_fraction=0.1)
    base.update(kw)
    return RetrainConfig(**base)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared, loaded 2-core box two OpenMP threads spin and run 5-25x slower
    (measured here); on an idle box the real-model test loses ~1.5x, which its budget allows."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def toy(tok):
    return text_data(toy_corpus(), tok, seq_len=32, heldout_fraction=0.1, source="toy")


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- config and data
def test_config_roundtrip_schedule_and_errors():
    c = RetrainConfig(method="cpt", steps=20, lr=1e-3, warmup_steps=4, schedule="cosine",
                      lora_target_modules=["q_proj"])
    assert RetrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert [c.lr_at(s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert c.lr_at(4 + 8) == pytest.approx(0.5e-3)  # cosine half-way through the decay
    lin = RetrainConfig(steps=10, lr=1.0, warmup_steps=0, schedule="linear")
    assert [lin.lr_at(s) for s in range(10)] == pytest.approx([1 - s / 10 for s in range(10)])
    assert RetrainConfig().resolved_lr == 1e-4 and RetrainConfig(method="cpt").resolved_lr == 5e-5
    assert RetrainConfig(steps=100).resolved_warmup == 5
    for bad in (dict(method="qlora"), dict(schedule="step"), dict(dtype="fp16"), dict(steps=0), dict(lr=-1.0),
                dict(warmup_steps=200), dict(micro_batch_size=0)):
        with pytest.raises(RetrainConfigError) as e:
            RetrainConfig(**bad).validate()
        assert isinstance(e.value, (ShortLLMError, ValueError)), "typed, and still a ValueError"
    with pytest.raises(RetrainConfigError, match="Unknown RetrainConfig field"):
        RetrainConfig.from_dict({"method": "lora", "learning_rate": 1.0})


def test_text_data_chunks_and_tail_heldout(tok):
    text = toy_corpus(60)
    d = text_data(text, tok, seq_len=16, heldout_fraction=0.25)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // 16
    assert len(d.train) + len(d.heldout) == n and len(d.heldout) == math.ceil(0.25 * n)
    flat = torch.cat([x for x, _ in d.train + d.heldout]).tolist()
    assert flat == ids[: n * 16], "chunks are the corpus in order, held-out split is the tail"
    assert all(torch.equal(x, y) for x, y in d.train), "causal LM: labels == input_ids"
    same, shorter = text_data(text, tok, 16, 0.25), text_data(text[:-40], tok, 16, 0.25)
    assert d.fingerprint() == same.fingerprint() != shorter.fingerprint()
    with pytest.raises(DataError, match="empty"):
        text_data("   \n", tok, 16)
    with pytest.raises(DataError, match="tokenizer"):
        text_data(text, None, 16)


def test_instruction_masking(tok, tmp_path):
    recs = [{"instruction": "add one", "input": "two", "output": "three"},
            {"prompt": "q: the cat\na:", "response": " sat"},
            {"prompt": "x" * 300, "response": "dropped: beyond seq_len"}] + \
           [{"prompt": f"q{i}:", "response": " abc"} for i in range(7)]
    d = instruction_data(recs, tok, seq_len=300, heldout_fraction=0.2)
    assert len(d.train) + len(d.heldout) == 9 and len(d.heldout) == 2, "the too-long record is dropped"
    every = sorted(d.train + d.heldout, key=lambda e: -e[0].numel())
    for ids, labels in every:
        n_prompt = int((labels == -100).sum())
        assert n_prompt > 0 and (labels[:n_prompt] == -100).all(), "prompt tokens come first and are all masked"
        assert torch.equal(labels[n_prompt:], ids[n_prompt:]) and int(ids[-1]) == tok.eos_token_id
    pr = next(e for e in every if e[0].numel() == len(tok("q: the cat\na: sat")["input_ids"]) + 1)
    assert tok.decode(pr[0][pr[1] != -100]) == " sat</s>", "exactly the response (+EOS) is learned"
    alpaca = next(e for e in every if "three" in tok.decode(e[0]))
    assert "### Response:\n" in tok.decode(alpaca[0][alpaca[1] == -100]) and "### Input:\ntwo" in tok.decode(alpaca[0])
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    assert load_retrain_data(f, tok, 300, 0.2).fingerprint() == d.fingerprint()
    with pytest.raises(DataError, match="needs 'instruction'"):
        instruction_data([{"question": "x", "answer": "y"}], tok, 64)
    with pytest.raises(DataError, match="No usable"):
        instruction_data([{"prompt": "long " * 40, "response": "y"}], tok, 16)
    with pytest.raises(DataError, match="No data file"):
        load_retrain_data(tmp_path / "missing.txt", tok, 16)


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("method", ["lora", "cpt"])
def test_retraining_lowers_heldout_ppl(method, tok, toy):
    model = make_tiny("llama")
    rng_before = torch.get_rng_state()
    r = retrain(model, tok, toy, cfg(method=method, steps=30, lr=1e-2 if method == "lora" else 3e-3), progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG stream is untouched"
    assert r.completed and r.steps_done == 30 and len(r.losses) == 30
    assert r.tokens_seen == 30 * 4 * 32 and r.target_tokens == 30 * 4 * 31
    assert r.ppl_after < 0.6 * r.ppl_before, (r.ppl_before, r.ppl_after)
    assert sum(r.losses[-5:]) < sum(r.losses[:5])
    assert type(r.model).__name__ == "LlamaForCausalLM" and r.model is model and not r.model.training
    assert not any("lora" in n for n, _ in model.named_parameters()), "LoRA merged away"
    json.dumps(r.to_dict())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_lora_export_matches_peft_logits(arch, tok, toy, tmp_path):
    c = cfg(method="lora", steps=6, lr=1e-2)
    model = make_tiny(arch)
    r = retrain(model, tok, toy, c, out_dir=tmp_path / "run", progress=False)
    out = save_retrained(r.model, tok, tmp_path / "export")
    assert not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()
    assert (out / "model.safetensors").is_file()
    with pytest.raises(ExportError, match="already exists"):
        save_retrained(r.model, tok, tmp_path / "export")
    # rebuild the peft model from the untouched base + the final LoRA checkpoint
    from safetensors.torch import load_file
    peft_model = _wrap_lora(make_tiny(arch), c)
    ck = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    lora = load_file(str(ck / "trainable.safetensors"))
    assert lora and all("lora_" in k for k in lora)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items()), "B moved off its zero init"
    missing = peft_model.load_state_dict(lora, strict=False)
    assert not missing.unexpected_keys
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(loaded).__name__ == type(model).__name__
    ids = torch.randint(4, 36, (2, 23), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = peft_model.eval()(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        base = make_tiny(arch)(input_ids=ids).logits
    assert (ref - base).abs().max() > 1e-3, "the adapters changed the model"
    # x(W + BA) vs xW + (xB)A: float32 rounding of a different summation order, a few ulps of the logits
    assert (got - ref).abs().max() <= 3e-5, float((got - ref).abs().max())


@pytest.mark.parametrize("method", ["lora", "cpt"])
def test_resume_is_bit_identical(method, tok, toy, tmp_path):
    c = cfg(method=method, steps=7, save_every=2, micro_batch_size=2, grad_accum=2, eval_every=3,
            lora_dropout=0.1)
    full = retrain(make_tiny("llama"), tok, toy, c, out_dir=tmp_path / "a", progress=False)
    part = retrain(make_tiny("llama"), tok, toy, c, out_dir=tmp_path / "b", stop_after=3, progress=False)
    assert not part.completed and part.steps_done == 3
    steps = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert steps == ["step-00000002", "step-00000003"], steps
    with pytest.raises(CheckpointError, match="model differs"):  # the trained model is not the starting one
        retrain(part.model, tok, toy, c, out_dir=tmp_path / "b", resume=True, progress=False)
    more = retrain(make_tiny("llama"), tok, toy, c, out_dir=tmp_path / "b", resume=True, stop_after=2, progress=False)
    assert more.steps_done == 5
    done = retrain(make_tiny("llama"), tok, toy, c, out_dir=tmp_path / "b", resume=True, progress=False)
    assert done.completed and done.losses == full.losses and done.eval_history == full.eval_history
    assert done.ppl_before == full.ppl_before and done.tokens_seen == full.tokens_seen
    a, b = state(full.model), state(done.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "bit-identical weights"
    assert not list((tmp_path / "b" / "checkpoints").glob(".tmp-*")), "no temp dir left behind"


_WORKER = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_retrain import char_tokenizer, toy_corpus, cfg
from tiny_models import make_tiny
from shortllm.retrain.training import retrain_model as retrain
from shortllm.retrain.train_data import text_data
tok = char_tokenizer()
retrain(make_tiny("llama"), tok, text_data(toy_corpus(), tok, 32, 0.1), cfg(**{kw!r}), out_dir={out!r}, resume=True,
        progress=False)
"""


def test_resume_after_sigkill_is_bit_identical(tok, toy, tmp_path):
    """Kill a retraining subprocess (SIGKILL) twice at random checkpoints, resume, compare bit for bit."""
    import signal
    import subprocess
    import sys

    kw = dict(method="lora", steps=40, save_every=1, lora_dropout=0.1, micro_batch_size=2)
    full = retrain(make_tiny("llama"), tok, toy, cfg(**kw), progress=False)
    out = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=str(Path(__file__).parent), kw=kw, out=str(out)))
    rng = random.Random(1234)
    killed_at = []
    for _ in range(2):
        target = rng.randint(3, 30) + (killed_at[-1] if killed_at else 0) // 2
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            dirs = [p.name for p in (out / "checkpoints").glob("step-*")] if (out / "checkpoints").is_dir() else []
            if any(int(d[5:]) >= target for d in dirs):
                break
            time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(max(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*")))
    assert killed_at[-1] < 40, killed_at
    done = retrain(make_tiny("llama"), tok, toy, cfg(**kw), out_dir=out, resume=True, progress=False)
    assert done.completed and done.losses == full.losses
    a, b = state(full.model), state(done.model)
    assert all(torch.equal(a[k], b[k]) for k in a), f"mismatch after kills at {killed_at}"
    assert not list((out / "checkpoints").glob(".tmp-*")), "temp dirs of killed writes are cleaned up"


def test_grad_accumulation_equals_big_batch(tok):
    recs = [{"prompt": f"q{'x' * (i % 5)}:", "response": " the cat sat" + "." * (i % 3)} for i in range(40)]
    data = instruction_data(recs, tok, 64, 0.1)  # variable lengths: padding and token-weighting matter
    runs = []
    for mbs, acc in ((4, 1), (2, 2), (1, 4)):
        c = cfg(method="cpt", steps=3, micro_batch_size=mbs, grad_accum=acc, lr=1e-3, max_grad_norm=0.0)
        runs.append(retrain(make_tiny("llama"), tok, data, c, progress=False))
    for r in runs[1:]:
        assert r.losses == pytest.approx(runs[0].losses, rel=1e-5)
        a, b = state(runs[0].model), state(r.model)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_errors_are_typed(tok, toy, tmp_path):
    with pytest.raises(RetrainConfigError, match="Unknown retraining method"):
        retrain(make_tiny("llama"), tok, toy, RetrainConfig(method="dpo"), progress=False)
    with pytest.raises(DataError, match="empty"):
        retrain(make_tiny("llama"), tok, RetrainData([], [], "text"), cfg(), progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(ExportError, match="resume=True"):
        retrain(make_tiny("llama"), tok, toy, cfg(), out_dir=tmp_path / "busy", progress=False)
    with pytest.raises(CheckpointError, match="needs out_dir"):
        retrain(make_tiny("llama"), tok, toy, cfg(), resume=True, progress=False)
    retrain(make_tiny("llama"), tok, toy, cfg(steps=2, method="cpt"), out_dir=tmp_path / "r", progress=False)
    with pytest.raises(CheckpointError, match="config differs"):
        retrain(make_tiny("llama"), tok, toy, cfg(steps=3, method="cpt"), out_dir=tmp_path / "r", resume=True,
                progress=False)
    retrain(make_tiny("llama"), tok, toy, cfg(steps=2), out_dir=tmp_path / "l", progress=False)
    model = make_tiny("llama")
    before = state(model)
    with pytest.raises(CheckpointError, match="config differs"):  # raised with the adapters already injected
        retrain(model, tok, toy, cfg(steps=3), out_dir=tmp_path / "l", resume=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())
    assert not any("lora" in n for n, _ in model.named_modules()), "a failed run leaves no adapter behind"
    with pytest.raises(RetrainConfigError, match="not Linear modules"):
        lora_target_modules(make_tiny("llama"), ["q_proj", "wq"])
    model = make_tiny("llama")
    before = state(model)
    with pytest.raises(RetrainConfigError):
        retrain(model, tok, toy, cfg(lora_target_modules=["nope"]), out_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists(), "a run failing before its first checkpoint leaves no folder"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        retrain(make_tiny("llama"), tok, toy, cfg(), out_dir=tmp_path / "afile", progress=False)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())
    assert not any("lora" in n for n, _ in model.named_modules()), "a failed run leaves no adapter behind"


def test_lora_targets_per_architecture():
    leaves = {arch: sorted({n.rsplit(".", 1)[-1] for n in lora_target_modules(make_tiny(arch, num_layers=2))})
              for arch in ("llama", "gpt2", "opt", "gpt_neox", "phi3")}
    assert leaves["llama"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert leaves["gpt2"] == ["c_attn", "c_fc", "c_proj"]
    assert leaves["opt"] == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
    assert leaves["gpt_neox"] == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert leaves["phi3"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert len(lora_target_modules(make_tiny("llama", num_layers=2))) == 14


def test_bf16_and_gradient_checkpointing_run(tok, toy):
    model = make_tiny("llama")
    r = retrain(model, tok, toy, cfg(method="lora", steps=3, dtype="bf16", gradient_checkpointing=True), progress=False)
    assert r.completed and all(math.isfinite(x) for x in r.losses)
    assert not model.is_activation_checkpointing, "restored to the caller's setting"
    assert next(model.parameters()).dtype == torch.float32


def test_cli_retrain(tok, tmp_path):
    src = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(str(src))
    tok.save_pretrained(str(src))
    (tmp_path / "corpus.txt").write_text(toy_corpus(200))
    from shortllm.cli.app import main

    argv = ["retrain", str(src), "--method", "cpt", "--data", str(tmp_path / "corpus.txt"), "--steps", "4",
            "-o", str(tmp_path / "out"), "--seq-len", "32", "--lr", "3e-3", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "retrain.json").read_text())
    assert report["steps_done"] == 4 and report["ppl_after"] < report["ppl_before"]
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "model")).config.num_hidden_layers == 4
    with pytest.raises(ExportError):
        main(["--debug"] + argv)
    with pytest.raises(DataError, match="Unknown corpus"):
        main(["--debug"] + argv[:5] + ["nope"] + argv[6:9] + [str(tmp_path / "out2")] + argv[10:])
    assert not (tmp_path / "out2").exists(), "a failed run leaves no output folder"
    assert main(argv + ["--resume"]) == 0  # already finished: reloads the last checkpoint and re-exports


# ---------------------------------------------------------------- real model
@pytest.mark.real_model
def test_real_smollm2_pruned_35pct_lora_and_cpt_lower_ppl(data_dir):
    """Blocks 14..26 of 30 removed (34.2% of the parameters): 8 steps x 2 x 128 PTB-train tokens of LoRA,
    and of CPT, each lower the held-out PPL (measured: ~89k -> ~1e5..1e4 range; numbers printed)."""
    from shortllm.data.corpora import load_corpus_text
    from shortllm.model.loading import load_model
    from shortllm.pruning.plans import make_plan
    from shortllm.pruning.removal import prune

    text = load_corpus_text("ptb", "train", data_dir)[:60_000]
    numbers = {}
    for method, lr in (("lora", 1e-3), ("cpt", 5e-5)):
        model, tok = load_model("smollm2-135m")
        plan = make_plan(None, model=model, blocks=list(range(14, 27)))
        prune(model, plan)
        data = text_data(text, tok, seq_len=128, heldout_fraction=0.2, source="ptb:train[:60k chars]")
        t0 = time.perf_counter()
        r = retrain(model, tok, data, RetrainConfig(method=method, steps=8, micro_batch_size=2, seq_len=128, lr=lr,
                                                   warmup_steps=1, eval_max_examples=8), progress=False)
        numbers[method] = (r.ppl_before, r.ppl_after, time.perf_counter() - t0, plan.removed_fraction)
        assert r.ppl_after < 0.5 * r.ppl_before, (method, r.ppl_before, r.ppl_after)
        assert model.config.num_hidden_layers == 17 and type(r.model).__name__ == "LlamaForCausalLM"
    print("\nSmolLM2-135M minus blocks 14-26, held-out PTB-train PPL before -> after (8 steps x 2 x 128 tokens):")
    for m, (b, a, s, frac) in numbers.items():
        print(f"  {m}: {b:.1f} -> {a:.1f}  ({s:.1f} s, {100 * frac:.1f}% of parameters removed)")
