"""The FSDP and DeepSpeed accelerate configs of docs/retrain.md: they parse and build, and on CPU a launch with the
FSDP one stops with a clear error (accelerate 1.15 enables FSDP only on accelerators) instead of silently
running DDP. The FSDP training path itself needs a GPU (see docs/retrain.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "accelerate"


def test_fsdp_config_parses_and_builds_the_plugin(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    cfg = load_config_from_file(str(DOCS / "fsdp.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.num_processes == 2
    # what `accelerate launch` exports for this file (fsdp_x -> FSDP_X), read back by the plugin
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for k, v in cfg.fsdp_config.items():
        monkeypatch.setenv(k.upper(), str(v).lower() if isinstance(v, bool) else str(v))
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
    assert plugin.auto_wrap_policy is not None and not plugin.cpu_ram_efficient_loading


def test_deepspeed_config_parses():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(DOCS / "deepspeed.yaml"))
    assert cfg.distributed_type == DistributedType.DEEPSPEED and cfg.deepspeed_config["zero_stage"] == 3
    assert cfg.mixed_precision == "bf16"


def test_fsdp_launch_on_cpu_is_refused_not_silently_ddp(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: FSDP would run")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cfg": {"method": "cpt", "steps": 2, "seq_len": 32, "micro_batch_size": 2,
                                        "eval_max_examples": 2, "heldout_fraction": 0.1},
                                "out": str(tmp_path / "o.json"), "weights": str(tmp_path / "w.safetensors")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DOCS / "fsdp.yaml"),
                           "--num_processes", "2", str(HERE / "retrain_helpers.py"), str(spec)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and not (tmp_path / "o.json").exists()
    assert "asks for FSDP (ACCELERATE_USE_FSDP=true) but accelerate runs MULTI_CPU" in proc.stderr, \
        proc.stderr[-3000:]
