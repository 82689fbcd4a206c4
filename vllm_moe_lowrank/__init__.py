"""vllm-moe-lowrank: compressed MoE experts, converted offline and served natively by vLLM."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point: registers the ``moe_lowrank`` quantization method (idempotent, lazy)."""
    from .plugin import register as _register

    _register()
