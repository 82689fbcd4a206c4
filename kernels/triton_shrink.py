"""Shrink kernels: the right-hand side of every low-rank and residual term, t = act(R)·x and u = Pᵀ·x.

* ``_token_gemm_kernel``: the shared-right-factor path. One GEMM over **all tokens** with a layer-shared right
  factor (the group-shared R of all groups when #groups ≤ top-k, or the J bases of an act=identity basis mix):
  ``out[T, cols] = x · Vᵀ``. The per-expert expand then picks its group's columns (or mixes the J basis columns
  with mix_e) per pair.
* ``_pair_shrink_kernel``: per sorted block of pairs of one function, up to two right-hand terms at once (gate's and
  up's R; or a low-rank R and the residual P): each program loads the input rows once per k-step and builds the
  right tile of each term with ``right_tile``: stored rows, a basis mix generated in registers (act applied on the
  tile, never materializing the expert's R), or the one-hot bucket projection from the stored bucket ids (the
  residual's segmented bucket sums as a tensor-core product). Ragged ranks: a program whose rank tile starts past
  both terms' ranks exits; the last tile is masked (waste < one tile).

Inputs are gathered rows: x[token] for gate/up (token = pair // K), h[sorted position] for down.

FP8 factors (``Q``): right-factor tiles are loaded as float8 and scaled by their rows' float32 scales in registers
(``load_w``), act applied on the dequantized tile; the products accumulate in float32 as for float factors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as C
from .triton_common import act_fn, block_of, load_w, mm, right_tile
from .triton_plan import Plan, ProjPlan
from .triton_sort import Sorted

NC = tl.constexpr(C.NCOLS)


@triton.jit
def _token_gemm_kernel(X, V, SV, OUT, T, NOUT, N, stride_x, stride_v, stride_o, col,
                       ACT: tl.constexpr, Q: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, N, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(X + rm[:, None] * stride_x + kk[None, :], mask=(rm[:, None] < T) & (kk[None, :] < N), other=0.0)
        bm = (rn[None, :] < NOUT) & (kk[:, None] < N)
        b = load_w(V + rn[None, :] * stride_v + kk[:, None], bm, SV, 0, rn[None, :], rn[None, :] < NOUT, kk[:, None],
                   kk[:, None] < N, Q, C.SK_LR_V)
        if ACT != 0:  # FP8 stored right factor: act on the dequantized tile
            b = tl.where(bm, act_fn(b, ACT), 0.0)
        acc = mm(a, b.to(a.dtype), acc, F32)
    tl.store(OUT + rm[:, None] * stride_o + col + rn[None, :], acc, mask=(rm[:, None] < T) & (rn[None, :] < NOUT))


@triton.jit
def _seg_bounds(mrow, ON: tl.constexpr, W: tl.constexpr, IS: tl.constexpr, IL: tl.constexpr):
    """(width, in start, in end) of one shrink segment from the function's meta row (zeros when off)."""
    if ON:
        w = tl.load(mrow + W)
        s = tl.load(mrow + IS)
        e = s + tl.load(mrow + IL)
    else:
        w = tl.load(mrow + C.ZERO)
        s = w
        e = w
    return w, s, e


@triton.jit
def _pair_shrink_kernel(IN, stride_in, SORTED, BLOCK_FUNC, BLOCK_ROWS, META, OUT, stride_out,
                        AV, AMIX, ASV, BV, BMIX, BSV,
                        BY_TOKEN: tl.constexpr, K: tl.constexpr, Q: tl.constexpr,
                        A_ON: tl.constexpr, A_MODE: tl.constexpr, A_ACT: tl.constexpr, A_J: tl.constexpr,
                        A_W: tl.constexpr, A_VO: tl.constexpr, A_VS: tl.constexpr, A_MO: tl.constexpr,
                        A_IS: tl.constexpr, A_IL: tl.constexpr, A_COL: tl.constexpr, A_SC: tl.constexpr,
                        B_ON: tl.constexpr, B_MODE: tl.constexpr, B_ACT: tl.constexpr, B_J: tl.constexpr,
                        B_W: tl.constexpr, B_VO: tl.constexpr, B_VS: tl.constexpr, B_MO: tl.constexpr,
                        B_IS: tl.constexpr, B_IL: tl.constexpr, B_COL: tl.constexpr, B_SC: tl.constexpr,
                        BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr):
    pid = tl.program_id(0)
    f, ok, pos = block_of(BLOCK_FUNC, BLOCK_ROWS, pid, BM)
    if f < 0:
        return
    mrow = META + f.to(tl.int64) * NC
    wa, sa, ea = _seg_bounds(mrow, A_ON, A_W, A_IS, A_IL)
    wb, sb, eb = _seg_bounds(mrow, B_ON, B_W, B_IS, B_IL)
    r0 = tl.program_id(1) * BR
    if r0 >= tl.maximum(wa, wb):
        return
    if BY_TOKEN:
        row = (tl.load(SORTED + pos, mask=ok, other=0) // K).to(tl.int64)
    else:
        row = pos.to(tl.int64)
    if not A_ON:
        sa, ea = sb, eb
    if not B_ON:
        sb, eb = sa, ea
    lo = tl.minimum(sa, sb)
    hi = tl.maximum(ea, eb)
    rr = r0 + tl.arange(0, BR)
    acc_a = tl.zeros([BM, BR], dtype=tl.float32)
    acc_b = tl.zeros([BM, BR], dtype=tl.float32)
    for k0 in range(lo, hi, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(IN + row[:, None] * stride_in + kk[None, :], mask=ok[:, None] & (kk[None, :] < hi), other=0.0)
        if A_ON:
            t = right_tile(AV, AMIX, rr[None, :], (kk - sa)[:, None], wa, ea - sa, tl.load(mrow + A_VO),
                           tl.load(mrow + A_VS), tl.load(mrow + A_MO), ASV, tl.load(mrow + A_SC), A_MODE, A_ACT, A_J,
                           Q)  # [BK, BR]
            acc_a = mm(a, t.to(a.dtype), acc_a, F32)
        if B_ON:
            t = right_tile(BV, BMIX, rr[None, :], (kk - sb)[:, None], wb, eb - sb, tl.load(mrow + B_VO),
                           tl.load(mrow + B_VS), tl.load(mrow + B_MO), BSV, tl.load(mrow + B_SC), B_MODE, B_ACT, B_J,
                           Q)
            acc_b = mm(a, t.to(a.dtype), acc_b, F32)
    if A_MODE == 2:  # residual: apply the bucket scales 1/sqrt(|bucket|) in float32
        acc_a *= tl.load(AMIX + tl.load(mrow + A_MO) + rr, mask=rr < wa, other=0.0)[None, :]
    if B_MODE == 2:
        acc_b *= tl.load(BMIX + tl.load(mrow + B_MO) + rr, mask=rr < wb, other=0.0)[None, :]
    out = OUT + pos.to(tl.int64)[:, None] * stride_out
    if A_ON:
        tl.store(out + A_COL + rr[None, :], acc_a.to(OUT.dtype.element_ty), mask=ok[:, None] & (rr[None, :] < wa))
    if B_ON:
        tl.store(out + B_COL + rr[None, :], acc_b.to(OUT.dtype.element_ty), mask=ok[:, None] & (rr[None, :] < wb))


# ----- launchers ----------------------------------------------------------------------------------------------
def token_shrink(x: torch.Tensor, plan: Plan, cfg: dict) -> torch.Tensor | None:
    """[T, token_cols] float32: x · Vᵀ for every gate/up right factor applied to all tokens (or None)."""
    if not plan.token_cols:
        return None
    T, n = x.shape
    out = torch.empty(T, plan.token_cols, dtype=torch.float32, device=x.device)
    for p in ("gate", "up"):
        L = plan.proj[p].lowrank
        if L is None or L.token_v is None:
            continue
        v = L.token_v
        bm, bn, bk = cfg["token_bm"], cfg["token_bn"], cfg["bk"]
        grid = (triton.cdiv(T, bm), triton.cdiv(v.shape[0], bn))
        _token_gemm_kernel[grid](x, v, L.token_v_s, out, T, v.shape[0], n, x.stride(0), v.stride(0), out.stride(0),
                                 L.col, ACT=L.act if plan.q else 0, Q=plan.q, BM=bm, BN=bn, BK=bk, F32=cfg["f32"])
    return out


def _lowrank_seg(pp: ProjPlan, down: bool) -> tuple[dict, int]:
    L, b = pp.lowrank, pp.base
    return dict(ON=True, MODE=L.right_mode, ACT=L.act, J=L.J, W=b + C.RANK, VO=b + C.V_OFF, VS=b + C.V_STRIDE,
                MO=b + C.MIX_OFF, IS=(b + C.L_START) if down else C.ZERO, IL=b + C.V_IN, COL=L.col, SC=b + C.V_SC,
                V=L.v, MIX=L.mix, SV=L.v_s), L.rmax


def _residual_seg(pp: ProjPlan) -> tuple[dict, int]:
    R, b = pp.residual, pp.base
    return dict(ON=True, MODE=C.MODE_BUCKET, ACT=0, J=1, W=b + C.RES_W, VO=b + C.B_OFF, VS=C.ZERO, MO=b + C.S_OFF,
                IS=C.ZERO, IL=b + C.B_IN, COL=R.col, SC=C.ZERO, V=R.bucket, MIX=R.scale, SV=R.scale), R.width


_OFF = dict(ON=False, MODE=0, ACT=0, J=1, W=C.ZERO, VO=C.ZERO, VS=C.ZERO, MO=C.ZERO, IS=C.ZERO, IL=C.ZERO, COL=0,
            SC=C.ZERO)


def _launch(inp, by_token, K, srt: Sorted, plan: Plan, out, a, b, width, cfg):
    kw = {}
    for prefix, seg in (("A", a), ("B", b)):
        seg = seg or dict(_OFF, V=plan.dummy["f"], MIX=plan.dummy["f"], SV=plan.dummy["f"])
        kw[prefix + "V"], kw[prefix + "MIX"], kw[prefix + "SV"] = seg["V"], seg["MIX"], seg["SV"]
        for k in ("ON", "MODE", "ACT", "J", "W", "VO", "VS", "MO", "IS", "IL", "COL", "SC"):
            kw[f"{prefix}_{k}"] = seg[k]
    br = cfg["br"]
    grid = (srt.num_blocks, triton.cdiv(width, br))
    _pair_shrink_kernel[grid](inp, inp.stride(0), srt.sorted_pair, srt.block_func, srt.block_rows, plan.meta,
                              out, out.stride(0), BY_TOKEN=by_token, K=K, Q=plan.q, BM=srt.bm, BR=br, BK=cfg["bk"],
                              F32=cfg["f32"], **kw)


def pair_shrink_gate_up(x: torch.Tensor, K: int, srt: Sorted, plan: Plan, cfg: dict) -> torch.Tensor | None:
    """[NB·BM, pair_cols_gu] (x.dtype): gate/up per-pair t = act(R_f)·x and u = Pᵀ·x, by sorted position."""
    if not plan.pair_cols_gu:
        return None
    out = torch.empty(srt.num_blocks * srt.bm, plan.pair_cols_gu, dtype=x.dtype, device=x.device)
    lr = [_lowrank_seg(plan.proj[p], False) for p in ("gate", "up")
          if plan.proj[p].lowrank is not None and plan.proj[p].lowrank.mode == "pair"]
    res = [_residual_seg(plan.proj[p]) for p in ("gate", "up")
           if plan.proj[p].residual is not None and plan.proj[p].residual.computed]
    for pair in (lr, res):
        if pair:
            segs = [s for s, _ in pair] + [None]
            _launch(x, True, K, srt, plan, out, segs[0], segs[1], max(w for _, w in pair), cfg)
    return out


def pair_shrink_down(h: torch.Tensor, srt: Sorted, plan: Plan, cfg: dict) -> torch.Tensor | None:
    """[NB·BM, pair_cols_down] (h.dtype): down's t = act(R_f)·h and u = Pᵀ·h, by sorted position."""
    if not plan.pair_cols_down:
        return None
    pp = plan.proj["down"]
    out = torch.empty(srt.num_blocks * srt.bm, plan.pair_cols_down, dtype=h.dtype, device=h.device)
    segs = ([_lowrank_seg(pp, True)] if pp.lowrank is not None else []) + \
        ([_residual_seg(pp)] if pp.residual is not None else [])
    a, b = segs[0], segs[1] if len(segs) > 1 else None
    _launch(h, False, 1, srt, plan, out, a[0], b[0] if b else None, max(w for _, w in segs), cfg)
    return out
