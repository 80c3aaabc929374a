"""Out-of-core (block-major) scoring straight from a sharded safetensors checkpoint equals in-memory
`score_fast` on the same checkpoint, for every metric, on several architectures; bad checkpoints raise
typed errors naming the file."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny_models import make_tiny, random_batch

from shortllm.errors import CheckpointError, DiskSpaceError, ModelLoadError, ShortLLMError
from shortllm.scoring import offload_state
from shortllm.scoring.engine import score_fast
from shortllm.scoring.offload import BlockLoader, score_checkpoint

ALL = ("bi", "angular", "mag", "taylor", "ppl")
# max relative difference allowed between out-of-core and in-memory scores, by compute dtype
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}


def _data():
    # two batches (exact Taylor accumulates over them), odd lengths, right padding in the first
    return [random_batch(3, 17, seed=11), random_batch(2, 13, seed=12, pad=False)]


def _save(tmp: Path, arch: str, dtype=torch.float32, layers: int = 4) -> tuple[Path, torch.nn.Module]:
    model = make_tiny(arch, num_layers=layers, seed=3, dtype=dtype)
    d = tmp / f"{arch}-{str(dtype)[6:]}"
    model.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists(), "the checkpoint must be sharded for these tests"
    ref = tf.AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="eager").eval()
    return d, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN pattern differs"
    ok = ~torch.isnan(a)
    return float(((a - b).abs()[ok] / a.abs()[ok].clamp_min(1e-30)).max()) if bool(ok.any()) else 0.0


def _assert_same(mem, off, dtype, metrics=ALL):
    tol = TOLERANCE[dtype]
    for m in metrics:
        assert m in off.values, f"offload scores lack {m}"
        rel = _rel(mem.values[m], off.values[m])
        assert rel <= tol, f"{m}: out-of-core differs from in-memory by {rel:.3g} (tolerance {tol:g})"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_offload_equals_in_memory(tmp_path, arch):
    d, ref = _save(tmp_path, arch)
    data = _data()
    mem = score_fast(ref, data, metrics=ALL, progress=False)
    off = score_checkpoint(d, data, metrics=ALL, attn_implementation="eager", progress=False)
    _assert_same(mem, off, torch.float32)
    assert off.meta["fingerprint"] == mem.meta["fingerprint"], "scores must be usable with the loaded model"
    assert off.meta["n_tokens"] == mem.meta["n_tokens"]
    assert off.meta["offload"]["bytes_read"] > 0 and not off.meta["offload"]["spilled"]
    # rankings are what pruning consumes
    for m in ALL:
        assert off.ranking(m) == mem.ranking(m), m


def test_float64_and_physical_deletion(tmp_path):
    """float64: equal to score_fast to 1e-9, and PPL equal to rebuilding the model without block i."""
    from shortllm.scoring.ppl import removal_ppl_naive

    d, ref = _save(tmp_path, "llama", torch.float64, layers=5)
    data = _data()
    mem = score_fast(ref, data, metrics=ALL, progress=False)
    off = score_checkpoint(d, data, metrics=ALL, attn_implementation="eager", progress=False)
    assert off.meta["options"]["dtype"] == "float64", "default compute dtype is the checkpoint's"
    _assert_same(mem, off, torch.float64)
    naive = removal_ppl_naive(ref, data)
    assert _rel(naive, off.values["ppl"]) <= 1e-9


def test_options_spill_and_one_block_at_a_time(tmp_path, monkeypatch):
    """angular 'last' tokens, streaming Taylor, float32 compute of a float64 checkpoint, states spilled to
    disk; never more than one block materialised; the spill directory is removed afterwards."""
    d, _ = _save(tmp_path, "qwen2", torch.float64)
    ref = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    data = _data()
    live = []
    orig_load = BlockLoader.load

    def counting_load(self, module, prefix, *a, **kw):
        orig_load(self, module, prefix, *a, **kw)
        blocks = self.model.model.layers
        live.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks))

    monkeypatch.setattr(BlockLoader, "load", counting_load)
    spill = tmp_path / "spill"
    opts = dict(angular_tokens="last", taylor_mode="streaming", n_max=2)
    mem = score_fast(ref, data, metrics=ALL, progress=False, **opts)
    off = score_checkpoint(d, data, metrics=ALL, dtype=torch.float32, attn_implementation="eager", spill="disk",
                           spill_dir=spill, progress=False, **opts)
    _assert_same(mem, off, torch.float32)
    assert off.values["angular"].shape == (2, 4)
    assert max(live) == 1, f"at most one block may be resident, saw {max(live)}"
    assert off.meta["offload"]["spilled"] and off.meta["offload"]["spill_bytes_written"] > 0
    assert spill.is_dir() and not any(spill.iterdir()), "spilled states must be deleted"


def test_single_file_checkpoint(tmp_path):
    model = make_tiny("gpt_neox", num_layers=3, seed=5)
    d = tmp_path / "single"
    model.save_pretrained(d)  # one model.safetensors; the LM head is stored as `embed_out` (a renamed key)
    assert (d / "model.safetensors").exists()
    data = [random_batch(2, 9, seed=4)]
    off = score_checkpoint(d, data, metrics=("bi", "mag", "ppl"), dtype=torch.float64, spill="memory",
                           attn_implementation="eager", progress=False)
    ref = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager").eval()
    mem = score_fast(ref, data, metrics=("bi", "mag", "ppl"), progress=False)
    _assert_same(mem, off, torch.float64, ("bi", "mag", "ppl"))


# ---- bad checkpoints ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good") / "llama"
    make_tiny("llama", num_layers=2, seed=1).save_pretrained(d, max_shard_size="20KB")
    return d


@pytest.fixture
def ckpt(good_ckpt, tmp_path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, d)
    return d


def _weight_map(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


def _score(d: Path, **kw):
    return score_checkpoint(d, [random_batch(2, 9)], metrics=("bi", "ppl"), progress=False, **kw)


def test_index_lists_absent_shard(ckpt):
    shard = _weight_map(ckpt)["model.layers.1.mlp.up_proj.weight"]
    (ckpt / shard).unlink()
    with pytest.raises(ModelLoadError, match=shard):
        _score(ckpt)


def test_missing_shard_without_index(ckpt):
    names = sorted(set(_weight_map(ckpt).values()))
    (ckpt / "model.safetensors.index.json").unlink()
    (ckpt / names[1]).unlink()
    with pytest.raises(ModelLoadError, match=names[1]):
        _score(ckpt)


def test_config_does_not_match_tensors(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the tensors were saved with 128
    (ckpt / "config.json").write_text(json.dumps(cfg))
    shard = _weight_map(ckpt)["model.layers.0.mlp.gate_proj.weight"]  # the first mismatching tensor
    with pytest.raises(CheckpointError, match=shard) as exc:
        _score(ckpt)
    assert "[128, 64]" in str(exc.value) and "[96, 64]" in str(exc.value)


def test_config_names_tensors_the_checkpoint_lacks(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.layers.2"):
        _score(ckpt)


def test_truncated_shard(ckpt):
    shard = ckpt / _weight_map(ckpt)["model.layers.0.self_attn.q_proj.weight"]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=shard.name):
        _score(ckpt)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        _score(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="safetensors"):
        _score(tmp_path / "empty")


def test_not_enough_disk_for_spilled_states(ckpt, tmp_path, monkeypatch):
    spill = tmp_path / "small-disk"
    real = shutil.disk_usage

    def tiny_disk(path):
        u = real(path)
        return type(u)(u.total, u.total - 1000, 1000)

    monkeypatch.setattr(offload_state.shutil, "disk_usage", tiny_disk)
    with pytest.raises(DiskSpaceError, match=str(spill)) as exc:
        _score(ckpt, spill="disk", spill_dir=spill)
    assert isinstance(exc.value, ShortLLMError) and isinstance(exc.value, OSError)


@pytest.mark.real_model
def test_smollm2_offload_equals_in_memory(smollm2):
    from shortllm.model.loading import builtin_checkpoint

    model, _ = smollm2
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, model.config.vocab_size, (1, n), generator=g),
             "attention_mask": torch.ones(1, n, dtype=torch.long)} for n in (24, 19)]
    mets = ("bi", "angular", "mag", "taylor", "ppl")
    mem = score_fast(model, data, metrics=mets, progress=False)
    off = score_checkpoint(builtin_checkpoint("smollm2-135m"), data, metrics=mets, dtype=torch.float32,
                           attn_implementation=model.config._attn_implementation, progress=False)
    _assert_same(mem, off, torch.float32, mets)
    assert off.meta["fingerprint"] == mem.meta["fingerprint"]
    assert math.isfinite(float(off.values["ppl"].min()))
