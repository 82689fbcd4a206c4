"""``MoELowRankMoEMethod``: parameters, loaders, completeness check and forward of one compressed MoE layer.

FP8 factors (format v2+, ``factor_dtype: fp8_e4m3``) are loaded as float8_e4m3fn parameters with float32 scale
parameters. On CUDA they stay FP8 (the Triton kernels dequantize in their loads: the expert memory is the
checkpoint's bytes); on CPU, where nothing reads FP8, they are dequantized once at load into the model's float dtype
(``LayerLayout.dequantize_at_load``), so the native CPU path serves them like float factors.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from vllm_moe_lowrank.format import SHARED, FormatError, MoELowRankConfig
from vllm_moe_lowrank.kernels import LayerLayout, moe_lowrank_experts, register_layout
from vllm_moe_lowrank.kernels.layout import SHARD_PROJ

_DERIVED_PREFIX = "moe_lowrank_"  # non-persistent buffers computed at load time (routing table, bucket scales)


class MoELowRankMoEMethod(FusedMoEMethodBase):
    """Owns a compressed layer's flat packed buffers (see kernels/layout.py) and runs the moe_lowrank op."""

    def __init__(self, fmt: MoELowRankConfig, layer_idx: int, moe):
        super().__init__(moe)
        self.fmt, self.layer_idx = fmt, layer_idx
        self.layout: LayerLayout | None = None
        self.loaded: set[str] = set()
        self.attr_names: list[str] = []
        self.params_dtype: torch.dtype | None = None

    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
        return hidden_size, intermediate_size_per_partition  # no padding: the packed layout is exact

    def get_fused_moe_quant_config(self, layer):
        return None

    # ----- weights ----------------------------------------------------------------------------------------------
    def _check_supported(self, layer) -> None:
        cfg, where = self.fmt, f"moe_lowrank: {layer.layer_name}"
        moe = layer.moe_config
        problems = []
        if not moe.is_act_and_mul or moe.activation.value != "silu":
            problems.append(f"activation {moe.activation.value!r} (only gated silu experts are supported)")
        if layer.apply_router_weight_on_input:
            problems.append("apply_router_weight_on_input (router weight on the input) is not supported")
        if layer.global_num_experts != cfg.num_experts:
            problems.append(f"the model has {layer.global_num_experts} experts, quantization_config.num_experts="
                            f"{cfg.num_experts} (redundant EPLB experts are not supported)")
        if moe.hidden_dim != cfg.hidden_size:
            problems.append(f"hidden size {moe.hidden_dim} != quantization_config.hidden_size={cfg.hidden_size}")
        if problems:
            raise FormatError(f"{where}: cannot serve this layer: " + "; ".join(problems))

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        self._check_supported(layer)
        moe = layer.moe_config
        local = sorted((lid, g) for g in range(self.fmt.num_experts)
                       if (lid := layer._map_global_expert_id_to_local_expert_id(g)) != -1)
        if [lid for lid, _ in local] != list(range(num_experts)):
            raise FormatError(f"moe_lowrank: {layer.layer_name}: unexpected expert placement {local}")
        self.layout = LayerLayout(self.fmt, self.layer_idx, tp_rank=moe.tp_rank, tp_size=moe.tp_size,
                                  local_experts=[g for _, g in local], key=layer.layer_name)
        self.params_dtype = params_dtype
        for name, buf in self.layout.new_buffers(params_dtype).items():
            param = torch.nn.Parameter(buf, requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, {"weight_loader": self._make_loader(layer, name)})
        self.attr_names = list(self.layout.buffers)

    def _make_loader(self, layer, buffer: str):
        side, _, rest = buffer.partition("_")
        shared = rest.startswith(SHARED + "_")
        suffix = rest.removeprefix(SHARED + "_") if shared else rest

        def load(param, loaded_weight, weight_name="", shard_id=None, expert_id=None, return_success=False):
            proj = SHARD_PROJ[shard_id]
            expert = None if shared else int(expert_id)
            if expert is not None and expert not in self.layout.units:
                raise FormatError(f"moe_lowrank: {weight_name}: expert {expert} does not exist")
            if expert is not None and expert not in self.layout.local_experts:
                return False if return_success else None  # another EP rank's expert
            name = self.layout.name(proj, suffix, expert)
            if name not in self.layout.blocks:
                raise FormatError(f"moe_lowrank: unexpected checkpoint tensor {name!r}: layer {self.layer_idx}'s "
                                  f"quantization_config declares no such tensor (config.json and weights disagree)")
            try:
                self.layout.store({buffer: param.data}, name, loaded_weight)
            except ValueError as err:
                raise FormatError(str(err)) from None
            self.loaded.add(name)
            return True if return_success else None

        return load

    def process_weights_after_loading(self, layer) -> None:
        """Refuse to serve unless every tensor this rank needs was loaded; then prepare the layer for compute."""
        missing = sorted(set(self.layout.blocks) - self.loaded)
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5])
            raise FormatError(f"moe_lowrank: {len(missing)} tensor(s) of {layer.layer_name} were never loaded: "
                              f"{shown}{' ...' if len(missing) > 5 else ''}; the checkpoint is incomplete or its "
                              "tensor names do not follow the moe_lowrank format")
        buffers = {n: getattr(layer, n).data for n in self.layout.buffers}
        for name, t in self.layout.finalize(buffers).items():
            layer.register_buffer(_DERIVED_PREFIX + name, t, persistent=False)
        if self.layout.quantized and next(iter(buffers.values())).device.type == "cpu":
            for name, t in self.layout.dequantize_at_load(buffers, self.params_dtype).items():
                layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
        self.attr_names = [n if n in self.layout.buffers else _DERIVED_PREFIX + n for n in self.layout.tensor_names]
        register_layout(self.layout)

    # ----- forward ----------------------------------------------------------------------------------------------
    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        tensors = [getattr(layer, n) for n in self.attr_names]
        return moe_lowrank_experts(x, topk_weights, topk_ids, self.layout, tensors)
