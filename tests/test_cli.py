"""The `shortllm` command line: score and demo on the built-in model, errors as one line + exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shortllm.cli.app import main


def test_unknown_metric_is_one_line_exit_2(capsys, tmp_path):
    out = tmp_path / "s.json"
    code = main(["score", "smollm2-135m", "--metrics", "bi,fisher", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("shortllm: error:") and "fisher" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_debug_flag_shows_traceback(tmp_path):
    # cwd outside the checkout: `python -m` puts the cwd first on sys.path, which must not be a source tree
    proc = subprocess.run([sys.executable, "-m", "shortllm.cli", "--debug", "score", "smollm2-135m",
                           "--metrics", "nope", "-o", str(tmp_path / "s.json")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "MetricError" in proc.stderr


@pytest.mark.real_model
def test_score_cli_writes_json_markdown_png(tmp_path, capsys):
    out = tmp_path / "scores.json"
    code = main(["score", "smollm2-135m", "--data", "wikitext2", "--metrics", "bi,angular,mag", "--samples", "2",
                 "--seq-len", "32", "-q", "-o", str(out)])
    assert code == 0
    raw = json.loads(out.read_text())
    assert raw["meta"]["num_layers"] == 30 and set(raw["values"]) == {"bi", "angular", "mag"}
    assert out.with_suffix(".md").read_text().count("\n| ") == 31
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "bi ranking" in printed


@pytest.mark.real_model
@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    exe = Path(sys.executable).with_name("shortllm")  # the installed console script
    proc = subprocess.run([str(exe), "demo", "-o", str(tmp_path / "demo"), "--samples", "2", "--seq-len", "64", "-q"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["params_after"] < summary["params_before"]
    assert len(summary["removed_blocks"]) >= 1
    assert all(4 <= b < 28 for b in summary["removed_blocks"]), "Taylor+ protects the first 4 and last 2 blocks"
    assert summary["sample_after"].startswith("The capital of France is")
    assert (tmp_path / "demo" / "pruned" / "config.json").is_file()


@pytest.mark.real_model
def test_score_cli_offload_disk_equals_in_memory(tmp_path):
    args = ["--data", "wikitext2", "--metrics", "bi,mag", "--samples", "2", "--seq-len", "32", "-q"]
    assert main(["score", "smollm2-135m", *args, "-o", str(tmp_path / "mem.json")]) == 0
    assert main(["score", "smollm2-135m", "--offload", "disk", *args, "-o", str(tmp_path / "disk.json")]) == 0
    mem, disk = (json.loads((tmp_path / f).read_text()) for f in ("mem.json", "disk.json"))
    assert disk["meta"]["options"]["offload"] == "disk"
    for m in ("bi", "mag"):
        assert disk["values"][m] == pytest.approx(mem["values"][m], rel=1e-5), m
