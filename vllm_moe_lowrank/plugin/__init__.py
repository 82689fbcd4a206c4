"""vLLM plugin: the ``moe_lowrank`` quantization method (config, MoE method, weight loading)."""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register ``moe_lowrank`` with vLLM. Idempotent and lazy: vLLM is imported only here, when vLLM calls it."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from vllm_moe_lowrank.format import QUANT_METHOD

    from . import ray_cpu, strict
    from .config import MoELowRankQuantConfig

    register_quantization_config(QUANT_METHOD)(MoELowRankQuantConfig)
    strict.install()  # vLLM checks that every parameter was loaded only for unquantized models
    ray_cpu.install()  # vLLM's Ray executor on the CPU platform, where vLLM lacks it (a no-op elsewhere)
    _registered = True
