"""Compute kernels for moe_lowrank experts.

The one entry point the vLLM plugin (and anything else) uses is :func:`moe_lowrank_experts`. It runs the
``moe_lowrank::experts`` custom op: the torch implementation (``torch_ref``) on CPU, the Triton kernels
(``triton_forward``) on CUDA.
"""

from __future__ import annotations

import torch

from .layout import LayerLayout, buffer_name, split
from .op import experts_op, register_layout
from .torch_ref import experts_forward

__all__ = ["LayerLayout", "buffer_name", "experts_forward", "experts_op", "moe_lowrank_experts", "register_layout",
           "split"]


def moe_lowrank_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layout: LayerLayout,
                        tensors: list[torch.Tensor]) -> torch.Tensor:
    """y [T, n] = Σ_k topk_weights[:, k] · expert_{topk_ids[:, k]}(x) over this rank's experts (un-reduced).

    x [T, n]; topk_weights [T, K] float; topk_ids [T, K] global expert ids; ``tensors`` in
    ``layout.tensor_names`` order (buffers then ``layout.finalize`` outputs); ``layout`` registered.
    """
    return torch.ops.moe_lowrank.experts(x, topk_weights, topk_ids, tensors, layout.key)
