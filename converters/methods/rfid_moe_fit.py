"""Fitting blocks of ``rfid-moe`` (arXiv 2602.09316; methods.md §5): frequency groups (§3.1), effective rank
(§3.2), fused importance and rank allocation (§3.3, Eq. 13), the group-shared factors, the sparse residual's buckets
(§3.4) and the per-type budget split [ours].

Split from ``rfid_moe.py`` (the method: settings, feasibility, layer assembly, held-out choice) to keep files small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..whitening import solve_spd, whitening

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
class Candidate:
    """One layer's plan for one ξ: groups, group frequencies, statistics, importance and ranks."""

    xi: float
    groups: list[list[int]]
    gfreq: list[float]
    stats: GroupStats
    imp: dict[str, list[float]]
    plan: LayerPlan


@dataclass
class GroupStats:
    erank: dict[str, list[float]]  # per type, per group
    eig: dict[str, list[torch.Tensor]]  # per type, per group: whitened stack spectrum σ² (descending, CPU)


def _accumulate(acc: list[float], W: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> None:
    """acc += [‖(W − Ŵ)·S‖², ‖W·S‖²] with S·Sᵀ = gram."""
    D = W - approx
    acc[0] += float(torch.einsum("ij,jk,ik->", D, gram, D))
    acc[1] += float(torch.einsum("ij,jk,ik->", W, gram, W))
