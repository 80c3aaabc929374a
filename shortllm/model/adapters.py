"""Architecture adapters: where the decoder blocks, embeddings, final norm, LM head and each block's
attention / MLP branches live in a Hugging Face causal LM.

Registry keyed by `config.model_type`; anything else is discovered (`shortllm.model.discovery`: the module
tree plus one traced forward) or works by passing dotted paths:

    get_adapter(model, blocks="transformer.blocks", final_norm="transformer.norm_f", embeddings="transformer.wte")

Nothing here runs a forward: the scorer works through hooks on these modules, so adding an architecture
means naming its modules, never re-implementing its forward.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from shortllm.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """Dotted paths (from the top-level *ForCausalLM module, or from a block for the branch fields)."""

    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_out: str = "self_attn.o_proj"
    mlp_out: str = "mlp.down_proj"
    # modules applied between the final norm and the LM head (OPT's project_out)
    head_extra: tuple[str, ...] = ()
    # the model may be built without a final norm: OPT with do_layer_norm_before=False (opt-350m, whose
    # blocks end in their own LayerNorm) or _remove_final_layer_norm sets the attribute to None and its
    # forward skips it. Only a path that exists and holds None counts as "no final norm"; a missing
    # attribute is still a wrong path.
    final_norm_optional: bool = False
    # config flag that is False when every branch ends in a norm of the residual stream itself
    # (post-layer-norm blocks: OPT's do_layer_norm_before)
    pre_norm_flag: str = ""
    num_layers_key: str = "num_hidden_layers"
    # where in the config the depth entries live: "" (the config itself) or a multimodal wrapper's sub-config
    # ("text_config"); num_layers_key and per_layer_config are attributes of that config
    config_path: str = ""
    # config entries that hold one value per layer and must follow a depth change
    per_layer_config: tuple[str, ...] = ()
    # config entries describing per-layer patterns that are not plain lists (handled by prune)
    notes: str = ""


_LLAMA_LIKE = ArchSpec(blocks="model.layers", embeddings=("model.embed_tokens",), final_norm="model.norm")

REGISTRY: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": dataclasses.replace(_LLAMA_LIKE, per_layer_config=("layer_types",),
                                 notes="max_window_layers is an index threshold, rewritten by prune"),
    "qwen3": dataclasses.replace(_LLAMA_LIKE, per_layer_config=("layer_types",),
                                 notes="max_window_layers is an index threshold, rewritten by prune"),
    "gemma": _LLAMA_LIKE,
    "gemma2": dataclasses.replace(_LLAMA_LIKE, per_layer_config=("layer_types",)),
    "gemma3_text": dataclasses.replace(_LLAMA_LIKE, per_layer_config=("layer_types",)),
    "phi3": _LLAMA_LIKE,
    "gpt2": ArchSpec(blocks="transformer.h", embeddings=("transformer.wte", "transformer.wpe"),
                     final_norm="transformer.ln_f", attn="attn", mlp="mlp", attn_out="attn.c_proj",
                     mlp_out="mlp.c_proj", num_layers_key="n_layer"),
    "opt": ArchSpec(blocks="model.decoder.layers",
                    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions",
                                "model.decoder.project_in"),
                    final_norm="model.decoder.final_layer_norm", head_extra=("model.decoder.project_out",),
                    attn="self_attn", mlp="fc2", attn_out="self_attn.out_proj", mlp_out="fc2",
                    final_norm_optional=True, pre_norm_flag="do_layer_norm_before"),
    "gpt_neox": ArchSpec(blocks="gpt_neox.layers", embeddings=("gpt_neox.embed_in",),
                         final_norm="gpt_neox.final_layer_norm", lm_head="lm_head",
                         attn="attention", mlp="mlp", attn_out="attention.dense", mlp_out="mlp.dense_4h_to_h"),
}

_ENCODER_ONLY = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                 "mpnet", "modernbert", "vit", "clip", "t5", "bart", "mbart", "pegasus", "whisper", "marian")


def resolve(root: nn.Module, path: str) -> Optional[nn.Module]:
    """Follow a dotted path; None when any component is missing (or is None, like OPT's project_out)."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _holds_none(root: nn.Module, path: str) -> bool:
    """Whether `path` names an attribute that exists and is None (a module the model was built without)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = resolve(root, parent_path) if parent_path else root
    return parent is not None and hasattr(parent, leaf) and getattr(parent, leaf) is None


def _supported_text() -> str:
    return (f"supported model_type values: {', '.join(sorted(REGISTRY))}. For another decoder-only model pass "
            "dotted paths, e.g. get_adapter(model, blocks='model.layers', embeddings='model.embed_tokens', "
            "final_norm='model.norm', lm_head='lm_head'), or shortllm.model.adapters.register(model_type, "
            "ArchSpec(...)); without either, the model is discovered from its module tree and one traced forward "
            "(shortllm.model.discovery; `shortllm inspect MODEL` shows what is found)")


@dataclass
class Adapter:
    """An ArchSpec bound to one model instance."""

    model: nn.Module
    spec: ArchSpec
    model_type: str = field(default="")

    # ---- whole-model parts ----
    @property
    def config(self):
        return self.model.config

    def depth_config(self):
        """The config holding the layer count and per-layer entries (the text sub-config of a wrapper)."""
        cfg = self.config
        for part in filter(None, self.spec.config_path.split(".")):
            cfg = getattr(cfg, part)
        return cfg

    def blocks(self) -> nn.ModuleList:
        return resolve(self.model, self.spec.blocks)

    @property
    def num_layers(self) -> int:
        return len(self.blocks())

    def embeddings(self) -> list[nn.Module]:
        return [m for m in (resolve(self.model, p) for p in self.spec.embeddings) if m is not None]

    def final_norm(self) -> Optional[nn.Module]:
        """The final norm; None for a model built without one (see ArchSpec.final_norm_optional)."""
        return resolve(self.model, self.spec.final_norm)

    @property
    def post_norm_blocks(self) -> bool:
        """Whether each branch ends in a norm of the residual stream itself, h -> norm(h + branch(h)) (OPT
        with do_layer_norm_before=False): a zeroed branch then still normalises the stream, which is not
        the branch removed."""
        flag = self.spec.pre_norm_flag
        return bool(flag) and not getattr(self.config, flag, True)

    def refuse_branch_removal(self) -> None:
        """UnsupportedModelError for models whose branches cannot be removed by zeroing them."""
        if self.post_norm_blocks:
            raise UnsupportedModelError(
                f"{self.model_type} with {self.spec.pre_norm_flag}=False (post-layer-norm blocks, the opt-350m "
                "layout) normalises the residual stream after each branch, so a zeroed branch still applies that "
                "LayerNorm: the branch would not be removed, and a plain checkpoint cannot express its removal. "
                "Remove whole blocks instead (a plan without branches)")

    def head_extra(self) -> list[nn.Module]:
        return [m for m in (resolve(self.model, p) for p in self.spec.head_extra) if m is not None]

    def lm_head(self) -> nn.Module:
        head = resolve(self.model, self.spec.lm_head)
        return head if head is not None else self.model.get_output_embeddings()

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """Residual stream after the last block -> the LM head's input (final norm, projections)."""
        norm = self.final_norm()
        if norm is not None:
            h = norm(h)
        for m in self.head_extra():
            h = m(h)
        return h

    def head_params(self) -> dict:
        """What the chunked cross-entropy needs to reproduce the model's logits exactly."""
        head = self.lm_head()
        cfg, dcfg = self.config, self.depth_config()
        softcap = getattr(cfg, "final_logit_softcapping", None) or getattr(dcfg, "final_logit_softcapping", None) or 0.0
        scale = getattr(cfg, "logit_scale", None) or getattr(dcfg, "logit_scale", None) or 1.0
        return {"weight": head.weight, "bias": getattr(head, "bias", None), "softcap": float(softcap),
                "scale": float(scale)}

    # ---- per-block parts ----
    def attn(self, block: nn.Module) -> nn.Module:
        return resolve(block, self.spec.attn)

    def mlp(self, block: nn.Module) -> nn.Module:
        return resolve(block, self.spec.mlp)

    def attn_out(self, block: nn.Module) -> nn.Module:
        return resolve(block, self.spec.attn_out)

    def mlp_out(self, block: nn.Module) -> nn.Module:
        return resolve(block, self.spec.mlp_out)

    def branch(self, block: nn.Module, kind: str) -> nn.Module:
        if kind not in ("attn", "mlp"):
            raise ValueError(f"branch kind must be 'attn' or 'mlp', got {kind!r}")
        return self.attn(block) if kind == "attn" else self.mlp(block)

    @staticmethod
    def block_weights(block: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Every weight of a block (projections, norms, routers, experts), never biases. seed-000 selects names
        containing 'weight', which on its Llama models is every non-bias parameter; transformers 5 stores fused
        MoE experts as 3-D parameters without 'weight' in their name (`experts.gate_up_proj`), and SSM blocks
        have `A_log`, `D`, ...: all weights, so the rule is "not a bias" (`dt_bias`, `e_score_correction_bias`
        excluded)."""
        return [(n, p) for n, p in block.named_parameters() if "bias" not in n.split(".")[-1]]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first real (non-meta) parameter: where its inputs go."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def register(model_type: str, spec: ArchSpec) -> None:
    """Add (or replace) the adapter of a `config.model_type`."""
    REGISTRY[model_type] = spec


def get_adapter(model: nn.Module, spec: Optional[ArchSpec] = None, **paths) -> Adapter:
    """The adapter of `model`: the registry entry of its model_type, updated with any dotted `paths`.

    Raises UnsupportedModelError for encoder-only / seq2seq / unknown models, listing what is supported.
    """
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", "") or ""
    if cfg is not None and (getattr(cfg, "is_encoder_decoder", False) or model_type in _ENCODER_ONLY):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not a decoder-only causal LM; depth pruning "
            f"here scores the blocks of causal LMs. {_supported_text()}")
    if spec is None:
        spec = REGISTRY.get(model_type)
        if spec is None and not paths:
            # the registry wins; discovery (one traced forward, cached per model) only fills its gaps
            from shortllm.model.discovery import discover

            spec = ArchSpec(**discover(model).spec_fields)
        if spec is None:
            missing = {"blocks", "final_norm"} - set(paths)
            if missing:
                raise UnsupportedModelError(f"for model_type={model_type!r} give at least blocks= and final_norm= "
                                            f"(missing {sorted(missing)}); " + _supported_text())
            spec = ArchSpec(blocks=paths["blocks"], embeddings=(), final_norm=paths["final_norm"])
    if paths:
        paths = {k: (tuple(v.split(",")) if k in ("embeddings", "head_extra") and isinstance(v, str) else v)
                 for k, v in paths.items() if v is not None}
        unknown = set(paths) - {f.name for f in dataclasses.fields(ArchSpec)}
        if unknown:
            raise UnsupportedModelError(f"unknown adapter path(s) {sorted(unknown)}; valid: "
                                        f"{[f.name for f in dataclasses.fields(ArchSpec)]}")
        spec = dataclasses.replace(spec, **paths)
    adapter = Adapter(model=model, spec=spec, model_type=model_type)
    blocks = adapter.blocks()
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedModelError(f"{type(model).__name__}: no decoder blocks at '{spec.blocks}' "
                                    f"(found {type(blocks).__name__}); " + _supported_text())
    # final_norm="" with final_norm_optional: discovery saw nothing between the last block and the head
    no_norm = spec.final_norm_optional and (spec.final_norm == "" or _holds_none(model, spec.final_norm))
    if adapter.final_norm() is None and not no_norm:
        raise UnsupportedModelError(f"{type(model).__name__}: no final norm at '{spec.final_norm}'; "
                                    + _supported_text())
    if adapter.lm_head() is None or not hasattr(adapter.lm_head(), "weight"):
        raise UnsupportedModelError(f"{type(model).__name__} has no LM head (is it a base model without "
                                    f"*ForCausalLM?); load it with AutoModelForCausalLM. " + _supported_text())
    return adapter
