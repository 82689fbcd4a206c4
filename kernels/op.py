"""The ``moe_lowrank::experts`` torch custom op: opaque to torch.compile (Dynamo), eager inside.

Layouts are static Python objects, so the op gets the layer's tensors as a list and looks the layout up by key.
Implementations: the torch path (``torch_ref``, the oracle) as the default; the CPU path (``cpu_native``: grouped
C++/OpenMP GEMMs where the layer's terms allow, else ``cpu_forward``'s lean torch loop) registered for CPU; the
Triton path (``triton_forward``, CUDA-graph safe) registered for CUDA. Triton is imported on the first CUDA call
only, so this module imports without Triton (and ``TRITON_INTERPRET`` can still be set before the kernels are
defined). ``MOE_LOWRANK_KERNEL=torch`` sends CPU and CUDA calls to the torch path (debugging; on CUDA not
capturable in CUDA graphs); float64 always takes it, and so do FP8 factors on CPU unless they were dequantized at
load (the plugin does that on CPU; the Triton kernels read FP8 factors themselves).
"""

from __future__ import annotations

import os

import torch

import vllm_moe_lowrank

from .layout import LayerLayout
from .torch_ref import experts_forward

# One registry per process, even if this file is imported twice: with the repository root on sys.path,
# something probing for the unrelated hub package ``kernels`` imports ./kernels as a top-level package too.
_LAYOUTS: dict[str, LayerLayout] = vllm_moe_lowrank.__dict__.setdefault("_kernel_layouts", {})


def register_layout(layout: LayerLayout) -> None:
    if not layout.key:
        raise ValueError("a layout needs a non-empty key to be used through the kernel op")
    _LAYOUTS[layout.key] = layout


@torch.library.custom_op("moe_lowrank::experts", mutates_args=())
def experts_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, tensors: list[torch.Tensor],
               layer_key: str) -> torch.Tensor:
    layout = _LAYOUTS[layer_key]
    return experts_forward(layout, dict(zip(layout.tensor_names, tensors)), x, topk_weights, topk_ids)


@experts_op.register_fake
def _(x, topk_weights, topk_ids, tensors, layer_key):
    return torch.empty_like(x)


@experts_op.register_kernel("cpu")
def _(x, topk_weights, topk_ids, tensors, layer_key):
    layout = _LAYOUTS[layer_key]
    bufs = dict(zip(layout.tensor_names, tensors))
    if os.environ.get("MOE_LOWRANK_KERNEL", "cpu") == "torch" or x.dtype == torch.float64 or layout.quantized:
        return experts_forward(layout, bufs, x, topk_weights, topk_ids)
    from .cpu_native import experts_forward_cpu

    return experts_forward_cpu(layout, bufs, x, topk_weights, topk_ids)


@experts_op.register_kernel("cuda")
def _(x, topk_weights, topk_ids, tensors, layer_key):
    layout = _LAYOUTS[layer_key]
    bufs = dict(zip(layout.tensor_names, tensors))
    if os.environ.get("MOE_LOWRANK_KERNEL", "triton") == "torch" or x.dtype == torch.float64:
        return experts_forward(layout, bufs, x, topk_weights, topk_ids)
    from .triton_forward import experts_forward_triton

    return experts_forward_triton(layout, bufs, x, topk_weights, topk_ids)
