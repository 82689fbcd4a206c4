"""FP8 rounding of the ``moe_lowrank`` format: the arithmetic behind its scale tensors (``format.py`` says which
tensors carry scales, their names, shapes and axes).

* Factors (``factor_dtype = "fp8_e4m3"``): float8_e4m3fn data with one float32 scale per index of one axis,
  ``format.scale_axis`` / ``TensorSpec.scale_axis`` (``quantize_rows`` / ``dequantize``).
* Dense-kept experts and FP8 sources: vLLM's fp8 checkpoint layout, one scale per [bm, bn] block or one per tensor
  (``format.DenseQuant``; ``quantize_blocks`` / ``dequantize_blocks``).
"""

from __future__ import annotations

import torch

from vllm_moe_lowrank.format import FP8_MAX


def _bcast(scale: torch.Tensor, dim: int, axis: int) -> torch.Tensor:
    return scale.view([-1 if d == axis else 1 for d in range(dim)])


def quantize_rows(w: torch.Tensor, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn, scale float32 [w.shape[axis]]) with w ≈ q · scale broadcast along ``axis``: one scale per
    index of ``axis``, that slice's absolute maximum mapped to 448; round to nearest. An all-zero slice gets 1."""
    w32 = w.detach().float()
    if w32.numel() == 0:
        return w32.to(torch.float8_e4m3fn), torch.ones(w32.shape[axis])
    amax = w32.abs().amax(dim=tuple(d for d in range(w32.dim()) if d != axis)) if w32.dim() > 1 else w32.abs()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w32 / _bcast(scale, w32.dim(), axis)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
               axis: int = 0) -> torch.Tensor:
    """q · scale (broadcast along ``axis``) computed in float32 (float64 if asked), returned in ``dtype``."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(acc) * _bcast(scale.to(acc), q.dim(), axis)).to(dtype)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | list[int] | None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q · scale`` of vLLM's fp8 checkpoint layout (FP8 sources, dense-kept FP8 experts), computed in float32 and
    returned in ``dtype``: one scale per [bm, bn] block (``block``; scale [..., ceil(out/bm), ceil(in/bn)], edge
    blocks partial) or a single scale for the whole tensor (``block`` None). q: [..., out, in] float8_e4m3fn."""
    if block is None:
        return (q.float() * scale.float().reshape(())).to(dtype)
    bm, bn = block
    s = scale.float().repeat_interleave(bm, -2).repeat_interleave(bn, -1)  # [..., >= out, >= in]
    return (q.float() * s[..., :q.shape[-2], :q.shape[-1]]).to(dtype)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] | list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [out, in], scale float32) with w ≈ dequantize_blocks(q, scale, block): each [bm, bn] block's
    absolute maximum mapped to 448 (scale [ceil(out/bm), ceil(in/bn)]), or the whole tensor's (scale shape [])."""
    w32 = w.detach().float()
    if block is None:
        amax = w32.abs().max()
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).reshape(())
        return (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    bm, bn = block
    o, i = w32.shape
    pad = w32.new_zeros(-(-o // bm) * bm, -(-i // bn) * bn)
    pad[:o, :i] = w32
    amax = pad.view(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn).abs().amax(dim=(1, 3))  # [O, I]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:o, :i]
    return (w32 / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
