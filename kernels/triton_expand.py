"""Expand kernels of the low-rank path: every term's left side, summed per output tile, with the epilogues.

``_gate_up_kernel`` (grid: sorted blocks × unit tiles) computes, for one function's block of pairs and one tile of
its local units (compact order [exact | low-rank]), gate and up as the sum of their terms and stores
h = silu(gate) ⊙ up (the SiLU-and-multiply epilogue in registers):

* dense (the kept / exact units: a gather GEMM over the block's token rows against the unit segment's rows);
* low-rank: t @ L_fᵀ, where t is the pair's shrink output (per-expert R, a group's R, a generated basis mix), or
  the token GEMM's columns of the function's group (shared right factor), or Σ_j mix_fj · (B_j·x) mixed while
  loading (act = identity basis mix);
* residual: u @ eta_fᵀ with u = Pᵀx from the shrink.

A tile overlapping only one unit segment skips the other segment's term. ``_down_kernel`` (grid: sorted blocks ×
hidden tiles) sums down's dense (h's exact-unit columns), low-rank (t_down @ L_fᵀ) and residual (u_down @ eta_fᵀ)
terms into the pair's output row (not yet weighted; ``triton_combine`` gathers and weights it).

FP8 factors (``Q``): weight tiles are loaded as float8 and scaled in registers (``load_w``: eta per bucket, L per
rank column, the dense weight along its format axis ``SK_D``: gate/up per unit row, down per unit column since
format v3), then cast to the activation dtype for the product (float32 accumulation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as C
from .triton_common import block_of, load_w, mm
from .triton_plan import Plan, ProjPlan
from .triton_sort import Sorted

NC = tl.constexpr(C.NCOLS)
LR_NONE, LR_PAIR, LR_TOKEN, LR_TOKMIX = 0, 1, 2, 3


@triton.jit
def _term(acc, IN, in_row, in_stride, in_col, row_ok, width, W, w_off, w_stride, out_idx, out_ok, MIX, mix_off,
          SC, sc_off, CDP, TOKMIX: tl.constexpr, J: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
          F32: tl.constexpr, Q: tl.constexpr, SC_K: tl.constexpr):
    """acc[BM, BN] += In[rows, in_col : in_col + width] @ W[out_idx, :width]ᵀ  (W rows at w_off + i·w_stride).

    TOKMIX: In is Σ_j MIX[mix_off + j] · IN[rows, in_col + j·width + k] (a basis mix of per-token basis products).
    Q (FP8 W): W · SC[sc_off + k] (SC_K: scales along W's second axis: lr_u's rank, eta's buckets) or
    · SC[sc_off + out_idx] (per output row); the product runs in CDP's element type (the activation dtype).
    """
    for k0 in range(0, width, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < width
        src = IN + in_row[:, None] * in_stride + in_col + kk[None, :]
        am = row_ok[:, None] & km[None, :]
        if TOKMIX:
            a = tl.zeros([BM, BK], dtype=tl.float32)
            for j in tl.static_range(J):
                a += tl.load(MIX + mix_off + j) * tl.load(src + j * width, mask=am, other=0.0).to(tl.float32)
        else:
            a = tl.load(src, mask=am, other=0.0)
        w = load_w(W + w_off + out_idx[None, :] * w_stride + kk[:, None], out_ok[None, :] & km[:, None], SC, sc_off,
                   out_idx[None, :], out_ok[None, :], kk[:, None], km[:, None], Q, SC_K)  # [BK, BN]
        cd = CDP.dtype.element_ty
        acc = mm(a.to(cd), w.to(cd), acc, F32)
    return acc


@triton.jit
def _proj_tile(mrow, units, u0, nunits, X, x_row, stride_x, N, TB, stride_tb, pos, TS, stride_ts, row_ok,
               W_D, W_L, W_E, MIX, S_D, S_L, S_E, CDP,
               PB: tl.constexpr, DENSE: tl.constexpr, LR: tl.constexpr, LR_COL: tl.constexpr, J: tl.constexpr,
               RES: tl.constexpr, RES_COL: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr, Q: tl.constexpr,
               SK_D: tl.constexpr):
    """[BM, BN] float32: one gate/up projection of the block's pairs on the unit tile [u0, u0 + BN)."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if DENSE:
        ds = tl.load(mrow + PB + C.D_START)
        dl = tl.load(mrow + PB + C.D_LEN)
        if (u0 < ds + dl) & (u0 + BN > ds):
            oi = units - ds
            acc = _term(acc, X, x_row, stride_x, 0, row_ok, N, W_D, tl.load(mrow + PB + C.D_OFF),
                        tl.load(mrow + PB + C.D_STRIDE), oi, (oi >= 0) & (oi < dl), MIX, 0,
                        S_D, tl.load(mrow + PB + C.D_SC), CDP, False, 1, BM, BK, F32, Q, SK_D)
    if LR != 0:
        ls = tl.load(mrow + PB + C.L_START)
        ll = tl.load(mrow + PB + C.L_LEN)
        if (u0 < ls + ll) & (u0 + BN > ls):
            oi = units - ls
            ook = (oi >= 0) & (oi < ll)
            r = tl.load(mrow + PB + C.RANK)
            l_off = tl.load(mrow + PB + C.L_OFF)
            l_stride = tl.load(mrow + PB + C.L_STRIDE)
            l_sc = tl.load(mrow + PB + C.L_SC)
            if LR == 1:
                acc = _term(acc, TB, pos, stride_tb, LR_COL, row_ok, r, W_L, l_off, l_stride, oi, ook, MIX, 0,
                            S_L, l_sc, CDP, False, 1, BM, BK, F32, Q, C.SK_LR_U)
            elif LR == 2:
                acc = _term(acc, TS, x_row, stride_ts, tl.load(mrow + PB + C.TOK_COL), row_ok, r, W_L, l_off,
                            l_stride, oi, ook, MIX, 0, S_L, l_sc, CDP, False, 1, BM, BK, F32, Q, C.SK_LR_U)
            else:
                acc = _term(acc, TS, x_row, stride_ts, tl.load(mrow + PB + C.TOK_COL), row_ok, r, W_L, l_off,
                            l_stride, oi, ook, MIX, tl.load(mrow + PB + C.MIX_OFF), S_L, l_sc, CDP, True, J, BM, BK,
                            F32, Q, C.SK_LR_U)
    if RES:
        acc = _term(acc, TB, pos, stride_tb, RES_COL, row_ok, tl.load(mrow + PB + C.RES_W), W_E,
                    tl.load(mrow + PB + C.E_OFF), tl.load(mrow + PB + C.E_STRIDE), units, units < nunits, MIX, 0,
                    S_E, tl.load(mrow + PB + C.E_SC), CDP, False, 1, BM, BK, F32, Q, C.SK_ETA)
    return acc


@triton.jit
def _gate_up_kernel(X, stride_x, N, TB, stride_tb, TS, stride_ts, H, stride_h,
                    SORTED, BLOCK_FUNC, BLOCK_ROWS, META,
                    G_WD, G_WL, G_WE, G_MIX, G_SD, G_SL, G_SE, U_WD, U_WL, U_WE, U_MIX, U_SD, U_SL, U_SE,
                    K: tl.constexpr, Q: tl.constexpr,
                    G_DENSE: tl.constexpr, G_LR: tl.constexpr, G_LR_COL: tl.constexpr, G_J: tl.constexpr,
                    G_RES: tl.constexpr, G_RES_COL: tl.constexpr, G_SK_D: tl.constexpr,
                    U_DENSE: tl.constexpr, U_LR: tl.constexpr, U_LR_COL: tl.constexpr, U_J: tl.constexpr,
                    U_RES: tl.constexpr, U_RES_COL: tl.constexpr, U_SK_D: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr):
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
    pos = pos.to(tl.int64)
    g = _proj_tile(mrow, units, u0, nunits, X, x_row, stride_x, N, TB, stride_tb, pos, TS, stride_ts, ok,
                   G_WD, G_WL, G_WE, G_MIX, G_SD, G_SL, G_SE, H, 0, G_DENSE, G_LR, G_LR_COL, G_J, G_RES, G_RES_COL,
                   BM, BN, BK, F32, Q, G_SK_D)
    u = _proj_tile(mrow, units, u0, nunits, X, x_row, stride_x, N, TB, stride_tb, pos, TS, stride_ts, ok,
                   U_WD, U_WL, U_WE, U_MIX, U_SD, U_SL, U_SE, H, C.PROJ_COLS, U_DENSE, U_LR, U_LR_COL, U_J, U_RES,
                   U_RES_COL, BM, BN, BK, F32, Q, U_SK_D)
    g = g.to(H.dtype.element_ty).to(tl.float32)  # the projections are rounded to the activation dtype, as in torch
    u = u.to(H.dtype.element_ty).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + pos[:, None] * stride_h + units[None, :], h.to(H.dtype.element_ty),
             mask=ok[:, None] & (units[None, :] < nunits))


@triton.jit
def _down_kernel(H, stride_h, TB, stride_tb, Y, stride_y, N, BLOCK_FUNC, BLOCK_ROWS, META, W_D, W_L, W_E,
                 S_D, S_L, S_E, Q: tl.constexpr, DENSE: tl.constexpr, LR: tl.constexpr, LR_COL: tl.constexpr,
                 RES: tl.constexpr,
                 RES_COL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr,
                 SK_D: tl.constexpr):
    f, ok, pos = block_of(BLOCK_FUNC, BLOCK_ROWS, tl.program_id(0), BM)
    if f < 0:
        return
    mrow = META + f.to(tl.int64) * NC + 2 * C.PROJ_COLS
    pos = pos.to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cok = cols < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if DENSE:
        acc = _term(acc, H, pos, stride_h, tl.load(mrow + C.D_START), ok, tl.load(mrow + C.D_LEN), W_D,
                    tl.load(mrow + C.D_OFF), tl.load(mrow + C.D_STRIDE), cols, cok, W_D, 0, S_D,
                    tl.load(mrow + C.D_SC), Y, False, 1, BM, BK, F32, Q, SK_D)
    if LR:
        acc = _term(acc, TB, pos, stride_tb, LR_COL, ok, tl.load(mrow + C.RANK), W_L, tl.load(mrow + C.L_OFF),
                    tl.load(mrow + C.L_STRIDE), cols, cok, W_L, 0, S_L, tl.load(mrow + C.L_SC), Y, False, 1, BM, BK,
                    F32, Q, C.SK_LR_U)
    if RES:
        acc = _term(acc, TB, pos, stride_tb, RES_COL, ok, tl.load(mrow + C.RES_W), W_E, tl.load(mrow + C.E_OFF),
                    tl.load(mrow + C.E_STRIDE), cols, cok, W_E, 0, S_E, tl.load(mrow + C.E_SC), Y, False, 1, BM, BK,
                    F32, Q, C.SK_ETA)
    tl.store(Y + pos[:, None] * stride_y + cols[None, :], acc.to(Y.dtype.element_ty), mask=ok[:, None] & cok[None, :])


# ----- launchers ----------------------------------------------------------------------------------------------
def _lr_kind(pp: ProjPlan) -> int:
    L = pp.lowrank
    if L is None:
        return LR_NONE
    return {"pair": LR_PAIR, "token": LR_TOKEN, "tokmix": LR_TOKMIX}[L.mode]


def _proj_args(pp: ProjPlan, dummy: torch.Tensor, prefix: str) -> tuple[list, dict]:
    L, R = pp.lowrank, pp.residual
    ptrs = [pp.dense if pp.dense is not None else dummy, L.u if L else dummy, R.eta if R else dummy,
            L.mix if L else dummy, pp.dense_s if pp.dense is not None else dummy, L.u_s if L else dummy,
            R.eta_s if R else dummy]
    kw = {f"{prefix}_DENSE": pp.dense is not None, f"{prefix}_LR": _lr_kind(pp),
          f"{prefix}_LR_COL": L.col if L else 0, f"{prefix}_J": L.J if L else 1,
          f"{prefix}_RES": R is not None, f"{prefix}_RES_COL": R.col if R else 0, f"{prefix}_SK_D": pp.dense_sk}
    return ptrs, kw


def gate_up(x: torch.Tensor, K: int, srt: Sorted, plan: Plan, tb, ts, cfg: dict) -> torch.Tensor:
    """h [NB·BM, umax] (x.dtype) by sorted position: silu(gate) ⊙ up of each pair on its function's units."""
    umax = max(plan.proj["gate"].umax, 1)
    h = torch.empty(srt.num_blocks * srt.bm, umax, dtype=x.dtype, device=x.device)
    dummy = plan.dummy["f"]
    tb = tb if tb is not None else dummy
    ts = ts if ts is not None else dummy
    gp, gk = _proj_args(plan.proj["gate"], dummy, "G")
    up, uk = _proj_args(plan.proj["up"], dummy, "U")
    bn = cfg["bn_units"]
    grid = (srt.num_blocks, triton.cdiv(umax, bn))
    _gate_up_kernel[grid](x, x.stride(0), x.shape[1], tb, tb.stride(0) if tb.dim() == 2 else 0, ts,
                          ts.stride(0) if ts.dim() == 2 else 0, h, h.stride(0), srt.sorted_pair, srt.block_func,
                          srt.block_rows, plan.meta, *gp, *up, K=K, Q=plan.q, BM=srt.bm, BN=bn, BK=cfg["bk"],
                          F32=cfg["f32"],
                          **gk, **uk)
    return h


def down(h: torch.Tensor, srt: Sorted, plan: Plan, td, cfg: dict) -> torch.Tensor:
    """[NB·BM, n] (h.dtype) by sorted position: down of each pair (all terms but the shared base), unweighted."""
    pp, dummy = plan.proj["down"], plan.dummy["f"]
    y = torch.empty(srt.num_blocks * srt.bm, plan.n, dtype=h.dtype, device=h.device)
    td = td if td is not None else dummy
    L, R = pp.lowrank, pp.residual
    bn = cfg["bn_hidden"]
    grid = (srt.num_blocks, triton.cdiv(plan.n, bn))
    _down_kernel[grid](h, h.stride(0), td, td.stride(0) if td.dim() == 2 else 0, y, y.stride(0), plan.n,
                       srt.block_func, srt.block_rows, plan.meta, pp.dense if pp.dense is not None else dummy,
                       L.u if L else dummy, R.eta if R else dummy, pp.dense_s if pp.dense is not None else dummy,
                       L.u_s if L else dummy, R.eta_s if R else dummy, Q=plan.q, DENSE=pp.dense is not None,
                       LR=L is not None,
                       LR_COL=L.col if L else 0, RES=R is not None, RES_COL=R.col if R else 0, BM=srt.bm, BN=bn,
                       BK=cfg["bk"], F32=cfg["f32"], SK_D=pp.dense_sk)
    return y
