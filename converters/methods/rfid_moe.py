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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from vllm_moe_lowrank.format import PROJS, DenseTerm, LayerSpec, LowRankTerm, ProjSpec, ResidualTerm, bucket_projection

from ..budget import layer_budget
from ..calibration import LayerCalibration
from ..errors import ConvertError, RatioError
from ..experts import ExpertWeights
from ..method import CompressedLayer, Damp, Method, MethodSettings, Shrink
from ..whitening import solve_spd, whitening

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
    # calib: per layer, the ξ of XI_GRID whose plan the calibration spectra predict best (never the eval text);
    # fixed: the ``xi`` option
    xi_select: Literal["calib", "fixed"] = "calib"


# ----- allocation -------------------------------------------------------------------------------------------
def frequency_groups(freq: torch.Tensor, k: int) -> list[list[int]]:
    """Experts sorted by routing frequency (descending, ties by id) cut into groups of k consecutive (§3.1)."""
    order = sorted(range(freq.numel()), key=lambda e: (-float(freq[e]), e))
    return [order[i:i + k] for i in range(0, len(order), k)]


def effective_rank(sigma: torch.Tensor) -> float:
    """exp(−Σ p_i log p_i) with p_i = σ_i / Σσ (Roy & Vetterli 2007): 1 for rank one, d for a flat spectrum."""
    s = sigma.double().clamp(min=0)
    p = s / s.sum().clamp(min=1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _normalise(v: list[float], how: str) -> list[float]:
    if how == "minmax":
        lo, hi = min(v), max(v)
        return [1.0] * len(v) if hi - lo <= 1e-12 * max(abs(hi), 1.0) else [(x - lo) / (hi - lo) for x in v]
    tot = sum(v)
    return [1.0 / len(v)] * len(v) if tot <= 0 else [x / tot for x in v]


def importance(erank: list[float], freq: list[float], how: str, xi: float, norm: str) -> list[float]:
    """C_g = ξ·Ê_g + (1 − ξ)·F̂_g (§3.3); "frequency" / "erank" are ξ = 0 / 1, "uniform" is C_g = 1."""
    if how == "uniform":
        return [1.0] * len(erank)
    xi = {"frequency": 0.0, "erank": 1.0}.get(how, xi)
    e_hat, f_hat = _normalise(erank, norm), _normalise(freq, norm)
    return [xi * a + (1.0 - xi) * b for a, b in zip(e_hat, f_hat)]


def allocate_ranks(weight: list[float], cost: list[int], cap: list[int], budget: int) -> list[int]:
    """Integer group ranks K_g ∝ weight_g with 1 ≤ K_g ≤ cap_g and Σ K_g·cost_g ≤ budget, left over < one rank.

    Eq. 13's K_g = max(1, ⌊K_total·C_g/ΣC⌋) exceeds the budget when the guard fires; here K_g = clip(λ·C_g, 1, cap_g)
    with λ solved exactly (the spend is piecewise linear in λ), the floors are topped up by largest fraction, and
    what is left buys single ranks for the most important groups that still fit.
    """
    G = len(weight)
    if sum(cost) > budget:
        raise ValueError(f"budget {budget} cannot give every group rank 1 (needs {sum(cost)})")
    w = np.maximum(np.asarray(weight, dtype=np.float64), 0.0)
    if w.sum() <= 0:
        w = np.ones(G)
    c, hi = np.asarray(cost, dtype=np.float64), np.asarray(cap, dtype=np.float64)
    pos = w > 0
    lams = np.unique(np.concatenate([1.0 / w[pos], hi[pos] / w[pos]]))  # breakpoints of the spend
    spend = np.clip(np.outer(lams, w), 1.0, hi) @ c  # [B] nondecreasing
    k = int(np.searchsorted(spend, budget, side="right"))
    if k >= len(lams):
        target = np.clip(lams[-1] * w, 1.0, hi)
    else:  # spend[k-1] <= budget < spend[k]; k >= 1 since the first breakpoint spends Σ cost
        lam = lams[k - 1] + (budget - spend[k - 1]) / (spend[k] - spend[k - 1]) * (lams[k] - lams[k - 1])
        target = np.clip(lam * w, 1.0, hi)
    t = target.tolist()
    ranks = [max(1, min(int(math.floor(x + 1e-9)), cap[g])) for g, x in enumerate(t)]
    left = budget - sum(cc * r for cc, r in zip(cost, ranks))
    for g in sorted(range(G), key=lambda g: (-(t[g] - ranks[g]), -w[g], g)):
        if ranks[g] < cap[g] and cost[g] <= left:
            ranks[g] += 1
            left -= cost[g]
    order = sorted(range(G), key=lambda g: (-w[g], g))
    while any(ranks[g] < cap[g] and cost[g] <= left for g in order):
        for g in order:
            if ranks[g] < cap[g] and cost[g] <= left:
                ranks[g] += 1
                left -= cost[g]
    return ranks


# ----- factorizations ---------------------------------------------------------------------------------------
def least_squares_left(W: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """argmin_A ‖(W − A·basis)·S‖_F with S·Sᵀ = gram: A = W·G·basisᵀ·(basis·G·basisᵀ)⁻¹. W [o, n], basis [r, n]."""
    GB = gram @ basis.T  # [n, r]
    M = basis @ GB  # [r, r]
    return solve_spd((M + M.T) / 2, W @ GB)  # [o, r]


@dataclass
class SharedRight:
    """One group's gate or up factors: W_e ≈ A_e·B (+ η_e·Pᵀ)."""

    B: torch.Tensor  # [K, n]
    A: list[torch.Tensor]  # per member [m, K]
    eta: list[torch.Tensor] | None = None  # per member [m, s]


def top_eigen(M: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ [K], V [d, K]): the K largest eigenpairs of a symmetric PSD matrix, descending, λ clamped at 0."""
    lam, V = torch.linalg.eigh((M + M.T) / 2)
    return lam.flip(0)[:K].clamp(min=0), V.flip(1)[:, :K]


def shared_right_factor(Ws: list[torch.Tensor], grams: list[torch.Tensor], K: int, refit: bool,
                        P: torch.Tensor | None = None) -> SharedRight:
    """Group-shared right factor under the group's whitening: SVD-LLM over the stack [W_e·S_g]_e, S_g·S_gᵀ = Σ G_e.

    The top-K right singular vectors of the stack (eigenvectors of its n×n Gram S_gᵀ(Σ W_eᵀW_e)S_g) give the
    Frobenius-optimal shared right factor for the summed Gram (Eckart–Young on the stack). With a residual
    projection P [n, s] the stack is first deflated by the whitened span of Pᵀ, so the basis models what the sparse
    rows cannot. ``refit``: the left factors (and η_e) are then fitted jointly by least squares with each expert's
    own Gram; otherwise A_e = U_e·Σ^½ from the SVD and η_e is fitted to what is left.
    """
    white = whitening(sum(grams))  # S_g [n, n]
    S = white.S
    M = S.T @ sum(W.T @ W for W in Ws) @ S  # [n, n] Gram of the whitened stack
    if P is not None:
        Q, _ = torch.linalg.qr(S.T @ P)  # [n, s] whitened span of the sparse rows
        D = torch.eye(M.shape[0], dtype=M.dtype, device=M.device) - Q @ Q.T
        M = D @ M @ D
    lam, V = top_eigen(M, K)  # σ² [K], [n, K]
    root = lam.sqrt().sqrt().clamp(min=1e-150)  # σ^½
    B = white.unwhiten(root[:, None] * V.T)  # [K, n]
    if not refit:
        A = [(W @ S @ V) / root for W in Ws]  # U_e·Σ^½ = W_e·S·V·Σ^-½, [m, K]
        if P is None:
            return SharedRight(B=B, A=A)
        eta = [least_squares_left(W - a @ B, P.T, G) for W, a, G in zip(Ws, A, grams)]  # [m, s]
        return SharedRight(B=B, A=A, eta=eta)
    full = B if P is None else torch.cat([B, P.T])  # [K (+ s), n]
    AE = [least_squares_left(W, full, G) for W, G in zip(Ws, grams)]  # [m, K (+ s)]
    return SharedRight(B=B, A=[x[:, :K] for x in AE], eta=None if P is None else [x[:, K:] for x in AE])


def shared_left_factor(Ws: list[torch.Tensor], grams: list[torch.Tensor], K: int) -> tuple[torch.Tensor,
                                                                                              list[torch.Tensor]]:
    """down: group-shared output basis U [n, K] and per-expert V_e = Uᵀ·W_e [K, m].

    min Σ_e ‖(W_e − U·V_e)·S_e‖² over orthonormal U and free V_e is solved by the top-K left singular vectors of
    the horizontal stack [W_e·S_e]_e, i.e. the eigenvectors of Σ_e W_e·G_e·W_eᵀ (the V_e·S_e are unconstrained),
    so per-expert whitening is exact here and needs no Cholesky factor.
    """
    U = top_eigen(sum(W @ G @ W.T for W, G in zip(Ws, grams)), K)[1]  # [n, K]
    return U, [U.T @ W for W in Ws]


def energy_buckets(residuals: list[tuple[torch.Tensor, torch.Tensor]], width: int, n: int) -> torch.Tensor:
    """[n] bucket ids: singleton buckets 0..s−2 for the input channels that explain the most residual output
    energy (greedy matching pursuit over the group's experts and gate/up: score_c = Σ ‖(R·G)[:, c]‖² / G_cc,
    then deflate by the fitted column), and bucket s−1 collecting every other channel.

    ``residuals``: (R [m, n], G [n, n]) per (expert, projection).
    """
    C = [R @ G for R, G in residuals]  # [m, n] each
    diag = [torch.diagonal(G).clamp(min=1e-300) for _, G in residuals]  # [n] each
    bucket = torch.full((n,), width - 1, dtype=torch.int32)
    free = torch.ones(n, dtype=torch.bool)
    for b in range(min(width - 1, n)):
        score = sum(c.square().sum(0) / d for c, d in zip(C, diag))  # [n]
        score[~free] = -1.0
        c = int(torch.argmax(score))
        bucket[c], free[c] = b, False
        for i, (_, G) in enumerate(residuals):
            C[i] = C[i] - torch.outer(C[i][:, c] / diag[i][c], G[c])  # [m, n]
    return bucket


def random_buckets(n: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """[n] balanced random bucket ids (|bucket| ∈ {⌊n/s⌋, ⌈n/s⌉})."""
    perm = torch.randperm(n, generator=gen)
    bucket = torch.empty(n, dtype=torch.int32)
    bucket[perm] = (torch.arange(n) % width).int()
    return bucket


# ----- budget -----------------------------------------------------------------------------------------------
@dataclass
class TypeCurve:
    """Relative whitened error of one projection type as a function of its budget, from the group spectra."""

    weight: list[float]  # importance C_g
    cost: list[int]  # floats per rank of each group
    cap: list[int]  # largest useful rank of each group
    fixed: int  # floats independent of the ranks (the residual's η)
    eig: list[torch.Tensor]  # per group: eigenvalues of the whitened stack's Gram, descending (σ²)

    def __post_init__(self):
        self.total = float(sum(float(e.sum()) for e in self.eig)) or 1.0
        self.tails = [torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0]).tolist() + [0.0] for e in self.eig]
        self.minimum = self.fixed + sum(self.cost)
        self.maximum = self.fixed + sum(c * k for c, k in zip(self.cost, self.cap))

    def ranks(self, budget: int) -> list[int]:
        return allocate_ranks(self.weight, self.cost, self.cap, budget - self.fixed)

    def error(self, budget: int) -> float:
        """Σ_g tail_g(K_g) / Σ_g ‖stack_g‖²: the share of whitened energy the ranks K_g(budget) leave out."""
        ks = self.ranks(budget)
        return sum(t[min(k, len(t) - 1)] for t, k in zip(self.tails, ks)) / self.total


def split_budget(total: int, curves: dict[str, TypeCurve], steps: int = 400) -> dict[str, int]:
    """Share ``total`` among projection types: start each at its minimum and hand out equal chunks, each to the
    type whose relative whitened error falls most (Σ_p error_p is minimised greedily; the curves are convex)."""
    budget = {p: c.minimum for p, c in curves.items()}
    left = total - sum(budget.values())
    assert left >= 0, (total, budget)
    # a chunk buys at least about one rank per group, so that every type's error can move
    chunk = max(1, left // steps, max(sum(c.cost) for c in curves.values()))
    err = {p: c.error(budget[p]) for p, c in curves.items()}
    while left > 0:
        step = min(chunk, left)
        best, gain, new = None, 0.0, 0.0
        for p, c in curves.items():
            if budget[p] >= c.maximum:
                continue
            e = c.error(min(budget[p] + step, c.maximum))
            if best is None or err[p] - e > gain:
                best, gain, new = p, err[p] - e, e
        if best is None:
            break
        budget[best] += step
        err[best] = new
        left -= step
    return budget


@dataclass
class LayerPlan:
    down_lowrank: bool
    width: int  # residual buckets s (0: no residual)
    budgets: dict[str, int]  # floats per type for its low-rank (+ residual) terms; a dense down is not listed
    ranks: dict[str, list[int]]  # per type, per group
    predicted: dict[str, float]  # relative whitened error the spectra predict for the low-rank part


@dataclass
class GroupStats:
    erank: dict[str, list[float]]  # per type, per group
    eig: dict[str, list[torch.Tensor]]  # per type, per group: whitened stack spectrum σ² (descending, CPU)


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
        return [calib.expert_gram_in(e, s.damp, s.shrink).to(dev) for e in members]

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
        s, a = self.settings, self.arch
        E = a.num_experts
        if calib is None:
            raise ConvertError("rfid-moe needs calibration data for its routing frequencies: pass --calib-data")
        freq = calib.frequency()  # [E]
        groups = frequency_groups(freq, s.group_size)
        group_of = [0] * E
        for g, members in enumerate(groups):
            for e in members:
                group_of[e] = g
        gfreq = [float(freq[mm].sum()) for mm in groups]
        mean = None  # calibration.expert_gram_in shrinks toward its own (cached) layer mean
        types = GU if self._modes() == [False] else PROJS
        stats = self._statistics(weights, calib, groups, mean, types)
        xis = XI_GRID if s.allocation == "fused" and s.xi_select == "calib" else (s.xi,)
        cands = []
        for xi in xis:  # calibration-predicted whitened error of each ξ's plan; the smallest wins (ties: lower ξ)
            imp = {p: importance(stats.erank[p], gfreq, s.allocation, xi, s.norm) for p in types}
            plan = self._plan(stats, imp)
            cands.append((sum(plan.predicted.values()), xi, imp, plan))
        _, xi, imp, plan = min(cands, key=lambda c: (c[0], c[1]))

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


def _accumulate(acc: list[float], W: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> None:
    """acc += [‖(W − Ŵ)·S‖², ‖W·S‖²] with S·Sᵀ = gram."""
    D = W - approx
    acc[0] += float(torch.einsum("ij,jk,ik->", D, gram, D))
    acc[1] += float(torch.einsum("ij,jk,ik->", W, gram, W))


METHOD = RFIDMoEMethod
