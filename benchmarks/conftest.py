"""pytest-benchmark files are named bench_*.py (so `pytest tests/` never runs them); collect them when
pytest is pointed at this folder: `pytest benchmarks/ --benchmark-only`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collect_file(file_path: Path, parent):
    # only pytest-benchmark files (they define tests); the other bench_*.py here are plain scripts
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path)
            and "\ndef test_" in file_path.read_text(encoding="utf-8", errors="replace")):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
