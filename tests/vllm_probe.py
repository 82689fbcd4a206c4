"""Functions run inside vLLM's worker through ``LLM.apply_model`` (must be importable by module name)."""

from __future__ import annotations

_CAPTURED: list = []


def _routed_experts(model):
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedExperts)]


def expert_memory(model) -> dict:
    """Per MoE layer: method, parameter names/shapes/bytes, and buffer bytes of its routed experts."""
    out = {}
    for name, m in _routed_experts(model):
        out[m.layer_name] = {
            "method": type(m.quant_method).__name__,
            "params": {n: [list(p.shape), p.numel() * p.element_size()] for n, p in m.named_parameters()},
            "buffers": {n: b.numel() * b.element_size() for n, b in m.named_buffers()},
        }
    return out


def linear_methods(model) -> dict:
    """{module name: its quant method's class name} for every linear layer (LinearBase) of the model."""
    from vllm.model_executor.layers.linear import LinearBase

    return {name: type(m.quant_method).__name__ for name, m in model.named_modules() if isinstance(m, LinearBase)}


def install_moe_hooks(model) -> int:
    """Record (layer index, input, output) of every MoE block (the model's ``mlp`` holding routed experts);
    tensors as nested lists (they travel back through vLLM's RPC)."""
    _CAPTURED.clear()
    count = 0
    for name, m in model.named_modules():
        if name.endswith(".mlp") and any(c.endswith("experts") for c, _ in m.named_children()):
            idx = int(name.split(".layers.")[1].split(".")[0])

            def hook(mod, args, output, idx=idx):
                out = output[0] if isinstance(output, tuple) else output
                _CAPTURED.append((idx, args[0].detach().float().cpu().tolist(), out.detach().float().cpu().tolist()))

            m.register_forward_hook(hook)
            count += 1
    return count


def captured(model) -> list:
    return list(_CAPTURED)

