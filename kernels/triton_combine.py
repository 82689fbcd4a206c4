"""Combine: y[t] = Σ_k w_tk · down_pair[pos(t, k)] + z[t] · Bᵀ, per token tile; the RS-MoE / shared down base.

Each token's K pair outputs are gathered through ``pos_of_pair`` and summed in k order (deterministic; no atomics),
weighted by the router in float32. With a shared down base B (units "all": ``[n, u_local]``; units "lowrank":
``[n, m]`` over the original units), ``_base_z_kernel`` first writes z[t] = Σ_k w_tk · scatter(h_pair) [T, width]
(rounded to the activation dtype, as the torch path does before its GEMM) from the pairs' h rows — for a "lowrank"
base through the static inverse table inv[f, c] (the compact low-rank index of original unit c in function f, −1
when absent), i.e. the scatter of the stored ``base_idx`` done as a gather — and the combine multiplies it by B:
one GEMM for the whole base term, once per token. An FP8 base is read as float8 and scaled by its row scales in
registers (``load_w``); z stays in the activation dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as C
from .triton_common import load_w, mm
from .triton_plan import Plan
from .triton_sort import Sorted

NC = tl.constexpr(C.NCOLS)


@triton.jit
def _base_z_kernel(W, POS, T, H, stride_h, BLOCK_FUNC, META, INV, Z, stride_z, zwidth,
                   K: tl.constexpr, BASE_KIND: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, BMB: tl.constexpr):
    """z[tok, c] = Σ_k w · h[pos(tok, k), src(c)] on one [BM tokens, BC z-columns] tile."""
    tok = tl.program_id(0) * BM + tl.arange(0, BM)
    tok_ok = tok < T
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < zwidth
    z = tl.zeros([BM, BC], dtype=tl.float32)
    for k in tl.static_range(K):
        p = tok * K + k
        pos = tl.load(POS + p, mask=tok_ok, other=-1)
        w = tl.load(W + p, mask=tok_ok, other=0.0).to(tl.float32)
        have = pos >= 0
        if BASE_KIND == 1:  # units "all": z[:, c] += w · h[pos, c]
            src = c[None, :] + tl.zeros([BM, BC], dtype=tl.int64)
            zm = have[:, None] & cm[None, :]
        else:  # units "lowrank": z[:, c] += w · h[pos, lr_start_f + inv[f, c]]
            f = tl.load(BLOCK_FUNC + pos // BMB, mask=have, other=0).to(tl.int64)
            lr0 = tl.load(META + f * NC + C.BASE_LR_START, mask=have, other=0)
            inv = tl.load(INV + f[:, None] * zwidth + c[None, :], mask=have[:, None] & cm[None, :], other=-1)
            src = lr0[:, None] + inv
            zm = have[:, None] & (inv >= 0)
        hv = tl.load(H + pos.to(tl.int64)[:, None] * stride_h + src, mask=zm, other=0.0)
        z += w[:, None] * hv.to(tl.float32)
    tl.store(Z + tok.to(tl.int64)[:, None] * stride_z + c[None, :], z.to(Z.dtype.element_ty),
             mask=tok_ok[:, None] & cm[None, :])


@triton.jit
def _combine_kernel(YP, stride_yp, W, POS, T, N, Y, stride_y, Z, stride_z, BASE, base_off, base_stride, zwidth,
                    BASE_S, base_soff, K: tl.constexpr, Q: tl.constexpr, HAS_BASE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                    F32: tl.constexpr):
    tok = tl.program_id(0) * BM + tl.arange(0, BM)
    tok_ok = tok < T
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cok = cols < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in tl.static_range(K):
        p = tok * K + k
        pos = tl.load(POS + p, mask=tok_ok, other=-1)
        w = tl.load(W + p, mask=tok_ok, other=0.0).to(tl.float32)
        have = pos >= 0
        yp = tl.load(YP + pos.to(tl.int64)[:, None] * stride_yp + cols[None, :], mask=have[:, None] & cok[None, :],
                     other=0.0)
        acc += w[:, None] * yp.to(tl.float32)
    if HAS_BASE:
        for c0 in range(0, zwidth, BC):
            c = c0 + tl.arange(0, BC)
            cm = c < zwidth
            z = tl.load(Z + tok.to(tl.int64)[:, None] * stride_z + c[None, :], mask=tok_ok[:, None] & cm[None, :],
                        other=0.0)  # [BM, BC]
            b = load_w(BASE + base_off + cols[None, :] * base_stride + c[:, None], cok[None, :] & cm[:, None],
                       BASE_S, base_soff, cols[None, :], cok[None, :], c[:, None], cm[:, None], Q,
                       C.SK_BASE)  # [BC, BN]
            acc = mm(z, b.to(z.dtype), acc, F32)
    tl.store(Y + tok.to(tl.int64)[:, None] * stride_y + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=tok_ok[:, None] & cok[None, :])


def combine(yp: torch.Tensor, topk_weights: torch.Tensor, srt: Sorted, h: torch.Tensor, plan: Plan,
            out: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Write y [T, n] into ``out``."""
    T, K = topk_weights.shape
    w = topk_weights if topk_weights.is_contiguous() else topk_weights.contiguous()
    bm, bn, bc = cfg["combine_bm"], cfg["bn_hidden"], cfg["bk"]
    z = base = base_s = plan.dummy["f"]
    if plan.base is not None:
        base, base_s = plan.base_w, plan.base_s
        z = torch.empty(T, plan.base_width, dtype=out.dtype, device=out.device)  # [T, width] activation dtype
        inv = plan.base_inv if plan.base == "lowrank" else plan.dummy["i"]
        _base_z_kernel[(triton.cdiv(T, bm), triton.cdiv(plan.base_width, bc))](
            w, srt.pos_of_pair, T, h, h.stride(0), srt.block_func, plan.meta, inv, z, z.stride(0), plan.base_width,
            K=K, BASE_KIND=1 if plan.base == "all" else 2, BM=bm, BC=bc, BMB=srt.bm)
    grid = (triton.cdiv(T, bm), triton.cdiv(plan.n, bn))
    _combine_kernel[grid](yp, yp.stride(0), w, srt.pos_of_pair, T, plan.n, out, out.stride(0),
                          z, z.stride(0) if z.dim() == 2 else 0, base, plan.base_off, plan.base_stride,
                          plan.base_width, base_s, plan.base_soff, K=K, Q=plan.q, HAS_BASE=plan.base is not None, BM=bm, BN=bn, BC=bc, F32=cfg["f32"])
    return out
