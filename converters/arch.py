"""Model adapters: one data entry per MoE family says where its routed experts live and how they compute.

An adapter (``Family``) is data, not code: the config keys of the expert count, top-k and expert size, which decoder
layers are MoE, the checkpoint names of the MoE block, its experts (per expert, or fused), router, router bias and
shared experts, the experts' activation, and how checkpoint names map onto transformers' in-memory modules. Routing,
shared experts and attention run through transformers' own decoder layers (see ``runner.py``), so a family whose
transformers implementation has an ``Experts(hidden_states, top_k_index, top_k_weights)`` module needs nothing
else. Adding one: docs/adding-a-model-family.md. Families that cannot be converted are refused here with the reason
(``REFUSED``, and the generic messages of ``detect``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vllm_moe_lowrank.format import ProjNames

from .checkpoint import SourceQuant
from .errors import UnsupportedModelError

# keys under which configs keep their routed-expert count (used to recognise MoE models without an adapter)
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_NESTED_CONFIGS = ("text_config", "ffn_config", "language_config", "llm_config")  # where wrappers keep them

LayerRule = Callable[[dict], tuple[int, ...]]


# ----- which decoder layers are MoE (the rule transformers' decoder layer applies to the same config keys) --------
def qwen_moe_layers(cfg: dict) -> tuple[int, ...]:
    """Every ``decoder_sparse_step``-th layer except ``mlp_only_layers`` (Qwen2/3-MoE, Qwen3-Next)."""
    step = cfg.get("decoder_sparse_step", 1) or 1
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    return tuple(l for l in range(cfg["num_hidden_layers"]) if l not in mlp_only and (l + 1) % step == 0)


def deepseek_moe_layers(cfg: dict) -> tuple[int, ...]:
    """Layers from ``first_k_dense_replace`` on, every ``moe_layer_freq``-th (DeepSeek-V2/V3, GLM-4.5)."""
    first = cfg.get("first_k_dense_replace", 0) or 0
    freq = cfg.get("moe_layer_freq", 1) or 1
    return tuple(l for l in range(cfg["num_hidden_layers"]) if l >= first and l % freq == 0)


def ernie_moe_layers(cfg: dict) -> tuple[int, ...]:
    """``moe_layer_start_index`` ≤ l ≤ ``moe_layer_end_index`` (−1: the last), every ``moe_layer_interval``-th."""
    n = cfg["num_hidden_layers"]
    start = cfg.get("moe_layer_start_index", 0) or 0
    end = cfg.get("moe_layer_end_index", -1)
    end = n - 1 if end is None or end == -1 else end
    step = cfg.get("moe_layer_interval", 1) or 1
    return tuple(l for l in range(n) if start <= l <= end and (l + 1) % step == 0)


def all_layers(cfg: dict) -> tuple[int, ...]:
    return tuple(range(cfg["num_hidden_layers"]))


@dataclass(frozen=True)
class Family:
    """Everything the converter needs to know about one MoE family. Names under ``block`` are relative to
    ``model.layers.{layer}.<block>`` in the checkpoint; router, bias and shared experts are copied unchanged."""

    model_type: str
    moe_layers: LayerRule  # which decoder layers have routed experts
    experts_key: str  # config key of the routed-expert count (the generic keys are tried after it)
    intermediate_key: str  # config key of one routed expert's intermediate size m
    top_k_key: str = "num_experts_per_tok"  # config key of experts per token
    block: str = "mlp"  # checkpoint name of a layer's MoE block
    module_block: str | None = None  # transformers' attribute for the block, where it differs (Mixtral: "mlp")
    expert_names: ProjNames = ProjNames()  # per-expert layout: <block>.experts.{e}.<name>.weight, [m, n] / [n, m]
    fused: tuple[str, str] | None = None  # fused layout: (gate_up [E, 2m, n], down [E, n, m]) under <block>
    router: str = "gate.weight"  # router weight [E, n] under <block>
    router_bias: str | None = None  # score-correction bias under <block> (selection only), if any
    shared_experts: str | None = None  # always-on expert(s) under <block>, if any
    activation: str = "silu"  # experts compute down(act(gate·x) ⊙ up·x); the plugin serves silu
    renames: tuple[tuple[str, str], ...] = ()  # further checkpoint -> transformers module name substrings
    checkpoints: tuple[str, ...] = ()  # real models this entry is written for: "name (layers, E×top-k, n, m)"

    @property
    def moe_prefix(self) -> str:
        """Checkpoint (and moe_lowrank format) prefix of a layer's routed experts."""
        return f"model.layers.{{layer}}.{self.block}.experts"

    def module_renames(self) -> tuple[tuple[str, str], ...]:
        moved = ((f".{self.block}.", f".{self.module_block}."),) if self.module_block else ()
        return moved + self.renames


_MIXTRAL_NAMES = ProjNames(gate="w1", up="w3", down="w2")
_FAMILIES = (
    Family("qwen3_moe", qwen_moe_layers, "num_experts", "moe_intermediate_size",
           checkpoints=("Qwen3-30B-A3B (48 layers, 128×8, n 2048, m 768)",
                        "Qwen3-235B-A22B (94 layers, 128×8, n 4096, m 1536)")),
    Family("qwen2_moe", qwen_moe_layers, "num_experts", "moe_intermediate_size",
           shared_experts="shared_expert", checkpoints=("Qwen1.5-MoE-A2.7B (24 layers, 60×4, n 2048, m 1408)",)),
    Family("qwen3_next", qwen_moe_layers, "num_experts", "moe_intermediate_size", shared_experts="shared_expert",
           checkpoints=("Qwen3-Next-80B-A3B (48 layers, 512×10, n 2048, m 512)",)),
    Family("olmoe", all_layers, "num_experts", "intermediate_size",
           checkpoints=("OLMoE-1B-7B (16 layers, 64×8, n 2048, m 1024)",)),
    Family("deepseek_v2", deepseek_moe_layers, "n_routed_experts", "moe_intermediate_size",
           shared_experts="shared_experts", checkpoints=("DeepSeek-V2-Lite (27 layers, 64×6, n 2048, m 1408)",)),
    Family("deepseek_v3", deepseek_moe_layers, "n_routed_experts", "moe_intermediate_size",
           router_bias="gate.e_score_correction_bias", shared_experts="shared_experts",
           checkpoints=("DeepSeek-V3 (61 layers, 256×8, n 7168, m 2048)",)),
    Family("kimi_k2", deepseek_moe_layers, "n_routed_experts", "moe_intermediate_size",  # the DeepSeek-V3 layout
           router_bias="gate.e_score_correction_bias", shared_experts="shared_experts",
           checkpoints=("Kimi-K2 (61 layers, 384×8, n 7168, m 2048)",)),
    Family("glm4_moe", deepseek_moe_layers, "n_routed_experts", "moe_intermediate_size",
           router_bias="gate.e_score_correction_bias", shared_experts="shared_experts",
           checkpoints=("GLM-4.5 (92 layers, 160×8, n 5120, m 1536)",
                        "GLM-4.5-Air (46 layers, 128×8, n 4096, m 1408)")),
    Family("ernie4_5_moe", ernie_moe_layers, "moe_num_experts", "moe_intermediate_size", top_k_key="moe_k",
           router_bias="moe_statics.e_score_correction_bias", shared_experts="shared_experts",
           renames=((".mlp.moe_statics.", ".mlp.gate.moe_statics."),),
           checkpoints=("ERNIE-4.5-21B-A3B-PT (28 layers, 64×6, n 2560, m 1536)",)),
    Family("mixtral", all_layers, "num_local_experts", "intermediate_size", block="block_sparse_moe",
           module_block="mlp", expert_names=_MIXTRAL_NAMES,
           checkpoints=("Mixtral-8x7B (32 layers, 8×2, n 4096, m 14336)",)),
    Family("phimoe", all_layers, "num_local_experts", "intermediate_size", block="block_sparse_moe",
           module_block="mlp", expert_names=_MIXTRAL_NAMES, renames=((".mlp.gate.", ".mlp.router."),),
           checkpoints=("Phi-3.5-MoE-instruct (32 layers, 16×2, n 4096, m 6400)",)),
    Family("minimax_m2", all_layers, "num_local_experts", "intermediate_size", block="block_sparse_moe",
           module_block="mlp", expert_names=_MIXTRAL_NAMES, router_bias="e_score_correction_bias",
           checkpoints=("MiniMax-M2 (62 layers, 256×8, n 3072, m 1536; released in FP8)",)),
    Family("granitemoe", all_layers, "num_local_experts", "intermediate_size", block="block_sparse_moe",
           fused=("input_linear.weight", "output_linear.weight"), router="router.layer.weight",
           renames=((".router.layer.", ".router."),),
           checkpoints=("granite-3.0-1b-a400m (24 layers, 32×8, n 1024, m 512)",
                        "granite-3.0-3b-a800m (32 layers, 40×8, n 1536, m 512)")),
)
FAMILIES: dict[str, Family] = {f.model_type: f for f in _FAMILIES}
SUPPORTED = tuple(sorted(FAMILIES))

# MoE families recognised and refused, with the reason (what is missing)
REFUSED: dict[str, str] = {
    "gpt_oss": "its experts are stored MXFP4-quantized (*_blocks / *_scales) and compute a clamped SwiGLU with "
               "biases on an interleaved gate_up (gate clamped to ≤ 7, up to ±7, (up + 1)·gate·σ(1.702·gate)); "
               "moe_lowrank factors bias-free silu-gated experts only",
    "llama4": "its router weight scales the expert *input* (top-1 sigmoid routing, apply_router_weight_on_input), "
              "which the moe_lowrank plugin cannot serve, and its experts are stored fused and transposed under "
              "language_model.model.layers.*.feed_forward; no adapter",
    "dbrx": "its layers live under transformer.blocks.* (not model.layers.*) with each layer's experts flattened "
            "into ffn.experts.mlp.w1 / v1 / w2 [E·m, n]; no adapter",
}


@dataclass(frozen=True)
class MoEArch:
    """One checkpoint's MoE layout, built by ``detect`` from its config.json and its family's entry."""

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
    experts_module: str = "mlp.experts"  # transformers' attribute path of the routed experts in a decoder layer
    fused_names: tuple[str, str] | None = None  # family-specific fused tensors (gate_up, down), with "{layer}"

    def prefix(self, layer: int) -> str:
        return self.moe_prefix.format(layer=layer)

    def expert_params(self) -> int:
        return 3 * self.num_experts * self.hidden_size * self.intermediate_size * len(self.moe_layers)


def _expert_count(cfg: dict) -> tuple[str, int]:
    """(where, count) of the routed experts of any config, nested ones included; ("", 0) for a dense model."""
    for where, sub in [("", cfg)] + [(k + ".", cfg[k]) for k in _NESTED_CONFIGS if isinstance(cfg.get(k), dict)]:
        for k in _EXPERT_COUNT_KEYS:
            if isinstance(sub.get(k), int) and sub[k] > 0:
                return where + k, sub[k]
    return "", 0


def _refuse_unknown(cfg: dict, source: str, model_type: str) -> None:
    where, count = _expert_count(cfg)
    if count == 0:
        raise UnsupportedModelError(f"{source}: not an MoE model (model_type={model_type!r} has no routed "
                                    f"experts); moe-convert compresses MoE experts only")
    what = f"{source}: model_type={model_type!r} is an MoE model ({where}={count})"
    if model_type in REFUSED:
        raise UnsupportedModelError(f"{what} but cannot be converted: {REFUSED[model_type]}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        code = " (its config.json points at its own code: auto_map)" if cfg.get("auto_map") else ""
        raise UnsupportedModelError(
            f"{what} that transformers has no built-in implementation of{code}; --trust-remote-code would not "
            "help: calibration runs transformers' built-in decoder layers and hooks their Experts module, which "
            "remote modeling code does not provide")
    raise UnsupportedModelError(f"{what} without an adapter; supported: {', '.join(SUPPORTED)}. transformers "
                                "implements it, so an adapter may be one entry (docs/adding-a-model-family.md)")


def check_source_quantization(cfg: dict, source: str) -> None:
    """Refuse a moe_lowrank output as input, and every source quantization the converter cannot read."""
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "moe_lowrank":
        raise UnsupportedModelError(f"{source}: the checkpoint was already converted by moe-convert "
                                    f"(method {qc.get('method')!r}); convert the original checkpoint")
    SourceQuant.from_config(qc, source)  # FP8 is read (dequantized while streaming); any other format refused


def _config_int(cfg: dict, key: str, source: str, model_type: str) -> int:
    if not isinstance(cfg.get(key), int):
        raise UnsupportedModelError(f"{source}: model_type={model_type!r} needs an integer {key!r} in config.json "
                                    f"(got {cfg.get(key)!r})")
    return cfg[key]


def detect(cfg: dict, source: str = "config.json") -> MoEArch:
    """Build the adapter for a checkpoint's config.json, or explain why it cannot be converted."""
    model_type = cfg.get("model_type", "?")
    fam = FAMILIES.get(model_type)
    if fam is None:
        _refuse_unknown(cfg, source, model_type)
    check_source_quantization(cfg, source)
    act = cfg.get("hidden_act", fam.activation)
    if act != fam.activation:
        raise UnsupportedModelError(f"{source}: hidden_act={act!r}, but {model_type} experts are served as "
                                    f"{fam.activation}-gated; the moe_lowrank plugin computes silu-gated experts only")
    # transformers renames some keys on save (Qwen3-MoE's num_experts is written as num_local_experts)
    experts = next((cfg[k] for k in (fam.experts_key, *_EXPERT_COUNT_KEYS) if isinstance(cfg.get(k), int)), 0)
    moe_layers = fam.moe_layers(cfg) if experts else ()
    if not moe_layers:
        raise UnsupportedModelError(f"{source}: model_type={model_type!r} but no layer has routed experts "
                                    f"({fam.experts_key} is 0 or every layer is dense)")
    fused = None if fam.fused is None else tuple(f"model.layers.{{layer}}.{fam.block}.{t}" for t in fam.fused)
    return MoEArch(
        model_type=model_type, num_layers=cfg["num_hidden_layers"], moe_layers=moe_layers, num_experts=int(experts),
        top_k=_config_int(cfg, fam.top_k_key, source, model_type), hidden_size=int(cfg["hidden_size"]),
        intermediate_size=_config_int(cfg, fam.intermediate_key, source, model_type), moe_prefix=fam.moe_prefix,
        expert_names=fam.expert_names, module_renames=fam.module_renames(),
        experts_module=f"{fam.module_block or fam.block}.experts", fused_names=fused)
