"""Command-line behaviour shared by the subcommands: dtype-blind fingerprints across score/prune, each rank's own
device, outputs checked before any work."""
from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import make_bpe_tokenizer
from tiny_models import make_tiny

from shortllm.cli.app import main
from shortllm.cli.options import resolve_device


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16") / "tiny"
    make_tiny("llama", 6, seed=2).to(torch.bfloat16).save_pretrained(d)
    make_bpe_tokenizer().save_pretrained(d)
    (d.parent / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 80)
    return d


def _score_args(d, *extra):
    return ["score", str(d), "--data", str(d.parent / "calib.txt"), "--samples", "2", "--seq-len", "16", "-q",
            *extra]


@pytest.mark.parametrize("score_dtype", ["bfloat16", "float32"])
def test_offload_scores_of_a_bf16_checkpoint_are_accepted_by_prune(bf16_dir, tmp_path, score_dtype):
    """Scores computed out-of-core in one dtype are for the same weights as the checkpoint loaded in another."""
    scores = tmp_path / "s.json"
    assert main(_score_args(bf16_dir, "--offload", "disk", "--dtype", score_dtype, "--metrics", "bi,mag",
                            "-o", str(scores))) == 0
    for prune_dtype in ("float32", "bfloat16", "float64"):
        out = tmp_path / f"out-{prune_dtype}"
        assert main(["prune", str(bf16_dir), "--scores", str(scores), "--metric", "bi", "--remove", "2",
                     "--dtype", prune_dtype, "-o", str(out)]) == 0, prune_dtype
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["num_hidden_layers"] == 4 and cfg["dtype"] == prune_dtype


def test_fingerprint_is_dtype_blind_but_content_sensitive():
    from shortllm.model.fingerprint import weights_fingerprint

    m = make_tiny("llama", 2, seed=5).to(torch.bfloat16)
    fp = weights_fingerprint(m)
    assert weights_fingerprint(m.to(torch.float32)) == fp == weights_fingerprint(m.to(torch.float64))
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # the first sampled element of one weight
    assert weights_fingerprint(m) != fp


def test_score_and_in_memory_dtype_flag(bf16_dir, tmp_path):
    out = tmp_path / "s.json"
    assert main(_score_args(bf16_dir, "--metrics", "bi", "--dtype", "float64", "-o", str(out))) == 0
    assert json.loads(out.read_text())["meta"]["num_layers"] == 6


def test_distributed_ranks_use_their_local_device(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda", distributed=True) == "cuda:3"
    assert resolve_device("cuda:1", distributed=True) == "cuda:1"  # an explicit index is the user's choice
    assert resolve_device("cpu", distributed=True) == "cpu"
    assert resolve_device("cuda", distributed=False) == "cuda"


def test_distributed_score_puts_the_model_on_the_local_rank_device(bf16_dir, tmp_path, monkeypatch):
    """`--distributed --device cuda` loads the model on cuda:$LOCAL_RANK (checked through the loader's arguments;
    no GPU here) and initialises the process group with NCCL."""
    import torch.distributed as dist

    seen = {}

    class Stop(Exception):
        pass

    def fake_init(backend, **kw):
        seen["backend"] = backend

    def fake_load(name, **kw):
        seen["device"] = kw.get("device")
        raise Stop

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setattr("shortllm.model.loading.load_model", fake_load)
    with pytest.raises(Stop):
        main(_score_args(bf16_dir, "--distributed", "--device", "cuda", "-o", str(tmp_path / "s.json")))
    assert seen == {"backend": "nccl", "device": "cuda:1"}


@pytest.mark.parametrize("argv", [
    ["score", "MODEL", "-o", "/proc/shortllm-nope/s.json"],
    ["prune", "MODEL", "--blocks", "2", "-o", "/proc/shortllm-nope/out"],
    ["prune", "MODEL", "--blocks", "2", "-o", "OUT", "--plan-out", "/proc/shortllm-nope/p.json"],
    ["search", "MODEL", "--remove", "1", "-o", "/proc/shortllm-nope/p.json"],
    ["eval", "MODEL", "--tasks", "none", "-o", "/proc/shortllm-nope/e.json"],
    ["retrain", "MODEL", "--data", "ptb", "-o", "/proc/shortllm-nope/run"],
    ["demo", "-o", "/proc/shortllm-nope/demo"],
])
def test_unwritable_output_fails_before_any_work(argv, bf16_dir, tmp_path, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr("shortllm.model.loading.load_model", no_work)
    argv = [str(bf16_dir) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shortllm: error:") and "cannot be written" in err and err.count("\n") == 0
