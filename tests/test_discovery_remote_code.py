"""A checkpoint that needs its own code (config.json `auto_map` -> a modeling file in the checkpoint dir) loads only
with an explicit opt-in: without it a typed error says to pass trust_remote_code=True / --trust-remote-code,
transformers never prompts on stdin, and nothing is written. Built locally, so no network is needed."""
from __future__ import annotations

import builtins
import json
import uuid
from pathlib import Path

import pytest
import transformers as tf
from transformers.dynamic_module_utils import HF_MODULES_CACHE

from shortllm.cli.app import main
from shortllm.errors import ModelLoadError
from shortllm.model.adapters import get_adapter
from shortllm.model.loading import load_model

CONFIG_PY = """from transformers import LlamaConfig


class RemoteTinyConfig(LlamaConfig):
    model_type = "shortllm_remote_tiny"
"""
MODELING_PY = """from transformers import LlamaForCausalLM

from .configuration_remote_tiny import RemoteTinyConfig


class RemoteTinyForCausalLM(LlamaForCausalLM):
    config_class = RemoteTinyConfig
"""


@pytest.fixture
def remote_ckpt(tmp_path) -> Path:
    # a unique folder name: transformers caches trusted code under a module named after the folder
    d = tmp_path / f"remote_{uuid.uuid4().hex[:8]}"
    cfg = tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    c = json.loads((d / "config.json").read_text())
    c.update(model_type="shortllm_remote_tiny", architectures=["RemoteTinyForCausalLM"],
             auto_map={"AutoConfig": "configuration_remote_tiny.RemoteTinyConfig",
                       "AutoModelForCausalLM": "modeling_remote_tiny.RemoteTinyForCausalLM"})
    (d / "config.json").write_text(json.dumps(c))
    (d / "configuration_remote_tiny.py").write_text(CONFIG_PY)
    (d / "modeling_remote_tiny.py").write_text(MODELING_PY)
    return d


def _cached_modules(d: Path) -> bool:
    return any((Path(HF_MODULES_CACHE) / "transformers_modules").glob(f"{d.name}*"))


def test_remote_code_needs_the_opt_in(remote_ckpt, monkeypatch, tmp_path, capsys):
    def no_prompt(*_a, **_k):
        raise AssertionError("transformers asked on stdin whether to run the checkpoint's code")

    monkeypatch.setattr(builtins, "input", no_prompt)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(remote_ckpt))
    msg = str(err.value)
    assert "custom code" in msg and "trust_remote_code=True" in msg and "--trust-remote-code" in msg
    assert not _cached_modules(remote_ckpt)  # the checkpoint's code was not copied anywhere, let alone run
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["inspect", str(remote_ckpt)]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not _cached_modules(remote_ckpt)


def test_remote_code_loads_with_the_opt_in(remote_ckpt, capsys):
    model, _ = load_model(str(remote_ckpt), trust_remote_code=True)
    assert type(model).__name__ == "RemoteTinyForCausalLM"
    ad = get_adapter(model)  # an unknown model_type: discovered
    assert ad.spec.blocks == "model.layers" and ad.num_layers == 2
    assert main(["inspect", str(remote_ckpt), "--trust-remote-code", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["class"] == "RemoteTinyForCausalLM" and out["source"] == "discovered"
    # prune takes the same opt-in: without it refused (exit 2, nothing written), with it exported
    out_dir = remote_ckpt.parent / "pruned"
    assert main(["prune", str(remote_ckpt), "--blocks", "1", "-o", str(out_dir)]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err and not out_dir.exists()
    assert main(["prune", str(remote_ckpt), "--blocks", "1", "-o", str(out_dir), "--trust-remote-code"]) == 0
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 1
