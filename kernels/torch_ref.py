"""Torch compute path of a compressed MoE layer: y = Σ_k w_k · expert_k(x), directly from the factors.

No dense expert weight is ever built or cached. Work shared across experts is done once:

* a group-shared right factor (MoE-SVD, RFID-MoE): act(V_g)·x once per (token, group);
* a basis mix with act=identity (gate/up): B_j·x once per token, mixed per (token, expert) with mix_e;
  with a non-identity act the expert's right factor act(Σ_j mix_ej·B_j) is generated inside the call, not cached;
* the residual projection P_gᵀ·x once per (token, group) (and shared by gate/up when both use the same buckets);
* experts that are the same function (same left slot and right group everywhere: MoE-SVD trimmed experts) run
  once per token with their routing weights summed;
* the RS-MoE down base once per token: z = Σ_k w_k·scatter(h_L), y += z·Bᵀ.

Pairs (token, expert) are sorted by expert function and each active function runs as a few GEMMs on its tokens.
FP8 factors are dequantized where they are used (``layout.weight``: q · scale in float32, then x's dtype), one
expert's factor at a time; shared ones once per call.
Eager only (data-dependent loop): it runs inside the ``moe_lowrank::experts`` custom op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_moe_lowrank.format import Act, apply_act

from .layout import LayerLayout


def experts_forward(layout: LayerLayout, bufs: dict[str, torch.Tensor], x: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """[T, n] un-reduced output of this rank's experts; ``bufs`` are the layout's buffers plus finalize()'s."""
    return _Forward(layout, bufs, x, topk_weights, topk_ids).run()


class _PerGroup:
    """(token, group) pairs deduplicated: ``row[i]`` is pair i's row in its group's shared product."""

    def __init__(self, tok: torch.Tensor, gid: torch.Tensor, num_tokens: int):
        key, inv = torch.unique(gid * num_tokens + tok, return_inverse=True)  # sorted by group, then token
        self.tok = key % num_tokens  # [Q] token of each unique (token, group)
        groups, counts = torch.unique_consecutive(key // num_tokens, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        self.span = {g: (s, c) for g, s, c in zip(groups.tolist(), starts.tolist(), counts.tolist())}
        self.row = inv - starts[torch.searchsorted(groups, gid)]  # [P] row within the pair's group

    def compute(self, fn) -> dict[int, torch.Tensor]:
        """fn(group, tokens) -> [n_g, ·] for every touched group."""
        return {g: fn(g, self.tok[s:s + c]) for g, (s, c) in self.span.items()}


class _Forward:
    def __init__(self, layout, bufs, x, topk_weights, topk_ids):
        self.L, self.bufs, self.x = layout, bufs, x
        self.spec, self.cfg = layout.spec, layout.cfg
        self.acc = torch.promote_types(x.dtype, torch.float32)  # accumulation dtype
        T = x.shape[0]
        tok = torch.arange(T, device=x.device).repeat_interleave(topk_ids.shape[1])  # [T*K]
        fid = bufs["func_of_expert"][topk_ids.reshape(-1).long()]  # [T*K] function id, -1: not on this rank
        w = topk_weights.reshape(-1).to(self.acc)  # [T*K]
        keep = fid >= 0
        tok, fid, w = tok[keep], fid[keep], w[keep]
        nf = len(layout.functions)
        if nf < len(layout.local_experts):  # identical experts: one (token, function) pair, weights summed
            key, inv = torch.unique(tok * nf + fid, return_inverse=True)
            w = torch.zeros(key.numel(), dtype=w.dtype, device=w.device).index_add_(0, inv, w)
            tok, fid = key // nf, key % nf
        order = torch.argsort(fid, stable=True)
        self.tok, self.fid, self.w = tok[order], fid[order], w[order]  # [P] pairs sorted by function
        self.counts = torch.bincount(self.fid, minlength=nf).tolist()
        self.cache: dict = {}

    # ----- tensors ------------------------------------------------------------------------------------------
    def t(self, p: str, suffix: str, e: int | None = None) -> torch.Tensor:
        """A stored tensor for compute (FP8 factors dequantized by ``layout.weight``; shared ones once per call)."""
        name = self.L.name(p, suffix, e)
        if e is None and self.L.blocks[name].spec.scale is not None:
            key = ("tensor", name)
            if key not in self.cache:
                self.cache[key] = self.L.weight(self.bufs, name, self.x.dtype)
            return self.cache[key]
        return self.L.weight(self.bufs, name, self.x.dtype)

    def left(self, p: str, e: int) -> torch.Tensor:
        """L_e [out, r] (a view)."""
        lr = self.spec.proj(p).lowrank
        if lr.left_slots is None:
            return self.t(p, "lr_u", e)
        s = lr.left_slots[e]
        off = sum(lr.slot_ranks()[:s])
        return self.t(p, "lr_u")[:, off:off + lr.ranks[e]]  # [out, r]

    def right(self, p: str, e: int) -> torch.Tensor:
        """R_e [r, in] with act applied (a view, or generated now for a basis mix; never cached)."""
        lr = self.spec.proj(p).lowrank
        if lr.num_bases is not None:
            bases = self.t(p, "lr_v").view(lr.num_bases, lr.ranks[e], -1)  # [J, r, in]
            mixed = torch.einsum("j,jri->ri", self.t(p, "lr_mix", e).to(self.acc), bases.to(self.acc))  # [r, in]
            return apply_act(lr.act, mixed).to(self.x.dtype)
        if lr.right_groups is not None:
            g = lr.right_groups[e]
            off = sum(lr.group_ranks()[:g])
            return self.t(p, "lr_v")[off:off + lr.ranks[e]]  # [r, in], act applied at load
        return self.t(p, "lr_v", e)  # [r, in], act applied at load

    # ----- shared work --------------------------------------------------------------------------------------
    def per_group(self, groups: list[int]) -> _PerGroup:
        """(token, group) dedup for a per-expert group assignment (shared by every term using the same one)."""
        key = ("groups", tuple(groups))
        if key not in self.cache:
            of_func = torch.tensor([groups[fs[0]] for fs in self.L.functions], device=self.x.device)
            self.cache[key] = _PerGroup(self.tok, of_func[self.fid], self.x.shape[0])
        return self.cache[key]

    def group_right(self, p: str) -> tuple[_PerGroup, dict[int, torch.Tensor]]:
        """gate/up group-shared right factor: act(V_g)·x once per (token, group)."""
        key = ("right", p)
        if key not in self.cache:
            lr = self.spec.proj(p).lowrank
            pg = self.per_group(lr.right_groups)
            ranks = lr.group_ranks()
            v = self.t(p, "lr_v")  # [Σ r_g, n]

            def fn(g, tok):
                off = sum(ranks[:g])
                return self.x[tok] @ v[off:off + ranks[g]].T  # [n_g, r_g]

            self.cache[key] = (pg, pg.compute(fn))
        return self.cache[key]

    def basis_x(self, p: str) -> torch.Tensor:
        """gate/up basis mix with act=identity: B_j·x once per token, [T, J·r]."""
        key = ("bases", p)
        if key not in self.cache:
            self.cache[key] = self.x @ self.t(p, "lr_v").T
        return self.cache[key]

    def bucket_sum(self, p: str, g: int, v: torch.Tensor) -> torch.Tensor:
        """P_gᵀ·v [rows, width]: scaled sums of v's columns per bucket (v's columns are this rank's inputs)."""
        res = self.spec.proj(p).residual
        idx = self.t(p, "res_bucket")[g].long()  # [in]
        u = v.new_zeros(v.shape[0], res.width, dtype=self.acc).index_add_(1, idx, v.to(self.acc))
        return (u * self.bufs[f"res_scale_{p}"][g].to(self.acc)).to(v.dtype)  # [rows, width]

    def group_residual(self, p: str) -> tuple[_PerGroup, dict[int, torch.Tensor]]:
        """gate/up residual input P_gᵀ·x once per (token, group)."""
        if p == "up" and self.L.residual_shared:
            p = "gate"
        key = ("res", p)
        if key not in self.cache:
            pg = self.per_group(self.spec.proj(p).residual.groups)
            self.cache[key] = (pg, pg.compute(lambda g, tok: self.bucket_sum(p, g, self.x[tok])))
        return self.cache[key]

    # ----- per function -------------------------------------------------------------------------------------
    def unit_proj(self, p: str, e: int, xe: torch.Tensor, pairs: slice) -> torch.Tensor:
        """gate or up of expert e on its tokens: [c, u_e] in local compact unit order."""
        ps, units = self.spec.proj(p), self.L.units[e]
        out = xe.new_zeros(xe.shape[0], units.count, dtype=self.acc)
        if ps.dense is not None:
            out[:, units.place(ps.dense.units)] += xe @ self.t(p, "weight", e).T
        if (lr := ps.lowrank) is not None:
            if lr.right_groups is not None:
                pg, prods = self.group_right(p)
                t = prods[lr.right_groups[e]][pg.row[pairs]]  # [c, r]
            elif lr.num_bases is not None and Act(lr.act) is Act.identity:
                bx = self.basis_x(p)[self.tok[pairs]].view(xe.shape[0], lr.num_bases, -1)  # [c, J, r]
                t = torch.einsum("cjr,j->cr", bx, self.t(p, "lr_mix", e).to(bx.dtype))  # [c, r]
            else:
                t = xe @ self.right(p, e).T  # [c, r]
            out[:, units.place(lr.units)] += t @ self.left(p, e).T
        if (res := ps.residual) is not None:
            pg, prods = self.group_residual(p)
            u = prods[res.groups[e]][pg.row[pairs]]  # [c, width]
            out += u @ self.t(p, "res_eta", e).T
        return out.to(xe.dtype)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """down of expert e without the shared base: [c, n]."""
        ps, units = self.spec.down, self.L.units[e]
        y = h.new_zeros(h.shape[0], self.cfg.hidden_size, dtype=self.acc)
        if ps.dense is not None:
            y += h[:, units.place(ps.dense.units)] @ self.t("down", "weight", e).T
        if (lr := ps.lowrank) is not None:
            t = h[:, units.place(lr.units)] @ self.right("down", e).T  # [c, r]
            y += t @ self.left("down", e).T
        if (res := ps.residual) is not None:
            y += self.bucket_sum("down", res.groups[e], h) @ self.t("down", "res_eta", e).T
        return y

    def run(self) -> torch.Tensor:
        x, L = self.x, self.L
        T = x.shape[0]
        y = x.new_zeros(T, self.cfg.hidden_size, dtype=self.acc)
        base = self.spec.down.base
        if base is not None:  # z = Σ w·scatter(h) over the base's units: all local units, or all m originals
            width = L.units[L.local_experts[0]].count if base.units == "all" else self.cfg.intermediate_size
            z = x.new_zeros(T, width, dtype=self.acc)
        start = 0
        for f, c in enumerate(self.counts):
            if c == 0:
                continue
            pairs = slice(start, start + c)
            start += c
            e = L.functions[f][0]
            tok, w = self.tok[pairs], self.w[pairs, None]  # [c], [c, 1]
            xe = x[tok]  # [c, n]
            h = F.silu(self.unit_proj("gate", e, xe, pairs)) * self.unit_proj("up", e, xe, pairs)  # [c, u_e]
            y.index_add_(0, tok, w * self.down(e, h))
            if base is None:
                continue
            if base.units == "all":
                z.index_add_(0, tok, w * h.to(self.acc))
            else:
                units = L.units[e]
                idx = self.t("down", "base_idx", e).long()  # [lowrank_local] original unit of each
                flat = (tok[:, None] * width + idx[None, :]).reshape(-1)  # [c * lowrank_local]
                z.view(-1).index_add_(0, flat, (w * h[:, units.place("lowrank")].to(self.acc)).reshape(-1))
        if base is not None:
            b = self.t("down", "base")  # [n, width]
            y += z.to(b.dtype) @ b.T  # once per token: [T, width] x [width, n]
        return y.to(x.dtype)
