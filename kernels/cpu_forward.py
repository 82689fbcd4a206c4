"""CPU compute path of a compressed MoE layer: the torch path's math with the per-expert host work cut down.

Same results as ``torch_ref`` (the oracle; tests/test_cpu_kernel.py) but shaped for a CPU decode step, where the
torch path spends most of its time on host overhead per active expert function (name look-ups, zero-filled
buffers, per-function gathers and scatters, one small GEMM per term):

* a per-layer *plan*, built once per (layout, buffers): every function's factor views (per-expert or per-group
  right factor, per-expert or slot left factor, exact weights) and the unit slices they land in, so a call does no
  name formatting or view building;
* the active pairs' inputs are gathered once ([P, n]) and split per function (views, no copies);
* gate and up: per term kind a GEMM (shrink then expand for low-rank), no zero-filled accumulators; the routing
  weight scales each pair's down output, in the torch path's order (float32 results match it to the bit where the
  GEMMs are the same);
* down writes each function's rows straight into one [P, n] buffer (``mm(out=)`` / ``addmm_`` on a row slice,
  fp32 accumulation inside the GEMM), and one ``index_add_`` sums pairs into tokens at the end; the RS-MoE base
  input z is gathered the same way and multiplied once per token;
* shared work of each term kind (group right factors, basis mixes, residual projections) is done once per token by
  the torch path's own code (``_Forward``), which also serves any term this plan does not specialise.

Eager only (data-dependent loop). The CPU kernel of ``moe_lowrank::experts`` (kernels/op.py) runs
``cpu_native`` where the layer allows and this path otherwise; ``cpu_native`` reuses this module's plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layout import LayerLayout
from .torch_ref import _Forward


@dataclass
class _Term:
    """One GEMM-able term of a projection for one function: W [out, in] (dense) or L [out, r] · R [r, in]."""

    place: slice  # gate/up: output units it writes; down: input units it reads
    weight: torch.Tensor | None = None  # dense W
    right: torch.Tensor | None = None  # R (act already applied at load)
    left: torch.Tensor | None = None  # L


@dataclass
class _FuncPlan:
    expert: int  # representative expert
    count: int  # local units
    gate: list[_Term] | None  # None: computed by the torch path (shared right factors, basis mixes, residuals)
    up: list[_Term] | None
    down: list[_Term] | None
    base_idx: torch.Tensor | None  # [lowrank_local] long: original unit of each low-rank unit (RS-MoE base)
    base_place: slice | None


class _Plan:
    """Static per-layer views for the CPU path (built once per set of buffers)."""

    def __init__(self, layout: LayerLayout, bufs: dict[str, torch.Tensor]):
        self.ptr = _ptrs(bufs)
        fw = _Forward.__new__(_Forward)  # only its factor accessors (no routing)
        fw.L, fw.bufs, fw.spec, fw.cache = layout, bufs, layout.spec, {}
        fw.x = next(v for v in bufs.values() if v.is_floating_point())[:0]  # the compute dtype (float buffers)
        self.funcs = [self._func(fw, layout, fs[0]) for fs in layout.functions]
        self.base = fw.t("down", "base") if layout.spec.down.base is not None else None  # [n, width]

    @staticmethod
    def _terms(fw: _Forward, layout: LayerLayout, p: str, e: int) -> list[_Term] | None:
        ps, units = layout.spec.proj(p), layout.units[e]
        if ps.residual is not None:
            return None
        terms = []
        if ps.dense is not None:
            terms.append(_Term(units.place(ps.dense.units), weight=fw.t(p, "weight", e)))
        if (lr := ps.lowrank) is not None:
            if lr.num_bases is not None or (p != "down" and lr.right_groups is not None):
                return None  # generated per call or shared per (token, group): the torch path's code
            terms.append(_Term(units.place(lr.units), right=fw.right(p, e), left=fw.left(p, e)))
        return terms

    def _func(self, fw: _Forward, layout: LayerLayout, e: int) -> _FuncPlan:
        base, units = layout.spec.down.base, layout.units[e]
        idx = place = None
        if base is not None and base.units != "all":
            idx, place = fw.t("down", "base_idx", e).long(), units.place("lowrank")
        return _FuncPlan(e, units.count, *(self._terms(fw, layout, p, e) for p in ("gate", "up", "down")), idx,
                         place)


def _ptrs(bufs: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, v.data_ptr(), v.dtype) for k, v in bufs.items())


def plan_for(layout: LayerLayout, bufs: dict[str, torch.Tensor]) -> _Plan:
    """The layer's plan, rebuilt when its buffers change (new tensors, dtype or device)."""
    plan = getattr(layout, "_cpu_plan", None)
    if plan is None or plan.ptr != _ptrs(bufs):
        plan = _Plan(layout, bufs)
        layout._cpu_plan = plan
    return plan


def _apply(terms: list[_Term], xs: torch.Tensor, out_units: int) -> torch.Tensor:
    """gate or up of one function on its pairs' inputs xs [c, n]: [c, out_units]."""
    parts = []
    for t in terms:
        parts.append(xs @ t.weight.T if t.weight is not None else (xs @ t.right.T) @ t.left.T)
    order = sorted(range(len(terms)), key=lambda i: terms[i].place.start)
    edges = [0] + [b for i in order for b in (terms[i].place.start, terms[i].place.stop)] + [out_units]
    if all(edges[j] == edges[j + 1] for j in range(0, len(edges), 2)):  # disjoint, in order, covering all units
        return parts[0] if len(parts) == 1 else torch.cat([parts[i] for i in order], 1)
    out = xs.new_zeros(xs.shape[0], out_units)
    for t, p in zip(terms, parts):
        out[:, t.place] += p
    return out


def _down(terms: list[_Term], h: torch.Tensor, out: torch.Tensor) -> None:
    """out [c, n] (a row slice of the pairs' output) = Σ terms of down on h [c, u]."""
    for i, t in enumerate(terms):
        hi = h[:, t.place]
        a, b = (hi, t.weight.T) if t.weight is not None else (hi @ t.right.T, t.left.T)
        if i == 0:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)


class _CpuForward(_Forward):
    def run(self) -> torch.Tensor:
        x, L = self.x, self.L
        plan = plan_for(L, self.bufs)
        T, n = x.shape[0], self.cfg.hidden_size
        P = self.tok.numel()
        xs = x.index_select(0, self.tok)  # [P, n] inputs of the pairs, sorted by function
        ws = self.w.to(x.dtype)[:, None]  # [P, 1]
        ys = x.new_empty(P, n)  # [P, n] weighted output of each pair
        base = self.spec.down.base
        if base is not None:
            width = L.units[L.local_experts[0]].count if base.units == "all" else self.cfg.intermediate_size
            z = x.new_zeros(T, width, dtype=self.acc)
        start = 0
        for f, c in enumerate(self.counts):
            if c == 0:
                continue
            fp, pairs = plan.funcs[f], slice(start, start + c)
            start += c
            xe, e = xs[pairs], fp.expert
            g = _apply(fp.gate, xe, fp.count) if fp.gate is not None else self.unit_proj("gate", e, xe, pairs)
            u = _apply(fp.up, xe, fp.count) if fp.up is not None else self.unit_proj("up", e, xe, pairs)
            h = F.silu(g).mul_(u)  # [c, u_e]
            if fp.down is not None:
                _down(fp.down, h, ys[pairs])
                ys[pairs].mul_(ws[pairs])  # the routing weight after down, as the torch path applies it
            else:
                ys[pairs] = (self.w[pairs, None] * self.down(e, h)).to(ys.dtype)
            if base is None:
                continue
            tok, h = self.tok[pairs], h * ws[pairs]  # the base's input carries the weight
            if base.units == "all":
                z.index_add_(0, tok, h.to(self.acc))
            else:
                flat = (tok[:, None] * width + fp.base_idx[None, :]).reshape(-1)  # [c * lowrank_local]
                z.view(-1).index_add_(0, flat, h[:, fp.base_place].to(self.acc).reshape(-1))
        y = x.new_zeros(T, n, dtype=self.acc).index_add_(0, self.tok, ys.to(self.acc))
        if base is not None:
            b = self.t("down", "base")  # [n, width]
            y += z.to(b.dtype) @ b.T  # once per token
        return y.to(x.dtype)


def experts_forward_cpu(layout: LayerLayout, bufs: dict[str, torch.Tensor], x: torch.Tensor,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """[T, n] un-reduced output of this rank's experts (same contract as ``torch_ref.experts_forward``)."""
    return _CpuForward(layout, bufs, x, topk_weights, topk_ids).run()
