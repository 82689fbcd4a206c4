"""Static plan of one compressed layer for the Triton path: the meta table and the per-projection choices.

Built once per (layer, device) from the ``LayerLayout`` (pure Python, static) and the loaded buffers (only the
residual bucket scales and the base's unit indices are read, on the device). Nothing here depends on the tokens,
so the forward pass only launches kernels on static shapes (CUDA-graph safe).

For each projection it decides how the low-rank term's right factor is applied on the low-rank path:

* ``pair``: per (token, expert) pair in the shrink kernel: a per-expert R, a group's R when there are more groups
  than routed experts per token, and any basis mix with a non-identity act (act(Σ_j mix_j·B_j) generated tile by
  tile in registers; never materialized);
* ``token``: one GEMM over all tokens, then per-pair expand: a group-shared R when #groups ≤ top-k (every token
  needs most groups anyway: "one GEMM for all tokens per group"), and a basis mix with act = identity
  (B_j·x once per token, mixed per pair with mix_e inside the expand kernel: ``tokmix``).

down's input differs per pair (h), so down always uses ``pair``.

FP8 factors (``Plan.q``): the kernels read the FP8 buffers directly; each factor's float32 scale buffer is kept
beside it (``*_s``; a dummy for float factors) and the meta table gives each function's scale offsets (``C.D_SC``
...); ``ProjPlan.dense_sk`` is the dense weight's scale axis, which depends on the projection and the version. A
stored right factor's act is then applied on the dequantized tile (``Lowrank.act``), not at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_moe_lowrank.format import Act

from . import triton_common as C
from .layout import LayerLayout


@dataclass
class Lowrank:
    mode: str  # "pair" | "token" | "tokmix" (low-rank path; the dense-tile path always builds tiles itself)
    right_mode: int  # C.MODE_STORED | C.MODE_BASIS (how to build R tiles)
    act: int  # act code applied on the tile (MODE_BASIS; MODE_STORED with FP8 — float factors had it at load)
    J: int  # number of bases (1 unless MODE_BASIS)
    rmax: int  # largest rank over the local functions
    v: torch.Tensor  # lr_v buffer (bases / groups / per expert)
    u: torch.Tensor  # lr_u buffer (slots / per expert)
    mix: torch.Tensor  # lr_mix buffer (float32) or a dummy
    v_s: torch.Tensor  # lr_v scale buffer (FP8) or a dummy
    u_s: torch.Tensor  # lr_u scale buffer (FP8) or a dummy
    token_v: torch.Tensor | None = None  # [rows, n] shared right factor applied to all tokens (token / tokmix)
    token_v_s: torch.Tensor | None = None  # [rows] its scales (FP8) or a dummy
    col: int = 0  # column of this term's t in the pair shrink buffer, or its first column in the token buffer


@dataclass
class Residual:
    width: int
    eta: torch.Tensor  # res_eta buffer
    bucket: torch.Tensor  # res_bucket buffer (int32)
    scale: torch.Tensor  # [G, width] float32 bucket scales 1/sqrt(|bucket|)
    eta_s: torch.Tensor  # res_eta scale buffer (FP8) or a dummy
    col: int = 0  # column of u = Pᵀx in the pair shrink buffer
    computed: bool = True  # False: up reuses gate's u (same buckets)


@dataclass
class ProjPlan:
    name: str
    base: int  # first meta column of this projection
    dense: torch.Tensor | None = None  # weight buffer
    dense_s: torch.Tensor | None = None  # its scale buffer (FP8) or a dummy
    dense_sk: bool = False  # FP8 weight scales index its columns (down's units, format v3), not its rows
    lowrank: Lowrank | None = None
    residual: Residual | None = None
    umax: int = 0  # largest local unit count


@dataclass
class Plan:
    F: int
    n: int
    meta: torch.Tensor  # [F, NCOLS] int64
    func_of_expert: torch.Tensor  # [E] int64
    proj: dict[str, ProjPlan]
    pair_cols_gu: int  # width of the gate/up pair shrink buffer
    pair_cols_down: int
    token_cols: int  # width of the token shrink buffer (gate/up token-mode terms)
    base: str | None = None  # None | "all" | "lowrank"
    base_w: torch.Tensor | None = None  # base buffer
    base_s: torch.Tensor | None = None  # its scale buffer (FP8) or a dummy
    base_off: int = 0
    base_soff: int = 0  # offset of the base's row scales
    base_stride: int = 0
    base_width: int = 0  # z width: local units ("all") or m ("lowrank")
    base_inv: torch.Tensor | None = None  # [F, m] int32: compact low-rank index of each original unit, -1 absent
    dummy: dict = field(default_factory=dict)
    q: bool = False  # FP8 factors with float32 scales


def build_plan(layout: LayerLayout, bufs: dict[str, torch.Tensor], topk: int) -> Plan:
    """Meta table and per-projection choices; ``topk`` decides token vs pair mode for group-shared factors."""
    spec, cfg = layout.spec, layout.cfg
    funcs = layout.functions
    F = len(funcs)
    reps = [fs[0] for fs in funcs]
    dev = next(iter(bufs.values())).device
    meta = [[0] * C.NCOLS for _ in range(F)]
    dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    projs: dict[str, ProjPlan] = {}
    pair_gu = pair_down = token_cols = 0

    def scale_of(name: str) -> tuple[torch.Tensor, int]:
        """(scale buffer, offset of the scales of checkpoint tensor ``name``); (dummy, 0) for float factors."""
        sname = layout.blocks[name].spec.scale if layout.quantized and name in layout.blocks else None
        if sname is None:
            return dummy_f, 0
        b = layout.blocks[sname]
        return bufs[b.buffer], b.offset

    for p in ("gate", "up", "down"):
        ps, pb = spec.proj(p), C.PROJ_BASE[p]
        pp = ProjPlan(p, pb)
        blk = lambda suffix, e: layout.blocks[layout.name(p, suffix, e)]  # noqa: E731
        for f, e in enumerate(reps):
            units = layout.units[e]
            meta[f][pb + C.U] = units.count
            pp.umax = max(pp.umax, units.count)
        if ps.dense is not None:
            pp.dense = bufs[layout.blocks[layout.name(p, "weight", reps[0])].buffer] if reps else dummy_f
            pp.dense_s = scale_of(layout.name(p, "weight", reps[0]))[0] if reps else dummy_f
            pp.dense_sk = layout.quantized and bool(reps) and blk("weight", reps[0]).spec.scale_axis == 1
            for f, e in enumerate(reps):
                pl, b = layout.units[e].place(ps.dense.units), blk("weight", e)
                meta[f][pb + C.D_START], meta[f][pb + C.D_LEN] = pl.start, pl.stop - pl.start
                meta[f][pb + C.D_OFF], meta[f][pb + C.D_STRIDE] = b.offset, b.shape[1]
                meta[f][pb + C.D_SC] = scale_of(layout.name(p, "weight", e))[1]
        if (lr := ps.lowrank) is not None:
            basis, groups = lr.num_bases is not None, lr.right_groups is not None
            act = Act(lr.act)
            if p != "down" and basis and act is Act.identity:
                mode = "tokmix"
            elif p != "down" and groups and max(lr.right_groups) + 1 <= topk:
                mode = "token"
            else:
                mode = "pair"
            vname = layout.name(p, "lr_v", None if (basis or groups) else reps[0] if reps else 0)
            uname = layout.name(p, "lr_u", None if lr.left_slots is not None else reps[0] if reps else 0)
            v = bufs[layout.blocks[vname].buffer] if vname in layout.blocks else dummy_f
            u = bufs[layout.blocks[uname].buffer] if uname in layout.blocks else dummy_f
            mixname = layout.name(p, "lr_mix", reps[0]) if basis and reps else None
            mix = bufs[layout.blocks[mixname].buffer] if mixname in layout.blocks else dummy_f
            v_s, u_s = scale_of(vname)[0], scale_of(uname)[0]
            q_act = basis or (layout.quantized and vname in layout.blocks)  # FP8: act not applied at load
            L = Lowrank(mode, C.MODE_BASIS if basis else C.MODE_STORED, C.ACT_CODES[act.value] if q_act else 0,
                        lr.num_bases if basis else 1, 0, v, u, mix, v_s, u_s)
            granks = lr.group_ranks() if groups else None
            sranks = lr.slot_ranks() if lr.left_slots is not None else None
            for f, e in enumerate(reps):
                pl, r = layout.units[e].place(lr.units), lr.ranks[e]
                L.rmax = max(L.rmax, r)
                row = meta[f]
                row[pb + C.L_START], row[pb + C.L_LEN], row[pb + C.RANK] = pl.start, pl.stop - pl.start, r
                if sranks is not None:
                    s = lr.left_slots[e]
                    b = layout.blocks[layout.name(p, "lr_u", None)]
                    row[pb + C.L_OFF], row[pb + C.L_STRIDE] = b.offset + sum(sranks[:s]), b.shape[1]
                    row[pb + C.L_SC] = scale_of(b.spec.name)[1] + (sum(sranks[:s]) if b.spec.scale_axis == 1 else 0)
                else:
                    b = blk("lr_u", e)
                    row[pb + C.L_OFF], row[pb + C.L_STRIDE] = b.offset, b.shape[1]
                    row[pb + C.L_SC] = scale_of(b.spec.name)[1]
                if basis:
                    b = layout.blocks[layout.name(p, "lr_v", None)]
                    row[pb + C.V_OFF], row[pb + C.V_STRIDE] = b.offset, b.shape[1]
                    row[pb + C.MIX_OFF] = blk("lr_mix", e).offset
                    row[pb + C.V_SC] = scale_of(b.spec.name)[1]
                elif groups:
                    b = layout.blocks[layout.name(p, "lr_v", None)]
                    goff = sum(granks[:lr.right_groups[e]])
                    row[pb + C.V_OFF], row[pb + C.V_STRIDE] = b.offset + goff * b.shape[1], b.shape[1]
                    row[pb + C.TOK_COL] = goff
                    row[pb + C.V_SC] = scale_of(b.spec.name)[1] + (goff if b.spec.scale_axis == 0 else 0)
                else:
                    b = blk("lr_v", e)
                    row[pb + C.V_OFF], row[pb + C.V_STRIDE] = b.offset, b.shape[1]
                    row[pb + C.V_SC] = scale_of(b.spec.name)[1]
                row[pb + C.V_IN] = b.shape[1]
            if mode in ("token", "tokmix"):
                L.token_v = layout.view(bufs, vname)  # [rows, n]
                sname = layout.blocks[vname].spec.scale
                L.token_v_s = layout.view(bufs, sname) if sname else dummy_f  # [rows]
                L.col = token_cols
                for f in range(F):
                    meta[f][pb + C.TOK_COL] += token_cols
                token_cols += L.token_v.shape[0]
            elif p == "down":
                L.col, pair_down = pair_down, pair_down + L.rmax
            else:
                L.col, pair_gu = pair_gu, pair_gu + L.rmax
            pp.lowrank = L
        if (res := ps.residual) is not None:
            bname = layout.name(p, "res_bucket", None)
            scale = bufs[f"res_scale_{p}"].to(torch.float32).contiguous()
            R = Residual(res.width, bufs[blk("res_eta", reps[0]).buffer] if reps else dummy_f,
                         bufs[layout.blocks[bname].buffer], scale,
                         scale_of(layout.name(p, "res_eta", reps[0]))[0] if reps else dummy_f)
            bb = layout.blocks[bname]
            for f, e in enumerate(reps):
                g, b = res.groups[e], blk("res_eta", e)
                row = meta[f]
                row[pb + C.E_OFF], row[pb + C.E_STRIDE] = b.offset, b.shape[1]
                row[pb + C.B_OFF], row[pb + C.B_IN] = bb.offset + g * bb.shape[1], bb.shape[1]
                row[pb + C.S_OFF], row[pb + C.RES_W] = g * res.width, res.width
                row[pb + C.E_SC] = scale_of(b.spec.name)[1]
            if p == "up" and layout.residual_shared:
                R.computed, R.col = False, projs["gate"].residual.col
            elif p == "down":
                R.col, pair_down = pair_down, pair_down + res.width
            else:
                R.col, pair_gu = pair_gu, pair_gu + res.width
            pp.residual = R
        projs[p] = pp
    plan = Plan(F, cfg.hidden_size, torch.empty(0), bufs["func_of_expert"], projs, pair_gu, pair_down, token_cols)
    plan.dummy = {"f": dummy_f, "i": dummy_i}
    plan.q = layout.quantized
    if (base := spec.down.base) is not None:
        b = layout.blocks[layout.name("down", "base", None)]
        plan.base, plan.base_w = base.units, bufs[b.buffer]
        plan.base_off, plan.base_stride = b.offset, b.shape[1]
        plan.base_s, plan.base_soff = scale_of(b.spec.name)
        if base.units == "all":
            plan.base_width = b.shape[1]
        else:
            m = cfg.intermediate_size
            plan.base_width = m
            inv = torch.full((max(F, 1), m), -1, dtype=torch.int32, device=dev)
            for f, e in enumerate(reps):
                meta[f][C.BASE_LR_START] = layout.units[e].place("lowrank").start
                idx = layout.view(bufs, layout.name("down", "base_idx", e)).long()
                inv[f].scatter_(0, idx, torch.arange(idx.numel(), dtype=torch.int32, device=dev))
            plan.base_inv = inv
    plan.meta = torch.tensor(meta if meta else [[0] * C.NCOLS], dtype=torch.int64, device=dev)
    return plan
