"""Model adapters: where each supported MoE architecture keeps its routed experts.

Everything architecture-specific the converter needs is here: which layers are MoE, expert count and sizes, the
checkpoint names of expert tensors, and how checkpoint names map onto transformers' in-memory modules. Routing,
shared experts and attention run through transformers' own decoder layers (see ``runner.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_moe_lowrank.format import ProjNames

from .errors import UnsupportedModelError

_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class MoEArch:
    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int  # per routed expert
    moe_prefix: str  # checkpoint prefix of a layer's routed experts, with "{layer}"
    expert_names: ProjNames
    module_renames: tuple[tuple[str, str], ...] = ()  # checkpoint substring -> transformers module substring

    def prefix(self, layer: int) -> str:
        return self.moe_prefix.format(layer=layer)

    def expert_params(self) -> int:
        return 3 * self.num_experts * self.hidden_size * self.intermediate_size * len(self.moe_layers)


def _num_experts(cfg: dict) -> int:
    for k in _EXPERT_COUNT_KEYS:
        if cfg.get(k):
            return int(cfg[k])
    return 0


def _qwen_moe_layers(cfg: dict) -> tuple[int, ...]:
    step = cfg.get("decoder_sparse_step", 1) or 1
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    return tuple(l for l in range(cfg["num_hidden_layers"]) if l not in mlp_only and (l + 1) % step == 0)


def _deepseek_moe_layers(cfg: dict) -> tuple[int, ...]:
    first = cfg.get("first_k_dense_replace", 0) or 0
    freq = cfg.get("moe_layer_freq", 1) or 1
    return tuple(l for l in range(cfg["num_hidden_layers"]) if l >= first and l % freq == 0)


def _all_layers(cfg: dict) -> tuple[int, ...]:
    return tuple(range(cfg["num_hidden_layers"]))


_STD = "model.layers.{layer}.mlp.experts"
# model_type -> (moe layer rule, expert intermediate size key, checkpoint prefix, projection names, renames)
_ADAPTERS = {
    "qwen3_moe": (_qwen_moe_layers, "moe_intermediate_size", _STD, ProjNames(), ()),
    "qwen2_moe": (_qwen_moe_layers, "moe_intermediate_size", _STD, ProjNames(), ()),
    "olmoe": (_all_layers, "intermediate_size", _STD, ProjNames(), ()),
    "deepseek_v2": (_deepseek_moe_layers, "moe_intermediate_size", _STD, ProjNames(), ()),
    "deepseek_v3": (_deepseek_moe_layers, "moe_intermediate_size", _STD, ProjNames(), ()),
    "mixtral": (_all_layers, "intermediate_size", "model.layers.{layer}.block_sparse_moe.experts",
                ProjNames(gate="w1", up="w3", down="w2"), ((".block_sparse_moe.", ".mlp."),)),
}
SUPPORTED = tuple(sorted(_ADAPTERS))


def detect(cfg: dict, source: str = "config.json") -> MoEArch:
    """Build the adapter for a checkpoint's config.json, or explain why it cannot be converted."""
    model_type = cfg.get("model_type", "?")
    if model_type not in _ADAPTERS:
        if _num_experts(cfg) == 0:
            raise UnsupportedModelError(f"{source}: not an MoE model (model_type={model_type!r} has no routed "
                                        f"experts); moe-convert compresses MoE experts only")
        raise UnsupportedModelError(f"{source}: unsupported MoE architecture model_type={model_type!r}; "
                                    f"supported: {', '.join(SUPPORTED)}")
    if cfg.get("quantization_config"):
        qm = cfg["quantization_config"].get("quant_method", "?")
        raise UnsupportedModelError(f"{source}: the checkpoint is already quantized (quant_method={qm!r}); "
                                    "convert the original bf16/fp16/fp32 checkpoint")
    rule, inter_key, prefix, names, renames = _ADAPTERS[model_type]
    experts = _num_experts(cfg)
    moe_layers = rule(cfg) if experts else ()
    if not moe_layers:
        raise UnsupportedModelError(f"{source}: model_type={model_type!r} but no layer has routed experts "
                                    "(num_experts is 0 or every layer is dense)")
    return MoEArch(
        model_type=model_type, num_layers=cfg["num_hidden_layers"], moe_layers=moe_layers, num_experts=experts,
        top_k=int(cfg["num_experts_per_tok"]), hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg[inter_key]), moe_prefix=prefix, expert_names=names, module_renames=renames,
    )
