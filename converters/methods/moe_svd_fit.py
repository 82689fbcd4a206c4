"""Fitting blocks of ``moe-svd`` (Li et al., ICML 2025; paper 003): rank allocation, the shared right factor of a
group (Eq. 2, 5-6, or our pooled basis), every member's quadratic error model and U-trimming (Eq. 7-8, App. Alg. 3).

Split from ``moe_svd.py`` (the method: settings, layer selection, layer assembly) to keep files small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_moe_lowrank.format import PROJS, LayerSpec, LowRankTerm, ProjSpec

from ..calibration import LayerCalibration
from ..errors import RatioError
from ..experts import ExpertWeights
from ..method import CompressedLayer
from ..whitening import Whitening, solve_spd, whitened_svd, whitening

@dataclass(frozen=True)
class Factorization:
    """One (projection, group) of a decomposed layer: parameters per unit of rank and the rank cap."""

    proj: str
    group: int
    cost: int  # params per rank: k·out + in (shared) or out + in (per expert)
    cap: int


def allocate_ranks(budget: int, facts: list[Factorization], gains: list[torch.Tensor] | None = None) -> list[int]:
    """Largest uniform rank r with Σ cost·min(r, cap) ≤ budget, then +1 ranks in order of gains[i][r] (σ² the
    next rank removes) while the leftover allows; returns one rank per factorization (0 if even r=1 is over)."""
    top = max(f.cap for f in facts)
    used = lambda r: sum(f.cost * min(r, f.cap) for f in facts)  # noqa: E731
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if used(mid) <= budget else (lo, mid - 1)
    ranks = [min(lo, f.cap) for f in facts]
    left = budget - used(lo)
    gain = [float(g[r]) if gains is not None and r < g.numel() else 0.0 for g, r in
            zip(gains or [torch.zeros(0)] * len(facts), ranks)]
    for i in sorted(range(len(facts)), key=lambda i: (-gain[i], i)):
        if ranks[i] < facts[i].cap and facts[i].cost <= left:
            ranks[i] += 1
            left -= facts[i].cost
    return ranks


# ----- per-group fitting ----------------------------------------------------------------------------------------
class _GramCache:
    """Regularized Grams (calibration.py's API: routing-weighted, shrunk) and whitening of each expert's gate/up
    input and down input, kept until the expert is dropped — or for the whole layer when all of them fit in
    ``keep_bytes`` (float64 Gram + Cholesky factor): then the passes of a layer and the fallback fit reuse them."""

    def __init__(self, weights: ExpertWeights, calib: LayerCalibration, damp: float, shrink: float,
                 device: torch.device, keep_bytes: int = 2**30):
        self.w, self.c, self.damp, self.shrink, self.dev = weights, calib, damp, shrink, device
        self.cache: dict[tuple[str, int], tuple[torch.Tensor, Whitening]] = {}
        E, m, n = weights.gate.shape  # [E, m, n]
        self.keep = 2 * 8 * E * (n * n + m * m) <= keep_bytes

    def gram(self, p: str, e: int) -> torch.Tensor:
        return self._get(p, e)[0]

    def white(self, p: str, e: int) -> Whitening:
        return self._get(p, e)[1]

    def _get(self, p: str, e: int) -> tuple[torch.Tensor, Whitening]:
        key = ("mid" if p == "down" else "in", e)
        if key not in self.cache:
            if key[0] == "in":
                G = self.c.expert_gram_in(e, self.damp, self.shrink).to(self.dev)
            else:
                G = self.c.expert_gram_mid(e, self.w, self.damp, self.shrink).to(self.dev)
            self.cache[key] = (G, whitening(G))
        return self.cache[key]

    def drop(self, e: int) -> None:
        if self.keep:
            return
        for kind in ("in", "mid"):
            self.cache.pop((kind, e), None)


def _pooled_basis(weights: ExpertWeights, grams: _GramCache, p: str, members: list[int],
                  freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Whitening]:
    """Eigen-decomposition of the group's frequency-weighted whitened stack [ours]: with S_g S_gᵀ = Σ_i G_i,
    M = S_gᵀ (Σ_i w_i W_iᵀ W_i) S_g, w_i = f_i / mean f (gate/up: W_i [out, in]). Returns (σ² descending, V [in, k],
    S_g's whitening): the shared right factor R₀ = V_rᵀ S_g⁻¹ serves every member instead of e*'s alone."""
    Gs = sum(grams.gram(p, e) for e in members)
    white = whitening(Gs)
    f = freq[members].double()
    w = f / f.mean().clamp(min=1e-30) if float(f.sum()) > 0 else torch.ones_like(f)
    acc = sum(float(wi) * (lambda W: W.T @ W)(weights.get(p, e, torch.float64).to(Gs.device))
              for wi, e in zip(w, members))
    M = white.S.T @ acc @ white.S
    evals, evecs = torch.linalg.eigh((M + M.T) / 2)
    return evals.flip(0).clamp(min=0), evecs.flip(1), white


def pooled_spectrum(weights: ExpertWeights, grams: _GramCache, p: str, members: list[int],
                    freq: torch.Tensor) -> torch.Tensor:
    return _pooled_basis(weights, grams, p, members, freq)[0]


@dataclass
class ProjFit:
    """One projection of one group against its shared right factor R₀ = V_rᵀ S_{e*}⁻¹ (Eq. 5-6).

    Rows of R₀ are orthonormal in e*'s whitened space. Every expert's whitened error is a quadratic in its left
    factor L: ‖(W_i − L R₀) S_i‖² = c_i − 2⟨L, A_i⟩ + ⟨L B_i, L⟩ with A_i = W_i G_i R₀ᵀ ``[out, r]``,
    B_i = R₀ G_i R₀ᵀ ``[r, r]``, c_i = ⟨W_i G_i, W_i⟩; its best own left factor is Ũ_i = A_i B_i⁻¹, which is
    U_{e*,r} Σ_{e*,r} for e* itself. Lists are in frequency order π.
    """

    R0: torch.Tensor  # [r, in]
    sigma: torch.Tensor  # [r] e*'s whitened singular values
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    c: list[float]
    own: list[tuple[torch.Tensor, torch.Tensor]]  # (U_j [out, r], Σ_j [r]) of the k most frequent (eq8, alg3)

    def error(self, i: int, L: torch.Tensor) -> float:
        return max(self.c[i] - 2 * float((L * self.A[i]).sum()) + float(((L @ self.B[i]) * L).sum()), 0.0)

    def refit(self, members: list[int]) -> torch.Tensor:
        """argmin_L Σ_{i∈members} ‖(W_i − L R₀) S_i‖² = (Σ A_i)(Σ B_i)⁻¹."""
        return solve_spd(sum(self.B[i] for i in members), sum(self.A[i] for i in members))

    def slot(self, c: int, members: list[int], combine: str) -> torch.Tensor:
        """Left matrix of combination c = {π ≤ c} (Eq. 7-8); ``members``: the experts that use it.

        refit  (Σ_{i∈members} A_i)(Σ B_i)⁻¹: the best single left factor for the experts using the slot  [ours]
        sum    Σ_{j≤c} Ũ_j      Eq. 8 with left factors fitted to the shared V
        mean   mean_{j≤c} Ũ_j                                                                            [ours]
        eq8    Σ_{j≤c} U_j Σ_j  Eq. 6 + 8 literally: each expert's own whitened SVD
        alg3   (Σ_{j≤c} U_j)(Σ_{j≤c} Σ_j)  App. Alg. 3 literally (without its per-expert S_i⁻¹)
        """
        if combine == "refit":
            return self.refit(members)
        if combine in ("sum", "mean"):
            L = sum(self.refit([j]) for j in range(c + 1))
            return L / (c + 1) if combine == "mean" else L
        if combine == "eq8":
            return sum(u * s for u, s in self.own[:c + 1])
        return sum(u for u, _ in self.own[:c + 1]) * sum(s for _, s in self.own[:c + 1])

    def balanced(self, slots: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(D R₀, [L D⁻¹]) with D = Σ_r^½ of e*: the same product, scales fit for bf16/fp16 storage."""
        d = self.sigma.clamp(min=float(self.sigma[0]) * 1e-8).sqrt()  # [r]
        return d[:, None] * self.R0, [L / d for L in slots]


def project_group(weights: ExpertWeights, grams: _GramCache, p: str, order: list[int], k: int, r: int,
                  combine: str, device: torch.device, freq: torch.Tensor | None = None) -> ProjFit:
    """Shared right factor: whitened SVD of the group's most frequent expert ``order[0]`` (Eq. 2, 5), or with
    ``freq`` the pooled frequency-weighted basis (``_pooled_basis``); and every member's error model."""
    src = order[0]
    svd = whitened_svd(weights.get(p, src, torch.float64).to(device), grams.white(p, src))
    if freq is None:
        R0 = grams.white(p, src).unwhiten(svd.Vh[:r])  # [r, in]
        fit = ProjFit(R0=R0, sigma=svd.sigma[:r], A=[], B=[], c=[], own=[])
    else:
        evals, V, white = _pooled_basis(weights, grams, p, order, freq)
        fit = ProjFit(R0=white.unwhiten(V[:, :r].T), sigma=evals[:r].sqrt(), A=[], B=[], c=[], own=[])
        R0 = fit.R0
    for pi, e in enumerate(order):
        W = weights.get(p, e, torch.float64).to(device)  # [out, in]
        G = grams.gram(p, e)  # [in, in]
        WG = W @ G  # [out, in]
        fit.A.append(WG @ R0.T)  # [out, r]
        fit.B.append(R0 @ G @ R0.T)  # [r, r]
        fit.c.append(float((WG * W).sum()))
        if combine in ("eq8", "alg3") and pi < k:
            s = svd if e == src else whitened_svd(W, grams.white(p, e))
            fit.own.append((s.U[:, :r], s.sigma[:r]))  # [out, r], [r]
    return fit


def trim(fits: dict[str, ProjFit], k: int, combine: str) -> tuple[list[int], dict[str, list[torch.Tensor]]]:
    """U-trimming of one group (Eq. 7 / App. Alg. 3): frequency position π uses combination min(π, k−1), so the
    group holds k slots {U_1}, {U_1+U_2}, ...; returns (slot of each position, k slot matrices per projection)."""
    size = len(next(iter(fits.values())).c)
    slot_of = [min(pi, k - 1) for pi in range(size)]
    members = [[i for i in range(size) if slot_of[i] == c] for c in range(k)]
    return slot_of, {p: [f.slot(c, members[c], combine) for c in range(k)] for p, f in fits.items()}


# ----- per-expert whitened SVD at a budget (the ``svd`` baseline's fit; moe-svd's and rfid-moe's fallback) ----
def per_expert_svd(name: str, layer: int, weights: ExpertWeights, calib: LayerCalibration, grams: _GramCache,
                   budget: int, damp: float, shrink: float, dtype: torch.dtype) -> CompressedLayer:
    """Every expert's gate/up/down by its own whitened SVD, ranks from ``allocate_ranks`` (uniform, leftover by σ²)
    within ``budget`` floats, down refitted on the compressed intermediates as in ``svd`` (calibration.md)."""
    E = weights.gate.shape[0]
    m, n = weights.gate.shape[1:]
    facts = [Factorization(p, e, m + n, min(m, n)) for p in PROJS for e in range(E)]
    svds = {}
    for e in range(E):
        for p in PROJS:
            svds[p, e] = whitened_svd(weights.get(p, e, torch.float64).to(grams.dev), grams.white(p, e))
        grams.drop(e)
    ranks = allocate_ranks(budget, facts, [svds[f.proj, f.group].sigma ** 2 for f in facts])
    if min(ranks) < 1:
        raise RatioError(f"layer {layer}: budget {budget} leaves a per-expert rank below 1")
    rank = {(f.proj, f.group): r for f, r in zip(facts, ranks)}
    tensors = {}
    for (p, e), svd in svds.items():
        L, R = svd.factors(rank[p, e])
        tensors[p, "lr_u", e], tensors[p, "lr_v", e] = L.cpu(), R.cpu()
    if calib.opts.down_fit == "compressed":
        for e in range(E):  # ĥ of the gate/up as written (cast to the output dtype first)
            gu = [(tensors[p, "lr_u", e] @ tensors[p, "lr_v", e]).to(dtype).double() for p in ("gate", "up")]
            W, G = calib.down_target(e, weights, *gu, damp, shrink)
            L, R = whitened_svd(W.to(grams.dev), whitening(G.to(grams.dev))).factors(rank["down", e])
            tensors["down", "lr_u", e], tensors["down", "lr_v", e] = L.cpu(), R.cpu()
    spec = LayerSpec(method=name, **{
        p: ProjSpec(lowrank=LowRankTerm(ranks=[rank[p, e] for e in range(E)])) for p in PROJS})
    return CompressedLayer(spec=spec, tensors=tensors, info={"share": False, "ranks": _rank_info(rank)})


def _rank_info(rank: dict[tuple[str, int], int]) -> dict[str, list[int]]:
    return {p: [r for (q, _), r in sorted(rank.items(), key=lambda kv: kv[0][1]) if q == p] for p in PROJS}
