"""Out-of-core (block-major) scoring benchmarks: `shortllm.offload.score_checkpoint`.

    python benchmarks/bench_offload.py smollm          # (a) SmolLM2-135M: out-of-core == in-memory, time ratio
    python benchmarks/bench_offload.py gen   DIR       # write a Llama-3-8B-shaped random bf16 checkpoint (~16 GB)
    python benchmarks/bench_offload.py block DIR       # time one block of it (estimate before the full run)
    python benchmarks/bench_offload.py score DIR --metrics bi,angular,mag,taylor   # peak RSS + time (JSON line)

The 8B checkpoint is written shard by shard (one block per shard, embeddings and head on their own), so
the generator never holds more than one shard in memory. Peak RSS of a scoring run is read from
/proc/self/status (VmHWM) of the process that scored.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def _save_shard(tensors: dict, path: Path) -> int:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def generate_llama3_8b_shaped(out: Path, seed: int = 0, layers: int | None = None) -> Path:
    """Random bf16 weights with the exact Llama-3-8B tensor shapes, one shard per block."""
    from transformers import LlamaConfig

    cfg = dict(LLAMA3_8B)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg)
    config.dtype = torch.bfloat16
    out.mkdir(parents=True, exist_ok=True)
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hd = d // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    n = config.num_hidden_layers
    g = torch.Generator().manual_seed(seed)
    std = 0.02

    def rnd(*shape, scale=std):
        t = torch.empty(shape, dtype=torch.bfloat16)
        rows = max(1, (1 << 24) // shape[-1])
        for s in range(0, shape[0], rows):  # fp32 scratch of at most 64 MB
            # no named temporary: the fp32 scratch is freed before the next chunk is drawn
            t[s:s + rows] = (torch.randn((min(rows, shape[0] - s),) + shape[1:], generator=g)
                             * scale).to(torch.bfloat16)
        return t

    def norm(dim):
        return (1.0 + 0.1 * torch.randn(dim, generator=g)).to(torch.bfloat16)

    names = [f"model-{i + 1:05d}-of-{n + 2:05d}.safetensors" for i in range(n + 2)]
    weight_map, total = {}, 0
    t0 = time.time()
    shards = [("embed", names[0])] + [(i, names[i + 1]) for i in range(n)] + [("head", names[-1])]
    for what, name in shards:
        if what == "embed":
            tensors = {"model.embed_tokens.weight": rnd(v, d)}
        elif what == "head":
            tensors = {"model.norm.weight": norm(d), "lm_head.weight": rnd(v, d)}
        else:
            p = f"model.layers.{what}."
            tensors = {p + "self_attn.q_proj.weight": rnd(d, d), p + "self_attn.k_proj.weight": rnd(kv, d),
                       p + "self_attn.v_proj.weight": rnd(kv, d),
                       p + "self_attn.o_proj.weight": rnd(d, d, scale=std / 4),
                       p + "mlp.gate_proj.weight": rnd(f, d), p + "mlp.up_proj.weight": rnd(f, d),
                       p + "mlp.down_proj.weight": rnd(d, f, scale=std / 4),
                       p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d)}
        path = out / name
        if not path.exists():  # resumable: a finished shard is never rewritten
            total += _save_shard(tensors, path)
        for k in tensors:
            weight_map[k] = name
        del tensors
        print(f"shard {name} done ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    size = sum((out / nm).stat().st_size for nm in names)
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(out)
    return out


def random_calibration(vocab: int, n: int = 4, seq: int = 128, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (1, seq), generator=g),
             "attention_mask": torch.ones(1, seq, dtype=torch.long)} for _ in range(n)]


def time_one_block(path: Path, n: int = 4, seq: int = 128) -> dict:
    """Read block 0, run the calibration through it forward, then forward+backward: the per-block cost."""
    from shortllm.scoring.engine import Engine
    from shortllm.scoring.offload import BlockLoader, OffloadScorer, capture_identity

    sc = OffloadScorer(path, ("bi",), n_max=None, angular_tokens="all", taylor_mode="exact", dtype=None,
                       device="cpu", attn_implementation=None, spill="memory", spill_dir=None, progress=False,
                       check_finite=True)
    eng = Engine(sc.model, sc.adapter, [], progress=False)
    data = random_calibration(sc.model.config.vocab_size, n, seq)
    ctxs = [eng._context(i, b) for i, b in enumerate(data)]
    from shortllm.scoring.offload import _outside_blocks
    for mod, prefix in _outside_blocks(sc.model, sc.adapter):
        sc.loader.load(mod, prefix, recurse=False)
    caps = [capture_identity(sc.model, sc.adapter, c) for c in ctxs]
    for emb in sc.adapter.embeddings():
        BlockLoader.free(emb)
    blk = sc.adapter.blocks()[0]
    t0 = time.time()
    sc.loader.load(blk, sc._block_prefix(0))
    t_read = time.time() - t0
    t0 = time.time()
    with torch.no_grad():
        outs = [calls[0].run(blk, h) for h, calls in caps]
    t_fwd = time.time() - t0
    names = [nm for nm, _ in sc.adapter.block_weights(blk)]
    BlockLoader.free(blk)
    sc.loader.load(blk, sc._block_prefix(0), requires_grad=names)
    t0 = time.time()
    for (h, calls), o in zip(caps, outs):
        x = h.detach().requires_grad_(True)
        y = calls[0].run(blk, x)
        torch.autograd.backward(y, torch.randn_like(o) * 1e-3)
    t_bwd = time.time() - t0
    L = sc.L
    return {"read_s": t_read, "fwd_s": t_fwd, "fwd_bwd_s": t_bwd, "blocks": L,
            "estimate_bi_angular_mag_taylor_s": L * (2 * t_read + t_fwd + t_bwd),
            "estimate_ppl_s": L * (t_read + t_fwd) + (L * (L - 1) / 2) * t_fwd,
            "peak_rss_gib": peak_rss_bytes() / 2**30}


def score_run(path: Path, metrics: str, n: int = 4, seq: int = 128, out: Path | None = None) -> dict:
    """Score in this process; report wall time and peak RSS (VmHWM)."""
    from transformers import AutoConfig

    from shortllm.scoring.offload import score_checkpoint

    vocab = AutoConfig.from_pretrained(path).vocab_size
    data = random_calibration(vocab, n, seq)
    t0 = time.time()
    scores = score_checkpoint(path, data, metrics=metrics)
    wall = time.time() - t0
    res = {"metrics": metrics, "tokens": n * seq, "wall_s": wall, "peak_rss_gib": peak_rss_bytes() / 2**30,
           "offload": scores.meta["offload"],
           "ranking": {m: scores.ranking(m)[:8] for m in scores.metrics}}
    if out is not None:
        scores.save(out)
    return res


def smollm_compare(n: int = 4, seq: int = 128) -> dict:
    """SmolLM2-135M: out-of-core scores == in-memory scores, and the time of each."""
    from shortllm.model.loading import builtin_checkpoint, load_model
    from shortllm.scoring.engine import score_fast
    from shortllm.scoring.offload import score_checkpoint

    ckpt = builtin_checkpoint("smollm2-135m")
    model = load_model("smollm2-135m", dtype=torch.float32)[0]
    attn = model.config._attn_implementation
    data = random_calibration(model.config.vocab_size, n, seq)
    mets = ("bi", "angular", "mag", "taylor", "ppl")
    t0 = time.time()
    mem = score_fast(model, data, metrics=mets, progress=False)
    t_mem = time.time() - t0
    del model
    t0 = time.time()
    off = score_checkpoint(ckpt, data, metrics=mets, dtype=torch.float32,
                           attn_implementation=attn, progress=False)
    t_off = time.time() - t0
    diffs = {}
    for m in mets:
        a, b = mem.values[m], off.values[m]
        ok = ~torch.isnan(a)
        diffs[m] = float(((a - b).abs()[ok] / a.abs()[ok].clamp_min(1e-30)).max())
    return {"tokens": n * seq, "in_memory_s": t_mem, "offload_s": t_off, "ratio": t_off / t_mem,
            "max_rel_diff": diffs, "same_ranking": {m: mem.ranking(m) == off.ranking(m) for m in mets},
            "fingerprint_equal": mem.meta["fingerprint"] == off.meta["fingerprint"],
            "offload_meta": off.meta["offload"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("smollm", "gen", "block", "score"))
    ap.add_argument("dir", nargs="?", default="/work/bigckpt")
    ap.add_argument("--metrics", default="bi,angular,mag,taylor")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--save", default=None, help="write the scores JSON here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.what == "gen":
        generate_llama3_8b_shaped(Path(args.dir))
        res = {"generated": args.dir}
    elif args.what == "block":
        res = time_one_block(Path(args.dir), args.n, args.seq)
    elif args.what == "score":
        res = score_run(Path(args.dir), args.metrics, args.n, args.seq, Path(args.save) if args.save else None)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import stamp_dict

        # kept, stamped: the next offload section is rendered from these lines, not typed by hand
        with open(Path(__file__).resolve().parent / "results" / "offload_runs.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({**res, "checkpoint": args.dir, "stamp": stamp_dict()}) + "\n")
    else:
        res = smollm_compare(args.n, args.seq)
        _write_smollm_report(res)
    res["what"] = args.what
    print(json.dumps(res))


def _write_smollm_report(res: dict) -> None:
    """results/offload_smollm.{json,md}: the machine-written source of the README's out-of-core row."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import stamp, stamp_dict

    out = Path(__file__).resolve().parent / "results"
    res = {**res, "stamp": stamp_dict()}
    (out / "offload_smollm.json").write_text(json.dumps(res, indent=1))
    rows = "\n".join(f"| {m} | {res['max_rel_diff'][m]:.2e} | {res['same_ranking'][m]} |" for m in res["max_rel_diff"])
    (out / "offload_smollm.md").write_text(
        "## Out-of-core equals in-memory (SmolLM2-135M, fp32)\n\n"
        f"Measured {stamp()}. Script: `python benchmarks/bench_offload.py smollm`; {res['tokens']} random tokens; "
        "`score_checkpoint` (block by block from the safetensors files) against `score_fast` on the loaded model.\n\n"
        "| metric | max relative difference | same ranking |\n|---|---|---|\n" + rows + "\n\n"
        f"Weights fingerprint equal: {res['fingerprint_equal']}. Time out-of-core ÷ in-memory: {res['ratio']:.2f} "
        f"({res['offload_s']:.1f} s vs {res['in_memory_s']:.1f} s).\n")


if __name__ == "__main__":
    main()
