"""``MoELowRankQuantConfig``: vLLM's view of a checkpoint's ``quantization_config`` (format.MoELowRankConfig)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from vllm_moe_lowrank.format import QUANT_METHOD, SHARED, FormatError, MoELowRankConfig

# Per-layer tensors carry no expert index, so vLLM's expert mapping would drop them. Rename them onto expert 0
# (".experts.shared.<proj>.<suffix>" -> ".experts.0.<proj>.shared_<suffix>"): they then reach the parameter
# "w13_shared_<suffix>" / "w2_shared_<suffix>" whose loader ignores the expert id. Idempotent.
_SHARED_RE = re.compile(rf"\.experts\.{SHARED}\.([^.]+)\.([^.]+)$")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FORMAT_KEYS = ("format_version", "moe_prefix", "moe_layers", "layers")  # what marks a moe_lowrank section


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _fp8_config(field: str, qc: dict | None):
    """vLLM's Fp8Config for an fp8 section of the quantization_config (None for None), refused like vLLM would."""
    if qc is None:
        return None
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    try:
        return Fp8Config.from_config(qc)
    except (ValueError, KeyError) as err:
        raise FormatError(f"moe_lowrank: quantization_config.{field} {qc}: {err}") from None


class MoELowRankQuantConfig(QuantizationConfig):
    """Compressed routed experts (moe_lowrank format); FP8 non-expert and dense-kept MoE layers through vLLM's FP8
    methods (plugin/fp8.py); every other layer is unquantized."""

    def __init__(self, fmt: MoELowRankConfig | None = None):
        super().__init__()
        if fmt is None:
            raise FormatError("--quantization moe_lowrank needs a checkpoint written by moe-convert: its "
                              "config.json has no quantization_config section")
        self.fmt = fmt
        # vLLM Fp8Configs (plugin/fp8.py): the source's FP8 settings for the non-expert linear layers, and the FP8
        # layout of the experts of MoE layers left dense
        self.fp8 = _fp8_config("linear_quantization", fmt.linear_quantization)
        dq = fmt.dense_quantization
        self.dense_fp8 = _fp8_config("dense_quantization", dq and dq.model_dump(mode="json"))

    # ----- identity ---------------------------------------------------------------------------------------------
    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the quantization_config section of config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MoELowRankQuantConfig:
        try:
            return cls(MoELowRankConfig.model_validate(config))
        except ValidationError as err:
            raise FormatError(f"moe_lowrank: invalid quantization_config in config.json: "
                              f"{_validation_message(err)}") from None

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        """Refuse a moe_lowrank quantization_config whose quant_method was removed or changed: vLLM would load it
        as another format (or unquantized) and fail on the first compressed tensor."""
        if all(k in hf_quant_cfg for k in _FORMAT_KEYS) and hf_quant_cfg.get("quant_method") != QUANT_METHOD:
            raise FormatError(f"config.json: quantization_config has the moe_lowrank fields ({', '.join(_FORMAT_KEYS)})"
                              f" but quant_method={hf_quant_cfg.get('quant_method') or None!r}; set \"quant_method\": "
                              f"\"{QUANT_METHOD}\" (the checkpoint was written by moe-convert)")
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Check the checkpoint's expert tensors against the config before anything loads (local folders)."""
        path = Path(model_name)
        if not (path / "config.json").is_file():
            return  # a hub id: the loaders' own checks still apply
        from vllm_moe_lowrank.converters.verify import verify_checkpoint

        try:
            verify_checkpoint(path)
        except FormatError as err:
            raise FormatError(f"moe_lowrank: {err}") from None

    # ----- per layer --------------------------------------------------------------------------------------------
    def layer_index(self, prefix: str) -> int | None:
        m = _LAYER_RE.search(prefix)
        return int(m.group(1)) if m else None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            if self.fp8 is None:
                return UnquantizedLinearMethod()
            from .fp8 import fp8_linear_method

            self.fp8.packed_modules_mapping = self.packed_modules_mapping  # set on this config by the loader
            return fp8_linear_method(self.fp8, layer, prefix)
        if isinstance(layer, RoutedExperts):
            idx = self.layer_index(prefix)
            if idx not in self.fmt.moe_layers:
                raise FormatError(f"moe_lowrank: {prefix}: the model has routed experts in layer {idx}, but "
                                  f"quantization_config.moe_layers {self.fmt.moe_layers} does not list it; "
                                  "config.json and the weights disagree (re-run moe-convert)")
            if idx in self.fmt.layers:
                from .method import MoELowRankMoEMethod

                return MoELowRankMoEMethod(self.fmt, idx, layer.moe_config)
            if self.dense_fp8 is not None:  # an MoE layer the converter left dense, in FP8
                from .fp8 import fp8_moe_method

                return fp8_moe_method(self.dense_fp8, layer)
            return UnquantizedFusedMoEMethod(layer.moe_config)  # an MoE layer the converter left dense
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.fp8 is not None:  # the source's ignored-layer names, in vLLM's module names
            self.fp8.apply_vllm_mapper(hf_to_vllm_mapper)

    def get_checkpoint_weight_mapper(self):
        from vllm.model_executor.models.utils import WeightsMapper

        return QuantizationConfig.get_checkpoint_weight_mapper() | WeightsMapper(
            orig_to_new_regex={_SHARED_RE: r".experts.0.\1.shared_\2"})
