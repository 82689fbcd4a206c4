"""Dense-tile path for large token counts: rebuild a weight tile of the function in registers, then GEMM.

Per sorted block of pairs of one function and one output tile, every k-step rebuilds the ``[BK, BN]`` tile of the
function's dense weight from its terms — the exact rows, L·act(R) (R stored, a group's rows, or act(Σ_j mix_j·B_j)
generated from the bases), eta·Pᵀ (bucket-gathered columns of eta times the bucket scale) — and multiplies the
block's activations by it. Compared with the low-rank path it does r/BM extra multiply-adds per output element
(the rebuild is amortized over the BM rows of a block) but no intermediate t/u round trips and one kernel per
stage; which is faster is a property of the device, so the switch point is a measured threshold
(``triton_forward.DENSE_TILE_MIN_ROWS``; see docs/kernels.md). Nothing is written to memory but the outputs.

``_gate_up_dt_kernel`` writes h = silu(gate) ⊙ up (same epilogue as the low-rank path); ``_down_dt_kernel`` writes
the pairs' unweighted down outputs. The shared down base stays in ``triton_combine``.

FP8 factors (``Q``): every factor tile is loaded as float8 and scaled in registers (``load_w``; the dense weight's
scale axis is the launch constexpr ``SK_D``) before the rebuild, which is float32 anyway; the rebuilt tile is cast to
the activation dtype for the GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as C
from .triton_common import block_of, load_w, mm, right_tile
from .triton_plan import Plan, ProjPlan
from .triton_sort import Sorted

NC = tl.constexpr(C.NCOLS)


@triton.jit
def _lowrank_tile(Wt, mrow, out_idx, out_ok, kk, W_L, V, MIX, S_L, S_V, CDP, PB: tl.constexpr, RMODE: tl.constexpr,
                  ACT: tl.constexpr, J: tl.constexpr, BR: tl.constexpr, F32: tl.constexpr, Q: tl.constexpr):
    """Wt[BK, BN] += act(R)[:, kk]ᵀ · L[out_idx, :]ᵀ over the function's rank (kk relative to R's input); the
    product in CDP's element type (FP8 factors: both tiles dequantized in float32 first)."""
    r = tl.load(mrow + PB + C.RANK)
    l_off = tl.load(mrow + PB + C.L_OFF)
    l_stride = tl.load(mrow + PB + C.L_STRIDE)
    v_off = tl.load(mrow + PB + C.V_OFF)
    v_stride = tl.load(mrow + PB + C.V_STRIDE)
    mix_off = tl.load(mrow + PB + C.MIX_OFF)
    v_in = tl.load(mrow + PB + C.V_IN)
    l_sc = tl.load(mrow + PB + C.L_SC)
    v_sc = tl.load(mrow + PB + C.V_SC)
    cd = CDP.dtype.element_ty
    for r0 in range(0, r, BR):
        rr = r0 + tl.arange(0, BR)
        rt = right_tile(V, MIX, rr[None, :], kk[:, None], r, v_in, v_off, v_stride, mix_off, S_V, v_sc, RMODE, ACT,
                        J, Q)  # [BK, BR]
        lt = load_w(W_L + l_off + out_idx[None, :] * l_stride + rr[:, None], out_ok[None, :] & (rr[:, None] < r),
                    S_L, l_sc, out_idx[None, :], out_ok[None, :], rr[:, None], rr[:, None] < r, Q,
                    C.SK_LR_U)  # [BR, BN]
        Wt = mm(rt.to(cd), lt.to(cd), Wt, F32)
    return Wt


@triton.jit
def _residual_tile(Wt, mrow, out_idx, out_ok, kk, W_E, BKT, SCALE, S_E, PB: tl.constexpr, Q: tl.constexpr):
    """Wt[BK, BN] += eta[out_idx, bucket[kk]] · scale[bucket[kk]] (kk: the residual's input index; FP8 eta times
    its row scales S_E)."""
    b_in = tl.load(mrow + PB + C.B_IN)
    km = (kk >= 0) & (kk < b_in)
    b = tl.load(BKT + tl.load(mrow + PB + C.B_OFF) + kk, mask=km, other=0)
    sc = tl.load(SCALE + tl.load(mrow + PB + C.S_OFF) + b, mask=km, other=0.0)
    et = load_w(W_E + tl.load(mrow + PB + C.E_OFF) + out_idx[None, :] * tl.load(mrow + PB + C.E_STRIDE) + b[:, None],
                out_ok[None, :] & km[:, None], S_E, tl.load(mrow + PB + C.E_SC), out_idx[None, :], out_ok[None, :],
                b[:, None], km[:, None], Q, C.SK_ETA)
    return Wt + et.to(tl.float32) * sc[:, None]


@triton.jit
def _gu_tile(mrow, units, u0, nunits, kk, N, W_D, W_L, V, MIX, W_E, BKT, SCALE, S_D, S_L, S_V, S_E, CDP,
             PB: tl.constexpr, DENSE: tl.constexpr, LR: tl.constexpr, RMODE: tl.constexpr, ACT: tl.constexpr,
             J: tl.constexpr, RES: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
             F32: tl.constexpr, Q: tl.constexpr, SK_D: tl.constexpr):
    """[BK, BN] float32 tile of gate/up's weightᵀ (inputs kk × local units) rebuilt from the function's terms."""
    Wt = tl.zeros([BK, BN], dtype=tl.float32)
    if DENSE:
        ds = tl.load(mrow + PB + C.D_START)
        dl = tl.load(mrow + PB + C.D_LEN)
        oi = units - ds
        ook = (oi >= 0) & (oi < dl)
        w = load_w(W_D + tl.load(mrow + PB + C.D_OFF) + oi[None, :] * tl.load(mrow + PB + C.D_STRIDE) + kk[:, None],
                   ook[None, :] & (kk[:, None] < N), S_D, tl.load(mrow + PB + C.D_SC), oi[None, :], ook[None, :],
                   kk[:, None], kk[:, None] < N, Q, SK_D)
        Wt += w.to(tl.float32)
    if LR:
        ls = tl.load(mrow + PB + C.L_START)
        ll = tl.load(mrow + PB + C.L_LEN)
        if (u0 < ls + ll) & (u0 + BN > ls):
            oi = units - ls
            Wt = _lowrank_tile(Wt, mrow, oi, (oi >= 0) & (oi < ll), kk, W_L, V, MIX, S_L, S_V, CDP, PB, RMODE, ACT,
                               J, BR, F32, Q)
    if RES:
        Wt = _residual_tile(Wt, mrow, units, units < nunits, kk, W_E, BKT, SCALE, S_E, PB, Q)
    return Wt


@triton.jit
def _gate_up_dt_kernel(X, stride_x, N, H, stride_h, SORTED, BLOCK_FUNC, BLOCK_ROWS, META,
                       G_WD, G_WL, G_V, G_MIX, G_WE, G_BKT, G_SC, G_SD, G_SL, G_SV, G_SE,
                       U_WD, U_WL, U_V, U_MIX, U_WE, U_BKT, U_SC, U_SD, U_SL, U_SV, U_SE,
                       K: tl.constexpr, Q: tl.constexpr,
                       G_DENSE: tl.constexpr, G_LR: tl.constexpr, G_RMODE: tl.constexpr, G_ACT: tl.constexpr,
                       G_J: tl.constexpr, G_RES: tl.constexpr, G_SK_D: tl.constexpr,
                       U_DENSE: tl.constexpr, U_LR: tl.constexpr, U_RMODE: tl.constexpr, U_ACT: tl.constexpr,
                       U_J: tl.constexpr, U_RES: tl.constexpr, U_SK_D: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, F32: tl.constexpr):
    f, ok, pos = block_of(BLOCK_FUNC, BLOCK_ROWS, tl.program_id(0), BM)
    if f < 0:
        return
    mrow = META + f.to(tl.int64) * NC
    nunits = tl.load(mrow + C.U)
    u0 = tl.program_id(1) * BN
    if u0 >= nunits:
        return
    units = u0 + tl.arange(0, BN)
    x_row = (tl.load(SORTED + pos, mask=ok, other=0) // K).to(tl.int64)
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, N, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(X + x_row[:, None] * stride_x + kk[None, :], mask=ok[:, None] & (kk[None, :] < N), other=0.0)
        wg = _gu_tile(mrow, units, u0, nunits, kk, N, G_WD, G_WL, G_V, G_MIX, G_WE, G_BKT, G_SC, G_SD, G_SL, G_SV,
                      G_SE, H, 0, G_DENSE, G_LR, G_RMODE, G_ACT, G_J, G_RES, BK, BN, BR, F32, Q, G_SK_D)
        acc_g = mm(a, wg.to(a.dtype), acc_g, F32)
        wu = _gu_tile(mrow, units, u0, nunits, kk, N, U_WD, U_WL, U_V, U_MIX, U_WE, U_BKT, U_SC, U_SD, U_SL, U_SV,
                      U_SE, H, C.PROJ_COLS, U_DENSE, U_LR, U_RMODE, U_ACT, U_J, U_RES, BK, BN, BR, F32, Q, U_SK_D)
        acc_u = mm(a, wu.to(a.dtype), acc_u, F32)
    g = acc_g.to(H.dtype.element_ty).to(tl.float32)
    u = acc_u.to(H.dtype.element_ty).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + pos.to(tl.int64)[:, None] * stride_h + units[None, :], h.to(H.dtype.element_ty),
             mask=ok[:, None] & (units[None, :] < nunits))


@triton.jit
def _down_dt_kernel(H, stride_h, Y, stride_y, N, BLOCK_FUNC, BLOCK_ROWS, META, W_D, W_L, V, MIX, W_E, BKT, SC,
                    S_D, S_L, S_V, S_E, Q: tl.constexpr, DENSE: tl.constexpr, LR: tl.constexpr, RMODE: tl.constexpr,
                    ACT: tl.constexpr, J: tl.constexpr,
                    RES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                    F32: tl.constexpr, SK_D: tl.constexpr):
    f, ok, pos = block_of(BLOCK_FUNC, BLOCK_ROWS, tl.program_id(0), BM)
    if f < 0:
        return
    PB: tl.constexpr = 2 * C.PROJ_COLS
    mrow = META + f.to(tl.int64) * NC
    pos = pos.to(tl.int64)
    nunits = tl.load(mrow + PB + C.U)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cok = cols < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if DENSE:
        ds = tl.load(mrow + PB + C.D_START)
        dl = tl.load(mrow + PB + C.D_LEN)
        d_off = tl.load(mrow + PB + C.D_OFF)
        d_stride = tl.load(mrow + PB + C.D_STRIDE)
        d_sc = tl.load(mrow + PB + C.D_SC)
    if LR:
        ls = tl.load(mrow + PB + C.L_START)
    for k0 in range(0, nunits, BK):
        kk = k0 + tl.arange(0, BK)  # local units
        a = tl.load(H + pos[:, None] * stride_h + kk[None, :], mask=ok[:, None] & (kk[None, :] < nunits), other=0.0)
        Wt = tl.zeros([BK, BN], dtype=tl.float32)
        if DENSE:
            oi = kk - ds
            ook = (oi[:, None] >= 0) & (oi[:, None] < dl)
            w = load_w(W_D + d_off + cols[None, :] * d_stride + oi[:, None], cok[None, :] & ook, S_D, d_sc,
                       cols[None, :], cok[None, :], oi[:, None], ook, Q, SK_D)
            Wt += w.to(tl.float32)
        if LR:
            Wt = _lowrank_tile(Wt, mrow, cols, cok, kk - ls, W_L, V, MIX, S_L, S_V, Y, PB, RMODE, ACT, J, BR, F32, Q)
        if RES:
            Wt = _residual_tile(Wt, mrow, cols, cok, kk, W_E, BKT, SC, S_E, PB, Q)
        acc = mm(a, Wt.to(a.dtype), acc, F32)
    tl.store(Y + pos[:, None] * stride_y + cols[None, :], acc.to(Y.dtype.element_ty), mask=ok[:, None] & cok[None, :])


# ----- launchers ----------------------------------------------------------------------------------------------
def _args(pp: ProjPlan, plan: Plan, prefix: str) -> tuple[list, dict]:
    df, di = plan.dummy["f"], plan.dummy["i"]
    L, R = pp.lowrank, pp.residual
    ptrs = [pp.dense if pp.dense is not None else df, L.u if L else df, L.v if L else df, L.mix if L else df,
            R.eta if R else df, R.bucket if R else di, R.scale if R else df,
            pp.dense_s if pp.dense is not None else df, L.u_s if L else df, L.v_s if L else df, R.eta_s if R else df]
    kw = {f"{prefix}DENSE": pp.dense is not None, f"{prefix}LR": L is not None,
          f"{prefix}RMODE": L.right_mode if L else 0, f"{prefix}ACT": L.act if L else 0, f"{prefix}J": L.J if L else 1,
          f"{prefix}RES": R is not None, f"{prefix}SK_D": pp.dense_sk}
    return ptrs, kw


def gate_up_dense_tile(x: torch.Tensor, K: int, srt: Sorted, plan: Plan, cfg: dict) -> torch.Tensor:
    umax = max(plan.proj["gate"].umax, 1)
    h = torch.empty(srt.num_blocks * srt.bm, umax, dtype=x.dtype, device=x.device)
    gp, gk = _args(plan.proj["gate"], plan, "G_")
    up, uk = _args(plan.proj["up"], plan, "U_")
    bn = cfg["bn_units"]
    grid = (srt.num_blocks, triton.cdiv(umax, bn))
    _gate_up_dt_kernel[grid](x, x.stride(0), x.shape[1], h, h.stride(0), srt.sorted_pair, srt.block_func,
                             srt.block_rows, plan.meta, *gp, *up, K=K, Q=plan.q,
                             BM=srt.bm, BN=bn, BK=cfg["bk"], BR=cfg["br"],
                             F32=cfg["f32"], **gk, **uk)
    return h


def down_dense_tile(h: torch.Tensor, srt: Sorted, plan: Plan, cfg: dict) -> torch.Tensor:
    y = torch.empty(srt.num_blocks * srt.bm, plan.n, dtype=h.dtype, device=h.device)
    dp, dk = _args(plan.proj["down"], plan, "")
    bn = cfg["bn_hidden"]
    grid = (srt.num_blocks, triton.cdiv(plan.n, bn))
    _down_dt_kernel[grid](h, h.stride(0), y, y.stride(0), plan.n, srt.block_func, srt.block_rows, plan.meta, *dp,
                          Q=plan.q, BM=srt.bm, BN=bn, BK=cfg["bk"], BR=cfg["br"], F32=cfg["f32"], **dk)
    return y
