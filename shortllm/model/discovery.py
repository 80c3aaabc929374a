"""Architecture discovery for a causal LM whose `model_type` has no registry entry.

The registry (`adapters.REGISTRY`) names each architecture's modules by hand. For anything else this
module reads the same facts off the model itself: the module tree gives the candidates, and ONE traced
forward on a 4-token input (forward pre/post hooks on every module) tells which of them actually run, in
which order, and what they return (plus one call of `model.base_model` alone when the causal LM's forward
bypasses it, since that is the call the scorer makes):

- blocks: the nn.ModuleList with one element per layer (the config's layer count) whose elements run
  exactly once each, in index order, and form a residual chain (block i+1's input is block i's output);
- embeddings: the parameterised modules outside the blocks that run before block 0;
- final norm / head extras: the parameterised modules outside the blocks that run between the last block
  and the LM head (`get_output_embeddings()`); the final norm may be absent;
- the head is checked, not assumed: lm_head(extras(final_norm(last block output))) with the config's
  `final_logit_softcapping` / `logit_scale` (what `Adapter.head_params` reproduces) must equal the model's
  own logits, or the chunked loss of Taylor / PPL would score another model;
- per block: the attention (or mixer) branch and the MLP (or MoE) branch among the block's children, and
  each branch's output projection: a Linear whose output IS the branch output, so zeroing its weight and
  bias removes the branch exactly. A branch without one (an MoE that sums experts) gets no projection, and
  removing that branch is refused by prune rather than done wrongly.

Nothing is inferred from a module's name where a measurement exists; names only classify a block's
children into attention-like and MLP-like branches. Anything that cannot be found raises an
UnsupportedModelError naming the part and the `get_adapter(model, <part>=...)` override. This module must
not import `shortllm.model.adapters` (which imports it): it returns plain field values for an ArchSpec.
"""
from __future__ import annotations

import inspect
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from shortllm.errors import UnsupportedModelError
from shortllm.model.layer_config import depth_config, layer_count, override_hint, per_layer_lists

_ATTN_WORDS = ("attn", "attention", "mixer", "mamba", "ssm", "recurrent", "rwkv", "time_mix", "token_mix",
               "linear_attn", "conv", "mixing")
_MLP_WORDS = ("mlp", "moe", "feed_forward", "feedforward", "ffn", "ff", "expert", "channel_mix", "sparse")
_TRACE_LEN = 4

_CACHE: "weakref.WeakKeyDictionary[nn.Module, Discovery]" = weakref.WeakKeyDictionary()


@dataclass
class BlockBranches:
    """What one block holds (paths relative to the block; "" when absent)."""

    attn: str = ""
    mlp: str = ""
    attn_out: str = ""
    mlp_out: str = ""
    block_class: str = ""


@dataclass
class Discovery:
    """What discovery found: `spec_fields` are ArchSpec keyword arguments; the rest is the evidence."""

    spec_fields: dict
    num_layers: int
    block_branches: list[BlockBranches] = field(default_factory=list)
    head_transforms: dict = field(default_factory=dict)


def _first_tensor(x) -> Optional[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state") and isinstance(x.last_hidden_state, torch.Tensor):
        return x.last_hidden_state
    return None


def _is_norm(mod: nn.Module) -> bool:
    if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    name = type(mod).__name__.lower()
    return "norm" in name


def _has_params(mod: nn.Module) -> bool:
    return next(mod.parameters(), None) is not None


def _linear_like(mod: nn.Module) -> bool:
    """Whose output is x @ W (+ b): zeroing weight and bias zeroes the output exactly."""
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


class _Trace:
    """Pre/post events of every module in one forward, with each module's first tensor input and output."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.events: list[tuple[str, str]] = []
        self.inputs: dict[str, list] = {}
        self.outputs: dict[str, list] = {}
        self.handles = []
        self.ids: Optional[torch.Tensor] = None
        for mod in model.modules():
            self.handles.append(mod.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._post))

    def _pre(self, mod, args, kwargs):
        name = self.names.get(id(mod))
        if name is not None:
            self.events.append(("pre", name))
            x = _first_tensor(args[0] if args else kwargs.get("hidden_states"))
            self.inputs.setdefault(name, []).append(None if x is None else x.detach().clone())

    def _post(self, mod, _args, out):
        name = self.names.get(id(mod))
        if name is not None:
            self.events.append(("post", name))
            t = _first_tensor(out)
            # cloned: a caller may add into this output in place (Llama-4's shared expert + routed experts),
            # and the stored value must be what this module returned
            self.outputs.setdefault(name, []).append(None if t is None else t.detach().clone())

    def remove(self):
        for h in self.handles:
            h.remove()

    def first(self, kind: str, name: str) -> Optional[int]:
        for i, ev in enumerate(self.events):
            if ev == (kind, name):
                return i
        return None

    def last(self, kind: str, name: str) -> Optional[int]:
        for i in range(len(self.events) - 1, -1, -1):
            if self.events[i] == (kind, name):
                return i
        return None


def _run_trace(model: nn.Module, vocab: int) -> tuple[_Trace, torch.Tensor]:
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    # ids 1..4 avoid the usual pad id 0; modulo keeps them valid for any vocabulary
    ids = (torch.arange(1, _TRACE_LEN + 1, device=device) % max(vocab, 1)).unsqueeze(0)
    trace = _Trace(model)
    trace.ids = ids
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except Exception as e:  # noqa: BLE001 - any failure of a foreign forward becomes one typed error
        raise UnsupportedModelError(
            f"{type(model).__name__}: the discovery forward (input_ids of shape [1, {_TRACE_LEN}], use_cache=False) "
            f"failed ({type(e).__name__}: {e}); " + override_hint("blocks")) from e
    finally:
        trace.remove()
        model.train(was_training)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = _first_tensor(out)
    return trace, logits


def _find_blocks(model: nn.Module, trace: _Trace, L: int) -> str:
    candidates = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == L]
    ok = []
    for path in candidates:
        prefix = f"{path}." if path else ""
        order = [int(n[len(prefix):]) for kind, n in trace.events
                 if kind == "pre" and n.startswith(prefix) and n[len(prefix):].isdigit()]
        if order == list(range(L)):
            ok.append(path)
    if not ok:
        found = ", ".join(f"{n} (len {len(m)})" for n, m in model.named_modules()
                          if isinstance(m, nn.ModuleList)) or "none"
        raise UnsupportedModelError(
            f"{type(model).__name__}: no nn.ModuleList of {L} blocks (the config's layer count) whose blocks each "
            f"run once, in order (module lists: {found}); " + override_hint("blocks"))
    # several qualifying lists (a per-layer list of norms beside the blocks): the blocks hold the most weights
    return max(ok, key=lambda p: sum(x.numel() for x in model.get_submodule(p).parameters()))


def _top_level(names: list[str]) -> list[str]:
    """Drop every name inside another name of the list (keep the outermost modules), keeping order."""
    out = []
    for n in names:
        if not any(n.startswith(o + ".") for o in names if o != n):
            out.append(n)
    return out


def _module_path(model: nn.Module, target: nn.Module) -> Optional[str]:
    for n, m in model.named_modules():
        if m is target:
            return n
    return None


def _check_chain(trace: _Trace, blocks: str, L: int) -> None:
    for i in range(L - 1):
        out = trace.outputs.get(f"{blocks}.{i}", [None])[0]
        nxt = trace.inputs.get(f"{blocks}.{i + 1}", [None])[0]
        if out is None or nxt is None or out.shape != nxt.shape or not torch.equal(out, nxt):
            raise UnsupportedModelError(
                f"blocks at '{blocks}': block {i + 1}'s input is not block {i}'s output, so removing a block "
                "is not bypassing it (the model transforms the stream between blocks); "
                + override_hint("blocks"))


def _block_branches(model: nn.Module, trace: _Trace, blocks: str, i: int) -> BlockBranches:
    path = f"{blocks}.{i}"
    block = model.get_submodule(path)
    ran = []
    for name, child in block.named_children():
        full = f"{path}.{name}"
        if full in trace.outputs and _has_params(child) and not _is_norm(child):
            ran.append((trace.first("pre", full), name, child))
    ran.sort(key=lambda t: t[0])
    attn = mlp = ""

    def words(name, child):
        return f"{name.lower()} {type(child).__name__.lower()}"

    for _, name, child in ran:
        w = words(name, child)
        if not attn and any(k in w for k in _ATTN_WORDS) and not any(k in name.lower() for k in ("mlp", "moe")):
            attn = name
        elif not mlp and any(k in w.replace("attention", "") for k in _MLP_WORDS):
            mlp = name
    if not attn and not mlp and len(ran) == 2:
        attn, mlp = ran[0][1], ran[1][1]
    return BlockBranches(attn=attn, mlp=mlp, attn_out=_out_proj(model, trace, path, attn),
                         mlp_out=_out_proj(model, trace, path, mlp), block_class=type(block).__name__)


def _out_proj(model: nn.Module, trace: _Trace, block_path: str, branch: str) -> str:
    """The Linear whose (single-call) output is exactly the branch's output, relative to the block."""
    if not branch:
        return ""
    full = f"{block_path}.{branch}"
    outs = trace.outputs.get(full, [])
    if len(outs) != 1 or outs[0] is None:
        return ""
    target = outs[0]
    best = ""
    for name, mod in model.get_submodule(full).named_modules():
        sub = f"{full}.{name}" if name else full
        if not name or not _linear_like(mod):
            continue
        got = trace.outputs.get(sub, [])
        if len(got) == 1 and got[0] is not None and got[0].shape == target.shape and torch.equal(got[0], target):
            best = f"{branch}.{name}"
    return best


def _head_transforms(cfg, dcfg) -> dict:
    # what Adapter.head_params reproduces: logits = softcap * tanh(scale * (W h + b) / softcap)
    def get(name):
        return getattr(cfg, name, None) or getattr(dcfg, name, None)
    return {"softcap": float(get("final_logit_softcapping") or 0.0), "scale": float(get("logit_scale") or 1.0)}


def _check_head(model, trace: _Trace, blocks: str, L: int, final_norm: str, head_extra: tuple, lm_head: str,
                logits: torch.Tensor, transforms: dict) -> None:
    h = trace.outputs.get(f"{blocks}.{L - 1}", [None])[0]
    if h is None or logits is None:
        raise UnsupportedModelError(f"{type(model).__name__}: could not observe the last block's output or the "
                                    "logits in the discovery forward; " + override_hint("final_norm"))
    with torch.no_grad():
        for p in ((final_norm,) if final_norm else ()) + head_extra:
            h = _first_tensor(model.get_submodule(p)(h))
        z = model.get_submodule(lm_head)(h).float() * transforms["scale"]
        if transforms["softcap"]:
            z = transforms["softcap"] * torch.tanh(z / transforms["softcap"])
    ref = logits.float()
    tol = 1e-3 * max(1.0, float(ref.abs().max()))
    if z.shape != ref.shape or not torch.allclose(z, ref, rtol=1e-3, atol=tol):
        diff = float((z - ref).abs().max()) if z.shape == ref.shape else f"shape {tuple(z.shape)} vs {tuple(ref.shape)}"
        raise UnsupportedModelError(
            f"{type(model).__name__}: the model's logits are not {lm_head}({' -> '.join(head_extra) or ''}"
            f"{final_norm or 'no final norm'}(last block output)) with final_logit_softcapping / logit_scale "
            f"(max difference {diff}): it applies a head transform shortllm does not reproduce, so Taylor and "
            "PPL would score another model; " + override_hint("final_norm"))


def _check_base_model(model: nn.Module, trace: _Trace, lm_head: str) -> None:
    """The scorer runs `model.base_model` and feeds its first output to the LM head: that must be the head's
    input. A causal LM whose base_model_prefix names no submodule has base_model == itself (its first output
    would be the logits)."""
    base = getattr(model, "base_model", None)
    path = _module_path(model, base) if base is not None else None
    if not path:
        raise UnsupportedModelError(
            f"{type(model).__name__}: model.base_model is the causal LM itself (base_model_prefix="
            f"{getattr(model, 'base_model_prefix', '')!r} names no submodule), so the scorer cannot run the backbone "
            "alone to get the LM head's input")
    out = trace.outputs.get(path, [None])[0]
    if out is None:
        # the causal LM's forward may skip its base model (OPT calls model.decoder directly): run the call the
        # scorer makes
        with torch.no_grad():
            out = _first_tensor(base(input_ids=trace.ids, attention_mask=torch.ones_like(trace.ids), use_cache=False))
    head_in = trace.inputs.get(lm_head, [None])[0]
    if out is None or head_in is None or out.shape != head_in.shape or not torch.allclose(out, head_in):
        raise UnsupportedModelError(
            f"{type(model).__name__}: the first output of model.base_model ('{path}') is not the input of the LM "
            f"head ('{lm_head}'), so the scorer's loss would not be the model's; " + override_hint("final_norm"))


_INDEX_WORDS = ("index", "indices", "selected")
_WEIGHT_WORDS = ("weight", "score", "prob")


def _num_experts(mod: nn.Module) -> int:
    n = getattr(mod, "num_experts", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    lead = {p.shape[0] for p in mod.parameters(recurse=False) if p.dim() == 3}
    return lead.pop() if len(lead) == 1 else 0


def _routed_signature(mod: nn.Module) -> bool:
    try:
        params = list(inspect.signature(mod.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    pos = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (len(pos) >= 3 and any(w in pos[1].name.lower() for w in _INDEX_WORDS)
            and any(w in pos[2].name.lower() for w in _WEIGHT_WORDS))


def expert_modules(block: nn.Module) -> list[tuple[str, int]]:
    """(path relative to the block, number of experts) of each routed-experts module of a block: a module that
    holds the experts (a `num_experts` attribute, or 3-D parameters with one leading entry per expert) and whose
    forward takes (hidden_states, expert indices, routing weights), the router's top-k selection. That is
    transformers' interface for Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, gpt-oss and most MoE families,
    fused 3-D expert weights included; the router itself is whatever produced the selection (its output
    is seen where the experts receive it, after any top-k renormalisation or scaling). Empty for a dense
    block, and for MoE layouts that do not route through such a call (Llama-4 scales inputs before its
    experts; a ModuleList of expert MLPs called one by one)."""
    out = []
    for name, mod in block.named_modules():
        if not name or any(name.startswith(o + ".") for o, _ in out):
            continue
        n = _num_experts(mod)
        if n and _routed_signature(mod):
            out.append((name, n))
    return out


def discover(model: nn.Module) -> Discovery:
    """Find the decoder blocks, embeddings, final norm, LM head and branches of `model` (cached per model)."""
    hit = _CACHE.get(model)
    if hit is not None:
        return hit
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no config; " + override_hint("blocks"))
    cfg_path, dcfg = depth_config(cfg)  # a multimodal wrapper's depth lives in its text_config
    key, L = layer_count(dcfg)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None); "
                                    "load it with AutoModelForCausalLM, or " + override_hint("lm_head"))
    lm_head = _module_path(model, head)
    vocab = int(head.weight.shape[0])
    trace, logits = _run_trace(model, vocab)
    blocks = _find_blocks(model, trace, L)
    _check_chain(trace, blocks, L)

    b0, b_end = trace.first("pre", f"{blocks}.0"), trace.last("post", f"{blocks}.{L - 1}")
    head_pre = trace.first("pre", lm_head)
    ancestors = {blocks.rsplit(".", j)[0] for j in range(1, blocks.count(".") + 1)} | {""}

    def outside(n: str) -> bool:
        return (n not in ancestors and n != blocks and not n.startswith(blocks + ".") and n != lm_head
                and not n.startswith(lm_head + "."))

    before = [n for i, (k, n) in enumerate(trace.events) if k == "pre" and i < b0 and outside(n)]
    after = [n for i, (k, n) in enumerate(trace.events)
             if k == "pre" and i > b_end and (head_pre is None or i < head_pre) and outside(n)]
    before = [n for n in _top_level(list(dict.fromkeys(before))) if _has_params(model.get_submodule(n))]
    # a final norm may have no weight (NanoChat's plain RMSNorm): keep norms even without parameters
    after = [n for n in _top_level(list(dict.fromkeys(after)))
             if _has_params(model.get_submodule(n)) or _is_norm(model.get_submodule(n))]
    final_norm = next((n for n in after if _is_norm(model.get_submodule(n))), "")
    head_extra = tuple(n for n in after if n != final_norm)
    if final_norm and head_extra and after.index(final_norm) > 0:
        raise UnsupportedModelError(f"{type(model).__name__}: modules {list(head_extra)} run between the last block "
                                    f"and the final norm '{final_norm}'; " + override_hint("final_norm"))
    was_training = model.training
    model.eval()
    try:
        _check_base_model(model, trace, lm_head)
    finally:
        model.train(was_training)
    transforms = _head_transforms(cfg, dcfg)
    _check_head(model, trace, blocks, L, final_norm, head_extra, lm_head, logits, transforms)

    per_block = [_block_branches(model, trace, blocks, i) for i in range(L)]

    def common(attr: str) -> str:
        vals = [getattr(b, attr) for b in per_block if getattr(b, attr)]
        return Counter(vals).most_common(1)[0][0] if vals else ""

    fields = {"blocks": blocks, "embeddings": tuple(before), "final_norm": final_norm, "lm_head": lm_head,
              "attn": common("attn"), "mlp": common("mlp"), "attn_out": common("attn_out"),
              "mlp_out": common("mlp_out"), "head_extra": head_extra, "final_norm_optional": not final_norm,
              "num_layers_key": key, "per_layer_config": per_layer_lists(dcfg, L), "config_path": cfg_path,
              "notes": "discovered from the module tree and one traced forward"}
    found = Discovery(spec_fields=fields, num_layers=L, block_branches=per_block, head_transforms=transforms)
    _CACHE[model] = found
    return found
