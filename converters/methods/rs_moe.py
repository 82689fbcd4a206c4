"""RS-MoE: collaborative units kept exactly, approximated at low rank, or pruned (shared/papers/001, §3.2–3.5).

Unit j of expert e is row j of gate and up and column j of down (§3.2, Y = g Σ_j h_j W_down[:, j]). Per MoE layer:

1. ACI score per unit (Alg. 1): routing-weighted activation mean / variance / peak times ‖W_down[:, j]‖², plus γ
   times the downstream alignment with the next layer's experts. Ranked globally over the layer's E·m units.
2. Partition against the layer budget: the top units are kept exactly (``high_frac`` of the budget, the paper's
   "80%high"), the bottom ``low_frac`` of all units are pruned, the rest are low-rank (§3.4).
3. Low-rank gate/up rows: activation-aware (whitened) SVD per expert (§3.4, Wang et al. 2025b).
4. Down: a ridge-regression base B [n, m] shared by the layer (J(B) = ‖Y − H_c Bᵀ‖ + λ‖B‖, λ = 1e-3) plus a
   per-expert low-rank delta on the low-rank units' columns (docs/methods/rs-moe.md gives the interpretation).
5. Layer budgets from the MI between adjacent layers' hidden states (MINE + QP, §3.5; ``rs_moe_mi.py``).
6. [ours] Per layer, the split of step 2 — or plain per-expert whitened SVD — with the lowest MoE-output error on
   held-out calibration tokens (``select=heldout``; ``rs_moe_select.py``).

Checkpoint mapping (vllm_moe_lowrank.format): ``units`` split; gate/up = dense(exact) + lowrank(lowrank);
down = dense(exact) + lowrank(lowrank, the delta) + base(B over original units, ``base_idx`` per expert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from vllm_moe_lowrank.format import (PROJS, BaseTerm, DenseTerm, LayerSpec, LowRankTerm, ProjSpec,
                                     UnitSplit)

from ..budget import layer_budget
from ..calibration import LayerCalibration
from ..errors import RatioError
from ..experts import ExpertWeights
from ..method import CompressedLayer, Damp, Method, MethodSettings, Shrink
from .moe_svd_fit import _GramCache, per_expert_svd
from .rs_moe_mi import mine_mi, pca_features, pool_windows, qp_save_ratios, redundancy
from .rs_moe_select import Split, choose_split
from ..whitening import regularize_gram, whitened_svd, whitening

_BLOCK = 1 << 24  # floats in one chunk of the downstream-alignment product


class RSMoESettings(MethodSettings):
    # ACI (Alg. 1, App. A.2) and the ablation scores of Fig. 3
    score: Literal["aci", "magnitude", "activation", "peak"] = "aci"
    w_mean: float = Field(0.4, ge=0.0)
    w_var: float = Field(0.05, ge=0.0)
    w_peak: float = Field(0.8, ge=0.0)
    gamma: float = Field(0.05, ge=0.0)
    aci_norm: Literal["max", "mean"] = "mean"  # "normalised" statistics: divide by the layer mean (or max)
    # partition (§3.4, Table 5); heldout: per layer, the split (these three, a grid with fewer exact units, or
    # per-expert whitened SVD) with the lowest MoE-output error on held-out calibration tokens (rs_moe_select.py)
    select: Literal["heldout", "fixed"] = "heldout"
    high_frac: float = Field(0.8, ge=0.0, le=1.0)  # share of the layer budget spent on exact units
    low_frac: float = Field(0.1, ge=0.0, lt=1.0)  # share of all units pruned (lowest scores)
    # down projection
    base: Literal["ridge", "freq", "none"] = "ridge"  # ridge regression (ours: paper), frequency merge, no base
    down_fit: Literal["refit", "delta"] = "refit"
    ridge: float = Field(1e-3, gt=0.0)  # λ of the ridge base, relative to the mean Gram eigenvalue
    prior: float = Field(1e-2, gt=0.0)  # pull of the refit down delta toward W_down − B, relative
    # whitening (SVD-LLM, as the svd baseline)
    damp: Damp = 1e-4
    shrink: Shrink = 0.1
    # layer budgets (§3.5, App. A.3)
    budget: Literal["mi", "uniform"] = "mi"
    mine_window: int = Field(32, ge=0)  # tokens per pooled feature; 0 = one per sequence (the paper)
    mine_pca: int = Field(32, gt=0)
    mine_hidden: int = Field(64, gt=0)
    mine_steps: int = Field(500, gt=0)
    mine_lr: float = Field(1e-3, gt=0.0)
    mine_seed: int = 42
    kappa: float = Field(0.2, ge=0.0)
    smooth: float = Field(1.0, ge=0.0)
    reg: float = Field(0.1, ge=0.0)
    bound: float = Field(0.3, ge=0.0, lt=1.0)


# ----- partition and ranks ------------------------------------------------------------------------------------
@dataclass
class UnitPlan:
    """Per expert: exact and low-rank unit ids (original order), ranks per projection, and whether B is stored."""

    exact: list[torch.Tensor]  # E × [|S_e|] int64, sorted
    lowrank: list[torch.Tensor]  # E × [|L_e|] int64, sorted
    ranks: dict[str, list[int]]
    base: bool
    n: int
    m: int
    info: dict[str, Any] = field(default_factory=dict)

    def cost(self) -> int:
        """Stored floats: 3n per exact unit, k(|L_e| + n) per low-rank factorization, n·m for the base."""
        c = sum(3 * self.n * len(s) for s in self.exact) + (self.n * self.m if self.base else 0)
        for p in PROJS:
            c += sum(k * (len(l) + self.n) for k, l in zip(self.ranks[p], self.lowrank))
        return c


def _rank_cap(L: int, n: int) -> int:
    """Largest rank at which a |L|×n factorization is still smaller than the |L|×n block itself."""
    return max(0, min(L, n, math.ceil(L * n / (L + n)) - 1)) if L > 0 else 0


def allocate_ranks(L: list[int], budget: int, n: int) -> dict[str, list[int]]:
    """Ranks for the gate, up and down factorizations of every expert within ``budget`` floats (methods.md §4.6).

    Expert e gets the share budget·|L_e|/Σ|L| and one rank k_e = ⌊share / 3(|L_e| + n)⌋ for all three
    projections, capped where low rank stops being cheaper; the leftover goes one rank at a time to the experts
    with the most low-rank units (the projection with the lowest rank first), so at most one rank's cost is left.
    """
    E = len(L)
    total = sum(L)
    cap = [_rank_cap(l, n) for l in L]
    ranks = {p: [0] * E for p in PROJS}
    if total == 0 or budget <= 0:
        return ranks
    for e in range(E):
        k = min(cap[e], int(budget * L[e] / total) // (3 * (L[e] + n))) if L[e] else 0
        for p in PROJS:
            ranks[p][e] = k
    left = budget - sum(ranks[p][e] * (L[e] + n) for p in PROJS for e in range(E))
    order = sorted(range(E), key=lambda e: (-L[e], e))
    progress = True
    while progress:
        progress = False
        for e in order:
            c = L[e] + n
            if L[e] == 0 or c > left:
                continue
            p = min(PROJS, key=lambda q: ranks[q][e])
            if ranks[p][e] < cap[e]:
                ranks[p][e] += 1
                left -= c
                progress = True
    return ranks


def partition(scores: torch.Tensor, budget: int, n: int, high_frac: float, low_frac: float,
              base: bool) -> UnitPlan:
    """Split the layer's units by global score rank into exact / low-rank / pruned within ``budget`` floats.

    The top ⌊high_frac·budget / 3n⌋ units are exact and the bottom ``low_frac`` of all units pruned (§3.4, App. A.2).
    Then, until nothing changes: experts whose gate or up rank (or down rank without a base) is 0 lose their
    low-rank units to pruning (their h is 0), the base is dropped if it does not fit, and budget the ranks cannot
    absorb (capped factorizations) promotes the best remaining units to exact. Cost ends within one rank or one
    unit of ``budget``.
    """
    E, m = scores.shape
    order = torch.argsort(scores.reshape(-1).double(), descending=True, stable=True)  # [E·m]
    status = torch.zeros(E * m, dtype=torch.int8)  # 0 pruned, 1 low-rank, 2 exact
    n_exact = min(int(high_frac * budget) // (3 * n), E * m)
    n_pruned = min(int(round(low_frac * E * m)), E * m - n_exact)
    status[order[:n_exact]] = 2
    status[order[n_exact:E * m - n_pruned]] = 1
    use_base = base
    while True:
        st = status.view(E, m)
        L = (st == 1).sum(1).tolist()
        n_ex = int((st == 2).sum())
        base_cost = n * m if use_base and sum(L) else 0
        lr_budget = budget - 3 * n * n_ex - base_cost
        if lr_budget < 0 and base_cost:
            use_base = False
            continue
        ranks = allocate_ranks(L, lr_budget, n)
        dead = [e for e in range(E) if L[e] and (ranks["gate"][e] == 0 or ranks["up"][e] == 0
                                                  or (ranks["down"][e] == 0 and not base_cost))]
        if dead:
            for e in dead:
                st[e][st[e] == 1] = 0
            continue
        spent = 3 * n * n_ex + base_cost + sum(ranks[p][e] * (L[e] + n) for p in PROJS for e in range(E))
        promote = (budget - spent) // (3 * n)
        candidates = order[status[order] != 2][:promote]
        if promote > 0 and candidates.numel():
            status[candidates] = 2
            continue
        break
    st = status.view(E, m)
    plan = UnitPlan(exact=[(st[e] == 2).nonzero().flatten() for e in range(E)],
                    lowrank=[(st[e] == 1).nonzero().flatten() for e in range(E)],
                    ranks=ranks, base=bool(base_cost), n=n, m=m)
    plan.info = {"budget": budget, "cost": plan.cost(), "exact_units": n_ex, "lowrank_units": sum(L),
                 "pruned_units": E * m - n_ex - sum(L), "base": plan.base,
                 "mean_rank": {p: round(sum(ranks[p]) / max(1, sum(1 for l in L if l)), 2) for p in PROJS}}
    return plan


# ----- ACI ----------------------------------------------------------------------------------------------------
def activation_stats(h: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alg. 1 lines 3–4 for one expert: W_act = H·r, then mean(W_act²), var(W_act²), max|W_act| per unit [m].

    h [N_e, m] intermediate activations, r [N_e] routing weights."""
    if h.shape[0] == 0:
        z = torch.zeros(h.shape[1], dtype=torch.float64)
        return z, z.clone(), z.clone()
    a = h.double() * r.double()[:, None]  # [N_e, m]
    sq = a.square()
    return sq.mean(0), sq.var(0, unbiased=False), a.abs().amax(0)


def downstream_alignment(down: torch.Tensor, next_gate: torch.Tensor, next_up: torch.Tensor,
                         device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Alg. 1 lines 7–9: I_down[e, j] = Σ_q |W_down^e[:, j] · V_in[q]| · ‖V_in[q]‖ for every unit [E, m].

    V_in stacks (W_gate + W_up)/2 of all experts of the next layer [E'·m', n]; computed in chunks of next-layer
    experts (the absolute value prevents factoring the product)."""
    E, n, m = down.shape
    E2, m2, _ = next_gate.shape
    out = torch.zeros(E, m, dtype=torch.float64, device=device)
    chunk = max(1, _BLOCK // (m * m2))
    for c0 in range(0, E2, chunk):
        v_in = ((next_gate[c0:c0 + chunk].to(device, torch.float32) + next_up[c0:c0 + chunk].to(
            device, torch.float32)) / 2).reshape(-1, n)  # [c·m', n]
        q = v_in.norm(dim=1)  # [c·m']
        for e in range(E):
            v_out = down[e].to(device, torch.float32).T  # [m, n]
            out[e] += ((v_out @ v_in.T).abs() @ q).double()  # [m]
    return out.cpu()


def _normalize(x: torch.Tensor, how: str) -> torch.Tensor:
    ref = x.max() if how == "max" else x.mean()
    return x / ref if ref > 0 else x


# ----- the method ---------------------------------------------------------------------------------------------
class RSMoEMethod(Method):
    name = "rs-moe"
    Settings = RSMoESettings
    needs_calibration = True

    def __init__(self, ctx, settings: RSMoESettings):
        super().__init__(ctx, settings)
        self.needs_plan_pass = settings.budget == "mi"
        self._features: dict[int, torch.Tensor] = {}
        self._save: dict[int, float] = {}
        self._redundancy: dict[int, float] = {}
        self._align: dict[int, torch.Tensor] = {}  # downstream ACI term per layer (weights only: computed once)

    # --- budgets --------------------------------------------------------------------------------------------
    def _max_ratio(self) -> float:
        low = 1.0 - self.settings.bound if self.settings.budget == "mi" else 1.0
        return 1.0 - 1.0 / (self.arch.intermediate_size * low)

    def check_feasible(self) -> None:
        limit = self._max_ratio()
        if self.ctx.ratio > limit:
            raise RatioError(f"--ratio {self.ctx.ratio}: infeasible for rs-moe on this model (a layer could not keep "
                             f"one intermediate unit per expert); the largest feasible ratio is {limit:.4f}")

    def save_ratio(self, layer: int) -> float:
        """s_ℓ: the kept fraction of layer ℓ (MI plan, or uniform 1 − ratio)."""
        return self._save.get(layer, 1.0 - self.ctx.ratio)

    def layer_params(self, layer: int) -> int:
        a = self.arch
        full = 3 * a.num_experts * a.hidden_size * a.intermediate_size
        if self.settings.budget == "uniform" or layer not in self._save:
            return layer_budget(self.ctx.ratio, a.num_experts, a.hidden_size, a.intermediate_size)
        return min(full, math.floor(self.save_ratio(layer) * full))

    def dry_run(self) -> list[dict[str, Any]]:
        a, s = self.arch, self.settings
        out = []
        for l in a.moe_layers:
            P = self.layer_params(l)
            out.append({"layer": l, "budget": "uniform" if s.budget == "uniform" else "mi (after the plan pass)",
                        "params": P, "exact_units": min(int(s.high_frac * P) // (3 * a.hidden_size),
                                                        a.num_experts * a.intermediate_size)})
        return out

    # --- plan pass: MINE + QP -------------------------------------------------------------------------------
    def observe_hidden(self, layer: int, hidden: list[torch.Tensor]) -> None:
        s = self.settings
        self._features[layer] = pca_features(pool_windows(hidden, s.mine_window), s.mine_pca)

    def make_plan(self) -> dict[str, Any]:
        s, a = self.settings, self.arch
        feats = [self._features.get(l) for l in range(a.num_layers)]
        if any(f is None for f in feats):
            return {}
        mi = [mine_mi(feats[i], feats[i + 1], s.mine_steps, s.mine_lr, s.mine_hidden, s.mine_seed + i)
              for i in range(a.num_layers - 1)]
        layers = list(a.moe_layers)
        R = redundancy(mi, layers, a.num_layers)
        save = qp_save_ratios(R, 1.0 - self.ctx.ratio, s.kappa, s.smooth, s.reg, s.bound)
        self._features.clear()
        return {"mi": [round(v, 6) for v in mi], "redundancy": {str(l): round(r, 6) for l, r in zip(layers, R)},
                "save_ratio": {str(l): v for l, v in zip(layers, save)}}

    def load_plan(self, plan: dict[str, Any]) -> None:
        self._save = {int(k): float(v) for k, v in plan.get("save_ratio", {}).items()}
        self._redundancy = {int(k): float(v) for k, v in plan.get("redundancy", {}).items()}

    # --- scores ---------------------------------------------------------------------------------------------
    def unit_scores(self, layer: int, weights: ExpertWeights, calib: LayerCalibration) -> torch.Tensor:
        """[E, m] importance of every unit: ACI (Alg. 1) or an ablation score (Fig. 3)."""
        s, E = self.settings, self.arch.num_experts
        e_proj = weights.down.double().square().sum(1)  # [E, m] ‖W_down[:, j]‖²
        if s.score == "magnitude":  # ‖unit‖_F over its 3n weights
            return (weights.gate.double().square().sum(2) + weights.up.double().square().sum(2) + e_proj).sqrt()
        stats = [activation_stats(calib.intermediate(e, weights), calib.route_weight(e)) for e in range(E)]
        mean_sq, var_sq, peak = (torch.stack([st[i] for st in stats]) for i in range(3))  # [E, m] each
        if s.score == "peak":
            return peak
        if s.score == "activation":  # Wanda: ‖h̃_j‖₂ · ‖W_down[:, j]‖
            return (mean_sq * e_proj).sqrt()
        nz = lambda x: _normalize(x, s.aci_norm)  # noqa: E731
        hyb = s.w_mean * nz(mean_sq) + s.w_var * nz(var_sq) + s.w_peak * nz(peak)  # S_hyb
        score = nz(hyb * e_proj)  # I_inner
        if s.gamma and layer + 1 in self.arch.moe_layers:
            if layer not in self._align:  # the layer's held-out candidates and refit share it
                nxt = self.ctx.load_experts(layer + 1)
                self._align = {layer: downstream_alignment(weights.down, nxt.gate, nxt.up, self.ctx.device)}
            score = score + s.gamma * nz(self._align[layer])
        return score

    # --- the work -------------------------------------------------------------------------------------------
    def compress_layer(self, layer: int, weights: ExpertWeights,
                       calib: LayerCalibration | None) -> CompressedLayer | None:
        a, s = self.arch, self.settings
        E, n, m = a.num_experts, a.hidden_size, a.intermediate_size
        budget = self.layer_params(layer)
        if budget >= 3 * E * n * m:
            return None
        if s.select == "heldout":
            return choose_split(self, layer, weights, calib, budget)
        return self.fit_split(layer, weights, calib, budget, Split(s.high_frac, s.low_frac, s.base))

    def fit_split(self, layer: int, weights: ExpertWeights, calib: LayerCalibration, budget: int, split: Split,
                  cache: dict | None = None) -> CompressedLayer:
        """The layer at ``budget`` floats with one split; ``cache`` keeps unit scores and gate/up whitening of
        ``calib`` between the candidates of ``choose_split``."""
        s, E, n = self.settings, self.arch.num_experts, self.arch.hidden_size
        cache = {} if cache is None else cache
        if split.svd:  # the degenerate split: every unit low-rank, per-expert ranks, no base (the svd baseline)
            comp = per_expert_svd(self.name, layer, weights, calib, _GramCache(
                weights, calib, s.damp, s.shrink, self.ctx.device), budget, s.damp, s.shrink, self.ctx.dtype)
            comp.info.update(budget=budget, save_ratio=round(self.save_ratio(layer), 6), split="svd")
            return comp
        if "scores" not in cache:
            cache["scores"] = self.unit_scores(layer, weights, calib)
        plan = partition(cache["scores"], budget, n, split.high_frac, split.low_frac, split.base != "none")
        has_lr = any(l.numel() for l in plan.lowrank)
        tensors: dict = {}
        for e in range(E):
            S = plan.exact[e]
            tensors["gate", "weight", e] = weights.gate[e][S]  # [|S_e|, n]
            tensors["up", "weight", e] = weights.up[e][S]  # [|S_e|, n]
            tensors["down", "weight", e] = weights.down[e][:, S]  # [n, |S_e|]
        if has_lr:
            gate_up = self._gate_up(weights, calib, plan, cache)
            for e, fac in enumerate(gate_up):
                for p in ("gate", "up"):
                    tensors[p, "lr_u", e], tensors[p, "lr_v", e] = fac[p]
            stats, G, C = self._down_stats(weights, calib, plan, gate_up, split.base if plan.base else "none")
            B = self._base(weights, calib, G, C, split.base) if plan.base else None
            for e, (Ld, Rd) in enumerate(self._down(weights, plan, stats, B)):
                tensors["down", "lr_u", e], tensors["down", "lr_v", e] = Ld, Rd
                if plan.base:
                    tensors["down", "base_idx", e] = plan.lowrank[e].to(torch.int32)  # [|L_e|]
            if plan.base:
                tensors["down", "base", None] = B  # [n, m]
        spec = self._spec(plan, has_lr)
        info = {**plan.info, "save_ratio": round(self.save_ratio(layer), 6), "score": s.score,
                "split": {"high_frac": split.high_frac, "low_frac": split.low_frac, "base": split.base}}
        if layer in self._redundancy:
            info["mi_redundancy"] = self._redundancy[layer]
        return CompressedLayer(spec=spec, tensors={k: v.cpu() for k, v in tensors.items()}, info=info)

    def _spec(self, plan: UnitPlan, has_lr: bool) -> LayerSpec:
        units = UnitSplit(exact=[len(x) for x in plan.exact], lowrank=[len(x) for x in plan.lowrank])
        projs = {}
        for p in PROJS:
            lr = LowRankTerm(units="lowrank", ranks=plan.ranks[p]) if has_lr else None
            base = BaseTerm(units="lowrank") if p == "down" and plan.base else None
            projs[p] = ProjSpec(dense=DenseTerm(units="exact"), lowrank=lr, base=base)
        return LayerSpec(method=self.name, units=units, **projs)

    # --- low-rank gate/up -----------------------------------------------------------------------------------
    def _gate_up(self, weights: ExpertWeights, calib: LayerCalibration, plan: UnitPlan,
                 cache: dict | None = None) -> list[dict]:
        """Whitened SVD of the low-rank rows of gate and up, per expert (§3.4: SVD(W_lr V E^½), W_com, W_rec)."""
        s, dev = self.settings, self.ctx.device
        cache = {} if cache is None else cache
        out = []
        for e, idx in enumerate(plan.lowrank):
            fac = {}
            white = None
            if idx.numel():  # calibration.py's Gram API: routing-weighted and shrunk as the calibration switches say
                if ("white", e) not in cache:
                    cache["white", e] = whitening(calib.expert_gram_in(e, s.damp, s.shrink).to(dev))
                white = cache["white", e]
            for p in ("gate", "up"):
                W = weights.get(p, e, torch.float64)[idx].to(dev)  # [|L_e|, n]
                if idx.numel():
                    fac[p] = whitened_svd(W, white).factors(plan.ranks[p][e])  # [|L_e|, k], [k, n]
                else:
                    fac[p] = (W.new_zeros(0, 0), W.new_zeros(0, W.shape[1]))
            out.append(fac)
        return out

    def _expert_acts(self, weights: ExpertWeights, calib: LayerCalibration, e: int,
                     fac: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(h [N_e, m] original, ĥ_L [N_e, |L_e|] through the low-rank gate/up) of expert e, float32."""
        dev = self.ctx.device
        x = calib.inputs(e).to(dev)  # [N_e, n]
        h = torch.nn.functional.silu(x @ weights.get("gate", e).to(dev).T) * (
            x @ weights.get("up", e).to(dev).T)  # [N_e, m]
        (Lg, Rg), (Lu, Ru) = ((L.float(), R.float()) for L, R in (fac["gate"], fac["up"]))
        h_lr = torch.nn.functional.silu((x @ Rg.T) @ Lg.T) * ((x @ Ru.T) @ Lu.T)  # [N_e, |L_e|]
        return h, h_lr

    # --- down: statistics, base and delta -------------------------------------------------------------------
    def _down_stats(self, weights: ExpertWeights, calib: LayerCalibration, plan: UnitPlan, gate_up: list[dict],
                    base: str | None = None):
        """One pass over the experts: per expert G_L = ĥ_LᵀĥL [|L|, |L|] and X_L = T_eᵀĥ_L [n, |L|] (float64),
        where T_e = W_down[:, ¬S] h_¬S is what the exact units leave to produce, and the ridge system
        (G [m, m], C [m, n]) of the shared base (see ``_base``)."""
        s, dev = self.settings, self.ctx.device
        n, m = plan.n, plan.m
        G = torch.zeros(m, m, dtype=torch.float64, device=dev)
        C = torch.zeros(m, n, dtype=torch.float64, device=dev)
        stats = []
        for e, idx in enumerate(plan.lowrank):
            S, L = plan.exact[e].to(dev), idx.to(dev)
            if L.numel() == 0:
                stats.append(None)
                continue
            h, h_lr = self._expert_acts(weights, calib, e, gate_up[e])
            if calib.opts.weighted:  # rows times g: the fits weigh each token by g², as its MoE-output error does
                r = calib.route_weight(e).to(dev, torch.float32)[:, None]  # [N_e, 1]
                h, h_lr = h * r, h_lr * r
            Wd = weights.get("down", e).to(dev)  # [n, m]
            rest = torch.ones(m, dtype=torch.bool, device=dev)
            rest[S] = False
            T = h[:, rest] @ Wd[:, rest].T  # [N_e, n]
            G_L = (h_lr.T @ h_lr).double()  # [|L|, |L|]
            X_L = (T.T @ h_lr).double()  # [n, |L|]
            stats.append((G_L, X_L))
            if (base or s.base) != "ridge":
                continue
            if s.down_fit == "refit":  # Z_e = ĥ_L scattered to the units L, target T_e
                G[L[:, None], L[None, :]] += G_L
                C[L] += X_L.T
            else:  # Z_e = [h_S | ĥ_L] at their units, target the expert output (methods.md I-A)
                Z = torch.zeros_like(h)  # [N_e, m]
                Z[:, S] = h[:, S]
                Z[:, L] = h_lr
                G += (Z.T @ Z).double()
                C += (Z.T @ (h @ Wd.T)).double()
        return stats, G, C

    def _base(self, weights: ExpertWeights, calib: LayerCalibration, G: torch.Tensor, C: torch.Tensor,
              base: str | None = None) -> torch.Tensor:
        """Shared down base B [n, m] over the original units.

        ridge: Bᵀ = (Σ_e Z_eᵀZ_e + λ'I)⁻¹ Σ_e Z_eᵀT_e, the minimiser of §3.4's J(B) = ‖Y − H_c Bᵀ‖² + λ‖B‖² with
        λ' = λ·tr(G)/m. ``refit``: Z_e scatters the compressed low-rank activations ĥ_L to their units and T_e is
        what the exact units do not produce; ``delta``: Z_e is the whole compressed h (exact, low-rank, 0 when
        pruned) and T_e the expert's output (methods.md I-A). freq: Σ_e f_e W_down^e / Σ_e f_e (Table 4).
        """
        s, m = self.settings, G.shape[0]
        if (base or s.base) == "freq":
            f = calib.frequency().double()
            f = f if float(f.sum()) > 0 else torch.ones_like(f)
            return torch.einsum("e,enm->nm", f / f.sum(), weights.down.double()).to(G.device)
        lam = s.ridge * (float(torch.trace(G)) / m or 1.0)
        Bt = torch.linalg.solve(G + lam * torch.eye(m, dtype=torch.float64, device=G.device), C)  # [m, n]
        return Bt.T.contiguous()  # [n, m]

    def _down(self, weights: ExpertWeights, plan: UnitPlan, stats: list, B: torch.Tensor | None
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-expert low-rank down term on the low-rank units' columns (L_d [n, k], R_d [k, |L_e|]).

        delta: whitened SVD of Δ_e = W_down[:, L] − B[:, L] under the Gram of ĥ_L (D²-MoE style).
        refit: the ridge-to-prior least squares fit of what the base leaves, min_Δ ‖T_e − ĥ_L(B[:, L] + Δ)ᵀ‖² +
        μ‖Δ − Δ_e‖², truncated in the whitened space of ĥ_LᵀĥL + μI, where the truncation error is exact
        (reduced-rank regression; SVD-LLM Theorem 3.2): it compensates pruned units and gate/up truncation.
        """
        s, dev = self.settings, self.ctx.device
        out = []
        for e, idx in enumerate(plan.lowrank):
            k = plan.ranks["down"][e]
            Wd = weights.get("down", e, torch.float64).to(dev)  # [n, m]
            if stats[e] is None:
                out.append((Wd.new_zeros(plan.n, 0), Wd.new_zeros(0, 0)))
                continue
            G_L, X_L = stats[e]
            L = idx.to(dev)
            B_L = B[:, L] if B is not None else torch.zeros_like(Wd[:, L])  # [n, |L|]
            delta0 = Wd[:, L] - B_L  # [n, |L|]
            if s.down_fit == "delta":
                white = whitening(regularize_gram(G_L, 0, None, s.damp))  # no mean Gram to shrink toward
                out.append(whitened_svd(delta0, white).factors(k))
                continue
            mu = s.prior * (float(torch.trace(G_L)) / L.numel() or 1.0)
            A = G_L + mu * torch.eye(L.numel(), dtype=torch.float64, device=dev)  # [|L|, |L|]
            fit = torch.linalg.solve(A, (X_L - B_L @ G_L + mu * delta0).T).T  # [n, |L|]
            out.append(whitened_svd(fit, whitening(A)).factors(k))
        return out


METHOD = RSMoEMethod
