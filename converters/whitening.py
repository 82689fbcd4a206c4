"""Activation whitening and truncation-aware SVD (SVD-LLM, Wang et al. 2024, §3.1 / Theorem 3.2).

With G = Σ_t x_t x_tᵀ = S Sᵀ (Cholesky), ‖(W − W')X‖_F = ‖(W − W')S‖_F, so truncating svd(W S) minimises the
output error and the loss of rank r is exactly Σ_{i>r} σ_i². Factors: L = U_r Σ_r^½, R = Σ_r^½ V_rᵀ S⁻¹.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Whitening:
    S: torch.Tensor  # [d, d] lower-triangular float64, G ≈ S Sᵀ

    def unwhiten(self, R: torch.Tensor) -> torch.Tensor:
        """R S⁻¹ for R [r, d], by a triangular solve (no explicit inverse)."""
        return torch.linalg.solve_triangular(self.S.T, R.T, upper=True).T


def regularize_gram(gram: torch.Tensor, n_tokens: int, mean_gram: torch.Tensor | None = None,
                    damp: float = 1e-4, shrink: float = 0.1, smooth: bool = False, unit: float = 1.0) -> torch.Tensor:
    """Make a Gram positive definite: shrink it toward the layer mean, then damp relatively.

    smooth: add κ = shrink·d pseudo-tokens of the layer's per-token mean Gram Ḡ to every expert, G + κ·u·Ḡ (u the
    Gram weight of one token, mean g² for routing-weighted Grams), so the mean's share κ/(N_e + κ) falls smoothly
    with the token count N_e (James–Stein style; no cliff at N_e = d). cliff (``smooth=False``, the old rule): only
    experts with fewer tokens than dimensions get shrink·max(N_e, 1)·u·Ḡ. The damping δ·tr(G)/d·I is relative, so it
    means the same for 10 or 10⁵ tokens.
    """
    g = gram.double()
    g = (g + g.T) / 2
    d = g.shape[0]
    if mean_gram is not None:
        if smooth:
            g = g + (shrink * d * unit) * mean_gram.to(g.device, torch.float64)
        elif n_tokens < d:
            g = g + (shrink * max(int(n_tokens), 1) * unit) * mean_gram.to(g.device, torch.float64)
    scale = torch.trace(g) / d
    if scale <= 0:
        scale = torch.tensor(1.0, dtype=torch.float64)
    return g + damp * scale * torch.eye(d, dtype=torch.float64, device=g.device)


def whitening(gram: torch.Tensor) -> Whitening:
    """Cholesky factor of a regularized Gram; clamps eigenvalues if round-off still leaves it indefinite."""
    L, info = torch.linalg.cholesky_ex(gram)
    if info.item() != 0:
        evals, evecs = torch.linalg.eigh(gram)
        floor = evals.abs().max() * 1e-10
        L = torch.linalg.cholesky((evecs * evals.clamp(min=floor)) @ evecs.T)
    return Whitening(S=L)


@dataclass
class WhitenedSVD:
    """svd(W S) of one weight: W ≈ L R at any rank r ≤ len(sigma)."""

    U: torch.Tensor  # [out, k]
    sigma: torch.Tensor  # [k] descending
    Vh: torch.Tensor  # [k, in]
    white: Whitening | None

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L [out, r], R [r, in]) in float64 with the singular values split evenly."""
        root = self.sigma[:r].sqrt()
        L = self.U[:, :r] * root  # [out, r]
        R = root[:, None] * self.Vh[:r]  # [r, in]
        return L, (self.white.unwhiten(R) if self.white is not None else R)

    def tail_energy(self, r: int) -> float:
        """Σ_{i>r} σ_i²: the (whitened) squared output error left at rank r."""
        return float((self.sigma[r:] ** 2).sum())


def whitened_svd(W: torch.Tensor, white: Whitening | None) -> WhitenedSVD:
    """SVD of W S (or of W itself without whitening), float64."""
    A = W.double() @ white.S if white is not None else W.double()
    U, sigma, Vh = torch.linalg.svd(A, full_matrices=False)
    return WhitenedSVD(U=U, sigma=sigma, Vh=Vh, white=white)


def solve_spd(M: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X [r, k] with X·M = B for a symmetric positive definite M [k, k] (Cholesky; least squares if it is not)."""
    L, info = torch.linalg.cholesky_ex(M)
    if info.item() != 0:
        return torch.linalg.lstsq(M, B.T).solution.T
    return torch.cholesky_solve(B.T, L).T
