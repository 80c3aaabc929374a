"""Shared helpers of the end-to-end benchmark scripts: machine/version stamps and peak RSS."""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def load_average() -> str:
    """The machine's load when a run starts and ends: timings taken on a shared machine say so."""
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def stamp_dict() -> dict:
    """When, where, with what and at which commit a figure was measured (dirty: uncommitted changes)."""
    from shortllm.io.stamp import versions  # the versions every shortllm artifact records

    cpu = platform.processor() or ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here).stdout.strip() or "?"
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=here).stdout.strip())
    except OSError:
        commit, dirty = "?", True
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), **versions(), "commit": commit, "dirty": dirty}


def stamp() -> str:
    s = stamp_dict()
    return (f"{s['date']}; {s['cpu']}, {s['cores']} cores; python {s['python']}, torch {s['torch']}, "
            f"transformers {s['transformers']}; commit {s['commit']}{' (dirty tree)' if s['dirty'] else ''}")


def run_child(script: str, *args: str, exact_rss: bool = False) -> str:
    """Run `script` in a fresh interpreter (so its peak RSS is its own) and return its stdout.

    exact_rss: a fixed glibc mmap threshold, so every allocation of 128 KB or more is its own mapping,
    returned to the system when freed; the peak RSS then follows the peak of live tensor bytes instead of
    what the allocator happened to keep cached (without it, repeated runs of one method differ by ~50 MB)."""
    env = dict(os.environ)
    if exact_rss:
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{script} {args} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def write_report(path, text: str) -> None:
    """Write a results file atomically (a reader never sees half a report) and print it."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)
    print(text)


def share_of_all_params(model, ratio: float, ratio_of: str) -> float:
    """A removal ratio as the share of ALL parameters (what the planners take). ``ratio_of="blocks"`` reads
    `ratio` as a share of the decoder blocks' parameters: on small models with large vocabularies
    (Gemma-3-270M: embeddings 63% of the weights) a share of all parameters would remove almost every block."""
    from shortllm.model.adapters import get_adapter
    from shortllm.pruning.sizes import count_params

    if ratio_of == "params":
        return float(ratio)
    if ratio_of != "blocks":
        raise ValueError(f"ratio_of must be 'params' or 'blocks', not {ratio_of!r}")
    blocks = sum(count_params(b) for b in get_adapter(model).blocks())
    return float(ratio) * blocks / count_params(model)
