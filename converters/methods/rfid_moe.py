"""``rfid-moe``: routing-frequency × information-density rank allocation with a sparse residual (RFID-MoE).

Paper: "Effective MoE-based LLM Compression by Exploiting Heterogeneous Inter-Group Experts Routing Frequency and
Information Density" (arXiv 2602.09316). Only the abstract is available; methods.md §5 collects what is known.
Per MoE layer and projection type (docs/methods/rfid-moe.md has every choice, why, and the measurements):

1. Group (§3.1): sort the experts by calibration routing frequency f_e and cut them into groups of k.
2. Information density (§3.2): effective rank of the group's stacked weight, exp(H(p)), p_i = σ_i / Σσ
   (Roy & Vetterli 2007).
3. Fusion and allocation (§3.3, Eq. 13): C_g = ξ·Ê_g + (1 − ξ)·F̂_g; group ranks K_g ∝ C_g, K_g ≥ 1, filled to the
   exact parameter budget.
4. Factors: gate/up share a right factor per group, W_e ≈ A_e·B_g (whitened SVD of the stacked group, then a
   per-expert least-squares refit with the expert's own Gram) [ours: whitening and refit].
5. Residual (§3.4): η_e·P_gᵀ with P_g a one-hot bucket projection [n, s] (PᵀP = I) shared by the group and by
   gate/up; buckets from the residual's energy, η_e fitted by least squares; its m·s floats per expert count.
6. down stays dense (paper) while that is the better use of the budget; otherwise (and beyond the paper's 2/3 cap)
   it gets an output-side group basis, W_e ≈ U_g·V_e, exact under per-expert whitening [ours].
7. Held-out choice [ours]: fitted on 3/4 of the calibration tokens, the layer is kept only if it changes the routed
   MoE output clearly less on the held-out 1/4 than per-expert whitened SVD at the same budget (else the layer is
   that SVD); the kept fit is refitted on every token (``fallback``, ``xi_select=heldout``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from vllm_moe_lowrank.format import PROJS, DenseTerm, LayerSpec, LowRankTerm, ProjSpec, ResidualTerm, bucket_projection

from ..budget import layer_budget
from ..calibration import LayerCalibration, clearly_lower, routed_output_sq_error
from ..errors import ConvertError, RatioError
from ..experts import ExpertWeights
from ..method import CompressedLayer, Damp, Method, MethodSettings, Shrink
from ..whitening import whitening
from .moe_svd_fit import _GramCache, per_expert_svd
from .rfid_moe_fit import (Candidate, GroupStats, LayerPlan, TypeCurve, _accumulate, allocate_ranks,  # noqa: F401
                           effective_rank, energy_buckets, frequency_groups, importance, least_squares_left,
                           random_buckets, shared_left_factor, shared_right_factor, split_budget)

GU = ("gate", "up")
XI_GRID = (0.0, 0.2, 0.5, 0.8, 1.0)  # ξ candidates of xi_select=calib


class RFIDSettings(MethodSettings):
    group_size: int = Field(4, gt=0)  # k experts per group, consecutive in routing-frequency order (§3.1)
    allocation: Literal["fused", "uniform", "frequency", "erank"] = "fused"  # ablations of §3.3
    xi: float = Field(0.2, ge=0.0, le=1.0)  # weight of the effective rank in C_g (§3.3; paper ≈ 0.8, measured)
    norm: Literal["sum", "minmax"] = "sum"  # normalisation of erank and frequency across groups
    erank_on: Literal["weight", "whitened"] = "weight"  # spectrum of the plain (paper) or whitened group stack
    residual: bool = True  # the sparse residual term (§3.4); False: its budget goes to ranks
    residual_frac: float = Field(0.03, gt=0.0, lt=1.0)  # s = round(frac·n) buckets: η costs ≈ frac of gate/up
    buckets: Literal["energy", "random"] = "energy"  # one-hot bucket assignment
    whiten: bool = True  # SVD-LLM whitening with the calibration Grams [ours]; False: plain weight SVD (paper)
    refit: bool = True  # per-expert least-squares refit of A_e (and η_e) with the expert's own Gram [ours]
    down: Literal["auto", "dense", "lowrank"] = "auto"  # auto: per layer, whichever the spectra predict better
    split: Literal["energy", "equal"] = "energy"  # budget across projection types: greedy on whitened error
    damp: Damp = 1e-4  # relative Gram damping
    shrink: Shrink = 0.1  # shrinkage of rare experts' input Grams toward the layer mean
    seed: int = 0  # random buckets: per-layer generator seeded with seed + layer
    # calib: per layer, the ξ of XI_GRID whose plan the calibration spectra predict best; heldout: whose fit changes
    # the routed MoE output least on held-out calibration tokens (5 fits a layer); fixed: the ``xi`` option
    xi_select: Literal["calib", "heldout", "fixed"] = "calib"
    # per layer, fall back to per-expert whitened SVD at the same budget (``svd``) unless rfid-moe changes the routed
    # MoE output clearly less (by 2 standard errors) on held-out calibration tokens [ours]
    fallback: bool = True


class RFIDMoEMethod(Method):
    name = "rfid-moe"
    Settings = RFIDSettings

    # ----- sizes (no calibration needed) ------------------------------------------------------------------
    def _enm(self) -> int:
        a = self.arch
        return a.num_experts * a.hidden_size * a.intermediate_size

    def _group_sizes(self) -> list[int]:
        E, k = self.arch.num_experts, self.settings.group_size
        return [min(k, E - i) for i in range(0, E, k)]

    def _costs(self) -> list[int]:
        """Floats of one rank of group g: n for the shared factor row/column + m per member for its own."""
        n, m = self.arch.hidden_size, self.arch.intermediate_size
        return [k * m + n for k in self._group_sizes()]

    def _caps(self) -> list[int]:
        n, m = self.arch.hidden_size, self.arch.intermediate_size
        return [min(k * m, n) for k in self._group_sizes()]

    def _width(self) -> int:
        """Residual buckets s = round(frac·n), at least 2 (one singleton + the catch-all), below n."""
        s, n = self.settings, self.arch.hidden_size
        return min(max(2, round(s.residual_frac * n)), n - 1) if s.residual else 0

    def _fixed(self, p: str, width: int) -> int:
        return self.arch.num_experts * self.arch.intermediate_size * width if p in GU else 0

    def _modes(self) -> list[bool]:
        """Candidate down modes (True: low-rank), most faithful to the paper first."""
        return {"dense": [False], "lowrank": [True], "auto": [False, True]}[self.settings.down]

    def _range(self, down_lowrank: bool) -> tuple[int, int]:
        """(fewest, most) floats a layer can store in this down mode."""
        width, cost, caps = self._width(), self._costs(), self._caps()
        types = PROJS if down_lowrank else GU
        lo = sum(self._fixed(p, width) + sum(cost) for p in types)
        hi = sum(self._fixed(p, width) + sum(c * k for c, k in zip(cost, caps)) for p in types)
        extra = 0 if down_lowrank else self._enm()
        return lo + extra, hi + extra

    def _total(self) -> int:
        a = self.arch
        return layer_budget(self.ctx.ratio, a.num_experts, a.hidden_size, a.intermediate_size)

    def _feasible_modes(self) -> list[bool]:
        slack = int(0.004 * 3 * self._enm())  # budget a mode may leave unspent (caps) and still meet ±0.005
        return [d for d in self._modes() if self._range(d)[0] <= self._total() <= self._range(d)[1] + slack]

    def check_feasible(self) -> None:
        if self._feasible_modes():
            return
        ratio, enm3 = self.ctx.ratio, 3 * self._enm()
        limits = "; ".join(
            f"down {'low-rank' if d else 'dense'}: ratios {1 - self._range(d)[1] / enm3:.4f} .. "
            f"{1 - self._range(d)[0] / enm3:.4f}" for d in self._modes())
        hint = ""
        if self.settings.down == "dense":
            hint = " (the paper keeps down dense, which caps the ratio below 2/3; -o down=auto compresses it too)"
        elif self._width():
            hint = " (-o residual=false frees the residual's share)"
        raise RatioError(f"--ratio {ratio}: infeasible for rfid-moe on this model with these options; every group "
                         f"needs rank >= 1 and at most full rank. Feasible: {limits}{hint}")

    def dry_run(self):
        modes = self._feasible_modes()
        return [{"layer": l, "groups": len(self._group_sizes()), "group_size": self.settings.group_size,
                 "residual_width": self._width(), "params": self._total(),
                 "down": ("lowrank" if modes[0] else "dense") if len(modes) == 1 else "dense or lowrank (calibrated)",
                 "ranks": "per group, from routing frequency and effective rank (calibrated)"}
                for l in self.arch.moe_layers]

    # ----- statistics -------------------------------------------------------------------------------------
    def _in_grams(self, calib: LayerCalibration, members: list[int], mean: torch.Tensor | None):
        n, dev, s = self.arch.hidden_size, self.ctx.device, self.settings
        if not s.whiten:
            return [torch.eye(n, dtype=torch.float64, device=dev) for _ in members]
        a = self.arch
        if 8 * a.num_experts * a.hidden_size ** 2 > 2**30:  # all of a layer's input Grams over 1 GiB: recompute
            return [calib.expert_gram_in(e, s.damp, s.shrink).to(dev) for e in members]
        cache = self.__dict__.setdefault("_grams", {})  # (calibration, expert) -> Gram; compress_layer clears it
        for e in members:
            if (id(calib), e) not in cache:
                cache[id(calib), e] = calib.expert_gram_in(e, s.damp, s.shrink).to(dev)
        return [cache[id(calib), e] for e in members]

    def _mid_grams(self, calib: LayerCalibration, weights: ExpertWeights, members: list[int]):
        m, dev, s = self.arch.intermediate_size, self.ctx.device, self.settings
        if not s.whiten:
            return [torch.eye(m, dtype=torch.float64, device=dev) for _ in members]
        return [calib.expert_gram_mid(e, weights, s.damp, s.shrink).to(dev) for e in members]

    def _weights(self, weights: ExpertWeights, p: str, members: list[int]) -> list[torch.Tensor]:
        return [weights.get(p, e, torch.float64).to(self.ctx.device) for e in members]

    def _statistics(self, weights, calib, groups, mean, types) -> GroupStats:
        """Per group and type: effective rank (plain stack, paper; or whitened) and the whitened stack spectrum.

        Spectra come from the n×n Gram of the stack: gate/up Sᵀ(Σ W_eᵀW_e)S with S·Sᵀ = Σ G_e (the stack
        [W_e·S]_e); down Σ W_e·G_e·W_eᵀ (the stack [W_e·S_e]_e). One group's Grams at a time.
        """
        erank: dict[str, list[float]] = {p: [] for p in types}
        eig: dict[str, list[torch.Tensor]] = {p: [] for p in types}
        for members in groups:
            grams = self._in_grams(calib, members, mean)
            S = whitening(sum(grams)).S  # [n, n]
            mids = self._mid_grams(calib, weights, members) if "down" in types else None
            for p in types:
                Ws = self._weights(weights, p, members)
                if p == "down":
                    plain = sum(W @ W.T for W in Ws)  # [n, n]
                    white = sum(W @ G @ W.T for W, G in zip(Ws, mids))  # [n, n]
                else:
                    plain = sum(W.T @ W for W in Ws)  # [n, n]
                    white = S.T @ plain @ S
                lw = torch.linalg.eigvalsh((white + white.T) / 2).flip(0).clamp(min=0).cpu()  # [n] σ², descending
                lp = lw if self.settings.erank_on == "whitened" else torch.linalg.eigvalsh(
                    (plain + plain.T) / 2).clamp(min=0).cpu()
                erank[p].append(effective_rank(lp.sqrt()))
                eig[p].append(lw)
        return GroupStats(erank=erank, eig=eig)

    def _plan(self, stats: GroupStats, imp: dict[str, list[float]]) -> LayerPlan:
        """Down mode and per-type budgets (energy split, or equal), then the group ranks of each type."""
        width, total, enm = self._width(), self._total(), self._enm()
        best = None
        for down_lr in self._feasible_modes():
            types = PROJS if down_lr else GU
            curves = {p: TypeCurve(weight=imp[p], cost=self._costs(), cap=self._caps(), fixed=self._fixed(p, width),
                                   eig=stats.eig[p]) for p in types}
            avail = total - (0 if down_lr else enm)
            if self.settings.split == "energy":
                budgets = split_budget(avail, curves)
            else:
                share = avail // len(types)
                budgets = {p: share for p in types}
                budgets[types[-1]] = avail - share * (len(types) - 1)
            predicted = {p: c.error(budgets[p]) for p, c in curves.items()}
            plan = LayerPlan(down_lowrank=down_lr, width=width, budgets=budgets,
                             ranks={p: c.ranks(budgets[p]) for p, c in curves.items()}, predicted=predicted)
            if best is None or sum(predicted.values()) < sum(best.predicted.values()):
                best = plan
        return best

    # ----- the work ---------------------------------------------------------------------------------------
    def compress_layer(self, layer: int, weights: ExpertWeights, calib: LayerCalibration | None) -> CompressedLayer:
        self._grams: dict[tuple[int, int], torch.Tensor] = {}
        try:
            return self._compress(layer, weights, calib)
        finally:
            self._grams = {}

    def _compress(self, layer: int, weights: ExpertWeights, calib: LayerCalibration | None) -> CompressedLayer:
        s = self.settings
        if calib is None:
            raise ConvertError("rfid-moe needs calibration data for its routing frequencies: pass --calib-data")
        if not s.fallback and s.xi_select != "heldout":
            return self._fit(layer, weights, calib, self._candidates(weights, calib)[0])
        # held-out choice [ours]: candidates fitted on 3/4 of the calibration tokens, judged by the change of the
        # routed MoE output on the held-out quarter (LayerCalibration.holdout_split), the winner refitted on all
        fit, held = calib.holdout_split()
        cands = self._candidates(weights, fit)
        if s.xi_select != "heldout":
            cands = cands[:1]
        dy2, seen = {}, set()
        for c in cands:  # ξ values whose plans coincide give the same fit: scored once
            key = (c.plan.down_lowrank, tuple((p, tuple(r)) for p, r in sorted(c.plan.ranks.items())))
            if key not in seen:
                seen.add(key)
                dy2[c.xi] = routed_output_sq_error(self.arch, layer, self._fit(layer, weights, fit, c), weights, held)
        xi = min(dy2, key=lambda x: (float(dy2[x].mean()), x))
        info = {f"xi_{x}_rms_dy": round(math.sqrt(float(v.mean())), 6) for x, v in dy2.items()}
        keep = True
        if s.fallback:
            grams = _GramCache(weights, fit, s.damp, s.shrink, self.ctx.device)
            try:
                alone = per_expert_svd(self.name, layer, weights, fit, grams, self._total(), s.damp, s.shrink,
                                       self.ctx.dtype)
                svd_dy2 = routed_output_sq_error(self.arch, layer, alone, weights, held)
                keep = clearly_lower(dy2[xi], svd_dy2)
                info["per_expert_svd_rms_dy"] = round(math.sqrt(float(svd_dy2.mean())), 6)
            except RatioError:  # the budget leaves per-expert SVD below rank 1: rfid-moe is the only fit
                pass
        if keep:
            c = next(c for c in self._candidates(weights, calib, xis=(xi,)))
            chosen = self._fit(layer, weights, calib, c)
        else:
            grams = _GramCache(weights, calib, s.damp, s.shrink, self.ctx.device)
            chosen = per_expert_svd(self.name, layer, weights, calib, grams, self._total(), s.damp, s.shrink,
                                    self.ctx.dtype)
        chosen.info["held_out_choice"] = {"rfid": keep, "xi": xi, "judged_on": "held-out calibration tokens", **info}
        return chosen

    def _candidates(self, weights: ExpertWeights, calib: LayerCalibration,
                    xis: tuple[float, ...] | None = None) -> list[Candidate]:
        """Frequency groups, statistics and one plan per ξ (xi_select=heldout/calib: XI_GRID, fixed: ``xi``), the
        plan with the smallest spectrally predicted whitened error first (ties: lower ξ)."""
        s = self.settings
        freq = calib.frequency()  # [E]
        groups = frequency_groups(freq, s.group_size)
        gfreq = [float(freq[mm].sum()) for mm in groups]
        types = GU if self._modes() == [False] else PROJS
        stats = self._statistics(weights, calib, groups, None, types)
        if xis is None:
            xis = XI_GRID if s.allocation == "fused" and s.xi_select != "fixed" else (s.xi,)
        cands = []
        for xi in xis:
            imp = {p: importance(stats.erank[p], gfreq, s.allocation, xi, s.norm) for p in types}
            cands.append(Candidate(xi, groups, gfreq, stats, imp, self._plan(stats, imp)))
        return sorted(cands, key=lambda c: (sum(c.plan.predicted.values()), c.xi))

    def _fit(self, layer: int, weights: ExpertWeights, calib: LayerCalibration, cand: Candidate) -> CompressedLayer:
        """Factors of one planned candidate: shared right factors and residual for gate/up, down dense or shared-left
        on ĥ."""
        s, E = self.settings, self.arch.num_experts
        xi, groups, gfreq, stats, imp, plan = cand.xi, cand.groups, cand.gfreq, cand.stats, cand.imp, cand.plan
        group_of = [0] * E
        for g, members in enumerate(groups):
            for e in members:
                group_of[e] = g
        mean = None  # calibration.expert_gram_in shrinks toward its own (cached) layer mean

        tensors: dict = {}
        right: dict[str, list[torch.Tensor]] = {p: [] for p in GU}
        down_u, buckets = [], []
        gen = torch.Generator().manual_seed(s.seed + layer)
        err = {p: [0.0, 0.0] for p in plan.ranks}
        gu_hat: dict[int, dict[str, torch.Tensor]] = {}  # compressed gate/up of each expert (down is fitted on ĥ)
        for g, members in enumerate(groups):
            grams = self._in_grams(calib, members, mean)
            Ws = {p: self._weights(weights, p, members) for p in GU}
            P = None
            if plan.width:
                bucket = self._buckets(Ws, grams, [plan.ranks[p][g] for p in GU], plan.width, gen)
                buckets.append(bucket)
                P = bucket_projection(bucket, plan.width).to(self.ctx.device)  # [n, s]
            for p in GU:
                fit = shared_right_factor(Ws[p], grams, plan.ranks[p][g], s.refit, P)
                right[p].append(fit.B)
                for i, e in enumerate(members):
                    tensors[p, "lr_u", e] = fit.A[i].cpu()  # [m, K_g]
                    approx = fit.A[i] @ fit.B
                    if fit.eta is not None:
                        tensors[p, "res_eta", e] = fit.eta[i].cpu()  # [m, s]
                        approx = approx + fit.eta[i] @ P.T
                    _accumulate(err[p], Ws[p][i], approx, grams[i])
                    gu_hat.setdefault(e, {})[p] = approx.to(self.ctx.dtype).double().cpu()
            if s.whiten:  # down's targets and Grams on ĥ of the gate/up as written (calibration.down_target)
                tg = [calib.down_target(e, weights, gu_hat[e]["gate"], gu_hat[e]["up"], s.damp, s.shrink)
                      for e in members]
                Wd, mids = [W.to(self.ctx.device) for W, _ in tg], [G.to(self.ctx.device) for _, G in tg]
            else:
                Wd, mids = self._weights(weights, "down", members), self._mid_grams(calib, weights, members)
            if not plan.down_lowrank:
                for i, e in enumerate(members):  # dense down refitted on ĥ (same size; W_d itself without data)
                    tensors["down", "weight", e] = Wd[i].float().cpu()  # [n, m]
            if plan.down_lowrank:
                U, Vs = shared_left_factor(Wd, mids, plan.ranks["down"][g])
                down_u.append(U)
                for i, e in enumerate(members):
                    tensors["down", "lr_v", e] = Vs[i].cpu()  # [K_g, m]
                    _accumulate(err["down"], Wd[i], U @ Vs[i], mids[i])
        for p in GU:
            tensors[p, "lr_v", None] = torch.cat(right[p]).cpu()  # [Σ K_g, n]
            if plan.width:
                tensors[p, "res_bucket", None] = torch.stack(buckets)  # [G, n] int32, same for gate and up
        if plan.down_lowrank:
            tensors["down", "lr_u", None] = torch.cat(down_u, dim=1).cpu()  # [n, Σ K_g]
            down = ProjSpec(lowrank=LowRankTerm(ranks=[plan.ranks["down"][group_of[e]] for e in range(E)],
                                                left_slots=group_of))
        else:
            down = ProjSpec(dense=DenseTerm())
        gu = {p: ProjSpec(lowrank=LowRankTerm(ranks=[plan.ranks[p][group_of[e]] for e in range(E)],
                                              right_groups=group_of),
                          residual=ResidualTerm(groups=group_of, width=plan.width) if plan.width else None)
              for p in GU}
        info = {"groups": groups, "group_frequency": [round(f, 5) for f in gfreq], "xi": xi,
                "down": "lowrank" if plan.down_lowrank else "dense", "residual_width": plan.width,
                "budgets": plan.budgets, "group_ranks": plan.ranks,
                "effective_rank": {p: [round(x, 2) for x in v] for p, v in stats.erank.items()},
                "importance": {p: [round(x, 4) for x in v] for p, v in imp.items()},
                "predicted_rel_err": {p: math.sqrt(v) for p, v in plan.predicted.items()},
                "whitened_rel_err": {p: math.sqrt(num / den) if den else 0.0 for p, (num, den) in err.items()}}
        return CompressedLayer(spec=LayerSpec(method=self.name, down=down, **gu), tensors=tensors, info=info)

    def _buckets(self, Ws: dict[str, list[torch.Tensor]], grams: list[torch.Tensor], ranks: list[int], width: int,
                 gen: torch.Generator) -> torch.Tensor:
        """One group's [n] bucket ids, shared by gate and up (they read the same input)."""
        n = self.arch.hidden_size
        if self.settings.buckets == "random":
            return random_buckets(n, width, gen)
        res = []
        for p, K in zip(GU, ranks):  # the residual the low-rank part alone leaves
            fit = shared_right_factor(Ws[p], grams, K, self.settings.refit)
            res += [(W - A @ fit.B, G) for W, A, G in zip(Ws[p], fit.A, grams)]
        return energy_buckets(res, width, n)


METHOD = RFIDMoEMethod
