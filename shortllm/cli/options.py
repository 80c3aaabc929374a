"""Options and checks shared by several subcommands: calibration data, dtype, device, output paths."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from shortllm.errors import OutputPathError, UsageError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def add_data_args(p: argparse.ArgumentParser, samples: int = 10, seq_len: int = 128) -> None:
    p.add_argument("--data", default="wikitext2", help="corpus name (wikitext2, ptb, c4) or a text file")
    p.add_argument("--split", default=None, help="corpus split (default: wikitext2 validation, ptb train)")
    p.add_argument("--samples", type=int, default=samples, help="number of calibration sequences")
    p.add_argument("--seq-len", type=int, default=seq_len, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("random", "contiguous"), default="random")


def load_data(args: argparse.Namespace, tokenizer):
    from shortllm.data.calibration import calibration_loader

    return calibration_loader(args.data, tokenizer, n_samples=args.samples, seq_len=args.seq_len,
                              batch_size=args.batch_size, seed=args.seed, mode=args.mode, split=args.split)


def add_dtype_arg(p: argparse.ArgumentParser, default: str = "float32") -> None:
    p.add_argument("--dtype", default=default, choices=sorted(DTYPES),
                   help=f"dtype the model is loaded and run in (default {default})")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default cpu)")


def resolve_device(device: str, distributed: bool = False) -> str:
    """The device of this process: with `--distributed`, a bare accelerator name means this rank's local one
    (`cuda` -> `cuda:$LOCAL_RANK`), so the ranks of one node never share `cuda:0`."""
    if distributed and device in ("cuda", "xpu", "npu"):
        return f"{device}:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def reject_unused(args: argparse.Namespace, when: str, names: dict[str, object]) -> None:
    """UsageError for each option of `names` (flag -> its "not given" value) that was given although it does
    not apply `when` (a phrase such as "with --offload disk")."""
    given = [flag for flag, unset in names.items() if getattr(args, flag.lstrip("-").replace("-", "_")) != unset]
    if given:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {when}; "
                         f"drop {'it' if len(given) == 1 else 'them'}")


def check_output_file(path: str | os.PathLike, flag: str = "-o") -> Path:
    """Fail before any work when a file cannot be created at `path` (its folder is made if missing)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputPathError(f"{flag} {p} is a directory; give a file path")
    _check_writable_dir(p.parent, flag, p)
    return p


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, flag: str = "-o") -> Path:
    """Fail before any work when the output folder exists (without overwrite) or cannot be created."""
    p = Path(path).expanduser()
    if p.exists() and not overwrite:
        raise OutputPathError(f"{flag} {p} already exists; choose another output dir or pass --overwrite")
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{flag} {p} exists and is not a directory; choose another output dir")
    _check_writable_dir(p.parent, flag, p)
    return p


def _check_writable_dir(folder: Path, flag: str, target: Path) -> None:
    probe = folder
    while not probe.exists():  # the first existing ancestor must let us create the missing folders
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(f"{flag} {target}: {probe} is a file, so the folder cannot be created; "
                              "choose another output path")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise OutputPathError(f"{flag} {target} cannot be written ({exc.strerror or exc}: {probe}); choose a "
                              "writable output path") from None


def write_scores(scores, out: Path) -> list[Path]:
    """scores.json + scores.md + scores.png side by side (each written atomically)."""
    from shortllm.io.atomic import atomic_write_text

    out = Path(out)
    scores.save(out)
    md = out.with_suffix(".md")
    atomic_write_text(md, f"# Block scores: {scores.meta.get('model_name')}\n\n"
                          f"Data: `{json.dumps(scores.meta.get('data'))}`, {scores.meta.get('n_tokens')} tokens.\n\n"
                          + scores.to_markdown())
    png = scores.plot(out.with_suffix(".png"))
    return [out, md, png]


def split_list(s: Optional[str], none_is_empty: bool = True) -> list[str]:
    items = [x.strip() for x in (s or "").split(",") if x.strip()]
    return [x for x in items if x.lower() != "none"] if none_is_empty else items


def add_trust_remote_code_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint's own Python code to run (off by default: it executes code from the "
                        "checkpoint)")
