"""RS-MoE layer budgets: mutual information between adjacent layers (MINE) turned into save ratios by a QP.

RS-MoE §3.5 / App. A.3: pool each layer's output hidden states into features z^ℓ, estimate I(z^ℓ; z^{ℓ+1}) with
MINE (Belghazi et al. 2018) on the Donsker–Varadhan bound, score each layer's redundancy R_ℓ as the mean MI with its
neighbours, and solve  min_s Σ(s_ℓ − t_ℓ)² + λ_smooth Σ(s_{ℓ+1} − s_ℓ)² + λ_reg Σ(s_ℓ − s̄)²  subject to
mean(s) = s̄ and per-layer bounds, where a more redundant layer gets a smaller target t_ℓ (scipy SLSQP).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConvertError


def pool_windows(hidden: list[torch.Tensor], window: int) -> torch.Tensor:
    """[N, n] mean-pooled features: every sequence cut into windows of ``window`` tokens (0: the whole sequence,
    the paper's one feature per sample). Calibration windows carry no padding, so masked pooling is a plain mean."""
    out = []
    for h in hidden:  # [B, S, n]
        B, S, n = h.shape
        w = S if window <= 0 or window > S else window
        k = S // w
        out.append(h[:, :k * w].float().reshape(B, k, w, n).mean(2).reshape(B * k, n))
    return torch.cat(out)


def pca_features(z: torch.Tensor, dim: int) -> torch.Tensor:
    """[N, d] whitened principal components of pooled features [N, n] (d = min(dim, N − 1, n)).

    Standardising each component makes the critic's input scale the same in every layer, whatever the norm of
    the residual stream there."""
    z = z.double()
    z = z - z.mean(0)
    d = max(1, min(dim, z.shape[0] - 1, z.shape[1]))
    U, S, _ = torch.linalg.svd(z, full_matrices=False)  # U [N, r]
    return (U[:, :d] * math.sqrt(max(z.shape[0] - 1, 1))).float()  # unit variance per component


class _Critic:
    """T(a, b) = MLP([a; b]) with two ReLU hidden layers, initialised from an explicit generator (no global RNG)."""

    def __init__(self, d_in: int, hidden: int, gen: torch.Generator):
        def lin(i: int, o: int) -> list[torch.Tensor]:
            w = torch.randn(i, o, generator=gen) * math.sqrt(2.0 / i)  # [i, o] He init
            return [w.requires_grad_(), torch.zeros(o, requires_grad=True)]

        self.params = lin(d_in, hidden) + lin(hidden, hidden) + lin(hidden, 1)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2, w3, b3 = self.params
        h = torch.relu(torch.cat([a, b], 1) @ w1 + b1)  # [N, hidden]
        h = torch.relu(h @ w2 + b2)
        return (h @ w3 + b3).squeeze(1)  # [N]


def mine_mi(a: torch.Tensor, b: torch.Tensor, steps: int = 1000, lr: float = 1e-3, hidden: int = 128,
            seed: int = 0, tail: float = 0.2, batch: int = 512) -> float:
    """MINE estimate of I(a; b) in nats from paired samples a, b [N, d].

    Maximises the Donsker–Varadhan bound  E_P[T] − log E_{P⊗Q}[e^T]  (RS-MoE §3.5 loss L(θ)), marginal samples by
    a fresh shuffle of b each step, with MINE's moving-average correction of the biased log-term gradient
    (Belghazi et al. 2018, §3.2). Minibatches of ``batch`` pairs; returns the mean bound over the last ``tail`` of
    the steps. Runs single-threaded: the critic is tiny, and the estimate then does not depend on the machine's
    thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_mine(a, b, steps, lr, hidden, seed, tail, batch)
    finally:
        torch.set_num_threads(threads)


def _train_mine(a: torch.Tensor, b: torch.Tensor, steps: int, lr: float, hidden: int, seed: int, tail: float,
                batch: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    N = a.shape[0]
    nb = min(batch, N)
    critic = _Critic(a.shape[1] + b.shape[1], hidden, gen)
    opt = torch.optim.Adam(critic.params, lr=lr)
    log_n = math.log(nb)
    ema = None  # running log E[e^T] over the marginal
    history = []
    for _ in range(steps):
        idx = torch.randperm(N, generator=gen)[:nb]
        perm = idx[torch.randperm(nb, generator=gen)]
        t_joint = critic(a[idx], b[idx])  # [nb]
        t_marg = critic(a[idx], b[perm])  # [nb]
        log_mean_exp = torch.logsumexp(t_marg, 0) - log_n
        dv = t_joint.mean() - log_mean_exp
        cur = log_mean_exp.detach()
        ema = cur if ema is None else torch.logaddexp(ema + math.log(0.99), cur + math.log(0.01))
        # d/dθ of exp(lme − ema) = E[e^T ∇T] / ema: the bias-corrected gradient of the log term
        loss = -(t_joint.mean() - torch.exp(log_mean_exp - ema))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(dv.detach()))
    k = max(1, int(round(tail * steps)))
    return float(np.mean(history[-k:]))


def redundancy(mi_pairs: list[float], layers: list[int], num_layers: int) -> list[float]:
    """R_ℓ for each of ``layers``: the mean MI of layer ℓ with its available neighbours ℓ − 1 and ℓ + 1.

    ``mi_pairs[i]`` is I(z^i; z^{i+1}) for decoder layers i = 0..num_layers − 2."""
    out = []
    for l in layers:
        near = [mi_pairs[i] for i in (l - 1, l) if 0 <= i < num_layers - 1]
        out.append(float(np.mean(near)) if near else 0.0)
    return out


def qp_save_ratios(R: list[float], mean_keep: float, kappa: float = 0.2, smooth: float = 1.0, reg: float = 0.1,
                   bound: float = 0.3) -> list[float]:
    """Per-layer kept fractions s from redundancy scores R (RS-MoE §3.5, App. A.3), by scipy's SLSQP.

    Target t_ℓ = s̄·(1 − κ·(R_ℓ − mean R)/(max R − min R)): the profile scales with s̄, as the paper's Fig. 5 shows
    ("reduced proportionally"). Bounds s̄·(1 ± bound) ∩ [0, 1]; equality mean(s) = s̄ keeps the total budget.
    """
    from scipy.optimize import minimize

    R_ = np.asarray(R, dtype=np.float64)
    L = R_.size
    s_bar = float(mean_keep)
    spread = float(R_.max() - R_.min()) if L else 0.0
    if L <= 1 or spread <= 1e-12 or not np.isfinite(spread):
        return [s_bar] * L
    t = s_bar * (1.0 - kappa * (R_ - R_.mean()) / spread)  # [L]
    D = np.diff(np.eye(L), axis=0)  # [L-1, L] first differences
    Q = 2 * (np.eye(L) + smooth * D.T @ D + reg * np.eye(L))  # Hessian of the objective
    c = 2 * (t + reg * s_bar)  # objective = ½ sᵀQs − cᵀs + const

    lo, hi = max(0.0, s_bar * (1 - bound)), min(1.0, s_bar * (1 + bound))
    res = minimize(lambda s: 0.5 * s @ Q @ s - c @ s, np.full(L, s_bar), jac=lambda s: Q @ s - c,
                   method="SLSQP", bounds=[(lo, hi)] * L,
                   constraints=[{"type": "eq", "fun": lambda s: s.mean() - s_bar, "jac": lambda s: np.full(L, 1 / L)}],
                   options={"ftol": 1e-14, "maxiter": 1000})
    if not res.success:
        raise ConvertError(f"rs-moe: the layer-budget QP did not converge ({res.message}); use -o budget=uniform")
    s = np.clip(res.x, lo, hi)
    return [float(v) for v in s]
