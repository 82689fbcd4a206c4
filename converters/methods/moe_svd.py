"""``moe-svd``: MoE-SVD (Li et al., ICML 2025; paper 003): selective decomposition, shared V, U-trimming.

1. Selection (§3.2): by default every MoE layer is decomposed (``selection=uniform``: on the fixtures keeping
   layers dense and compressing the others harder lost in-sample, docs/methods/moe-svd.md). Otherwise a plan pass
   gives every MoE layer its sensitivity S_L = Σ_i f_i·p_i·a_i (Eq. 4, App. Alg. 1; ``selection=sensitivity``,
   the paper) or the measured damage of its decomposition (RMS MoE-output change over RMS residual stream,
   ``selection=measured``, [ours]); the least sensitive layers are decomposed first, the others stay dense. The
   fewest layers that can reach ``--ratio`` are decomposed and the rank is the free variable that lands the
   budget exactly (``num_layers`` trades layers for rank).
2. Per decomposed layer, projection and expert group: activation-weighted SVD (Eq. 2, App. D.1) of the group's
   most frequent expert e*; its right factor V_rᵀ·S_{e*}⁻¹ is shared by the group (Eq. 5-6) with the whitening
   folded in — no per-expert inverse.
3. U-trimming (Eq. 7-8, App. Alg. 3): the expert at frequency rank π in its group uses left combination
   c = min(π, k_U − 1), i.e. {U_1}, {U_1+U_2}, ..., so a group holds exactly k_U left slots and experts sharing a
   slot are one function. How a slot matrix is formed is the ``combine`` option: the paper's Eq. 8 sum, Alg. 3's
   product, or a least-squares refit (default, chosen by the measured ablation in docs/methods/moe-svd.md).
4. Does sharing pay? (default, [ours]) each decomposed layer is fitted shared and per expert at the same budget on
   three quarters of the calibration tokens; sharing is kept only if it changes the routed MoE output clearly less
   (two standard errors) on the held-out quarter, and the kept fit is refitted on all of them (``fallback``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator

from vllm_moe_lowrank.format import PROJS, LayerSpec, LowRankTerm, ProjSpec

from ..calibration import LayerCalibration, clearly_lower, residual_error, routed_output_sq_error
from ..errors import RatioError
from ..experts import ExpertWeights
from ..method import CompressedLayer, Damp, Method, MethodSettings, Shrink
from ..whitening import whitened_svd, whitening
from .moe_svd_fit import (Factorization, ProjFit, _GramCache, _rank_info, allocate_ranks,  # noqa: F401
                          per_expert_svd, pooled_spectrum, project_group, trim)


GU = ("gate", "up")


class MoESVDSettings(MethodSettings):
    # sensitivity: S_L (Eq. 4); measured: output error of the decomposition relative to the residual stream [ours];
    # uniform: every layer (Table 4's uniform SVD); reverse: most sensitive S_L first (a check of the metric)
    # (default uniform: every layer decomposed, chosen by in-sample MoE-output error, docs/methods/moe-svd.md)
    selection: Literal["measured", "sensitivity", "uniform", "reverse"] = "uniform"
    # first/last MoE layer: last = only when the ratio needs them, any = as the metric says, never = refuse;
    # auto: last for the S_L selections (the paper never picks them), any for measured (it sees them)
    edges: Literal["auto", "last", "any", "never"] = "auto"
    layers: list[int] | None = None  # explicit decomposed layers (overrides selection and num_layers)
    # decomposed layers: min = the fewest that reach the ratio (most layers stay dense, lowest rank), max = the most
    # (highest rank), or a number; the rank is what lands the budget exactly
    num_layers: Annotated[int, Field(ge=1)] | Literal["min", "max"] = "min"
    preset: Literal["measured", "paper"] = "measured"  # paper: the literal paper settings for every option left unset
    share: bool = True  # False: per-expert whitened SVD in the selected layers (no sharing, no trimming)
    # left slots kept per group; None: the group size (measured, no trimming) or the paper's E/4 (2 per 8)
    k_u: Annotated[int, Field(ge=1)] | None = None
    # shared right factor: pooled = top directions of the frequency-weighted stack under the group's summed Gram
    # [ours, measured]; top = the whitened V of the group's most frequent expert (Eq. 5, paper); None: per preset
    v_source: Literal["pooled", "top"] | None = None
    # per decomposed layer, fit shared and per-expert SVD on 3/4 of the calibration tokens and keep (refitted on all)
    # sharing only if it changes the routed MoE output clearly less on the held-out 1/4 [ours]; None: on for
    # measured, off for paper
    fallback: bool | None = None
    share_down: bool | None = None  # down shares V like gate/up (paper) or is a per-expert SVD (measured); None: preset
    group_size: Annotated[int, Field(ge=1)] | None = None  # experts per sharing group; None: E for E <= 16, else 8
    combine: Literal["refit", "sum", "mean", "eq8", "alg3"] = "refit"  # slot matrix of a combination (Eq. 8)
    tau: float = Field(2.0, gt=0)  # activation-outlier threshold of a_i (App. Alg. 1)
    p_threshold: float = Field(1e-2, gt=0, lt=1)  # principal rank p_i counts σ_j > p_threshold·σ_max (App. Alg. 1)
    damp: Damp = 1e-4
    shrink: Shrink = 0.1

    @field_validator("layers", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [int(s) for s in v.replace(" ", "").split(",") if s]
        return v


class MoESVDMethod(Method):
    name = "moe-svd"
    Settings = MoESVDSettings

    def __init__(self, ctx, settings: MoESVDSettings):
        if settings.preset == "paper":  # the paper's choices for every option not given explicitly
            paper = {"selection": "sensitivity", "combine": "eq8"}
            settings = settings.model_copy(update={k: v for k, v in paper.items()
                                                   if k not in settings.model_fields_set})
        super().__init__(ctx, settings)
        s, a = settings, self.arch
        self.needs_plan_pass = s.layers is None and s.selection != "uniform"
        self.E, self.n, self.m = a.num_experts, a.hidden_size, a.intermediate_size
        self.L = list(a.moe_layers)
        self.D = 3 * self.E * self.n * self.m  # dense params of one MoE layer
        self._obs: dict[int, dict[str, Any]] = {}
        self._hidden_ms: dict[int, float] = {}  # mean ‖h‖² of each decoder layer's output (selection=measured)
        self._plan: dict[str, Any] | None = None

    # ----- geometry ---------------------------------------------------------------------------------------------
    def group_size(self) -> int:
        return self.settings.group_size or (self.E if self.E <= 16 else 8)

    def groups(self) -> list[list[int]]:
        """Contiguous expert groups of near-equal size (App. D.3: DeepSeek 8 groups of 8)."""
        G = math.ceil(self.E / min(self.group_size(), self.E))
        return [[e for e in range(self.E) if e * G // self.E == g] for g in range(G)]

    def paper(self) -> bool:
        return self.settings.preset == "paper"

    def k_u(self, size: int) -> int:
        """Left slots kept in a group of ``size`` experts (paper, App. D.3: 8 → 2, 16 → 4, groups of 8 → 2;
        measured default: one per expert, no trimming)."""
        k = self.settings.k_u
        if k is None:
            k = max(1, self.group_size() // 4) if self.paper() else self.group_size()
        return min(k, size)

    def v_source(self) -> str:
        return self.settings.v_source or ("top" if self.paper() else "pooled")

    def fallback(self) -> bool:
        """Per layer, keep the shared fit only where it beats per-expert SVD on held-out calibration tokens."""
        return self.settings.fallback if self.settings.fallback is not None else not self.paper()

    def share_down(self) -> bool:
        return self.settings.share_down if self.settings.share_down is not None else self.paper()

    def shared_projs(self) -> tuple[str, ...]:
        return PROJS if self.share_down() else ("gate", "up")

    def io(self, p: str) -> tuple[int, int]:
        return (self.n, self.m) if p == "down" else (self.m, self.n)

    def factorizations(self, share: bool | None = None) -> list[Factorization]:
        share = self.settings.share if share is None else share
        out = []
        for p in PROJS:
            o, i = self.io(p)
            if share and p in self.shared_projs():
                out += [Factorization(p, g, self.k_u(len(mem)) * o + i, min(o, i))
                        for g, mem in enumerate(self.groups())]
            else:
                out += [Factorization(p, e, o + i, min(o, i)) for e in range(self.E)]
        return out

    def layer_kept(self, rank: int) -> int:
        return sum(f.cost * min(rank, f.cap) for f in self.factorizations())

    # ----- ratio → number of decomposed layers ------------------------------------------------------------------
    def total_budget(self) -> int:
        return math.floor((1.0 - self.ctx.ratio) * self.D * len(self.L))

    def ratio_range(self, N: int) -> tuple[float, float]:
        """Ratios reachable by decomposing N layers (rank from its cap down to 1)."""
        LD = self.D * len(self.L)
        hi_keep = (len(self.L) - N) * self.D + N * self.layer_kept(max(f.cap for f in self.factorizations()))
        lo_keep = (len(self.L) - N) * self.D + N * self.layer_kept(1)
        return 1 - hi_keep / LD, 1 - lo_keep / LD

    def edges(self) -> str:
        s = self.settings
        return s.edges if s.edges != "auto" else ("any" if s.selection == "measured" else "last")

    def allowed(self) -> list[int]:
        """Layers that may be decomposed, in the order they are considered (before sensitivity sorting)."""
        if self.edges() == "never":
            return self.L[1:-1]
        return list(self.L)

    def feasible(self, N: int) -> bool:
        B = self.total_budget()
        dense = (len(self.L) - N) * self.D
        caps = max(f.cap for f in self.factorizations())
        return dense + N * self.layer_kept(1) <= B <= dense + N * self.layer_kept(caps) and B - dense >= 0

    def num_decomposed(self) -> int:
        s = self.settings
        if s.layers is not None:
            N, where = len(s.layers), f"layers={','.join(map(str, s.layers))}"
        elif s.selection == "uniform":
            N, where = len(self.L), "selection=uniform"
        elif isinstance(s.num_layers, int):
            N, where = s.num_layers, f"num_layers={s.num_layers}"
        else:
            candidates = range(1, len(self.allowed()) + 1)
            for N in (candidates if s.num_layers == "min" else reversed(candidates)):
                if self.feasible(N):
                    return N
            ranges = ", ".join(f"{max(lo, 0):.4f}-{hi:.4f} (N={N})" for N in range(1, len(self.allowed()) + 1)
                               for lo, hi in [self.ratio_range(N)])
            raise RatioError(f"--ratio {self.ctx.ratio}: infeasible for moe-svd on this model ({self._desc()}, "
                             f"edges={self.edges()}): decomposing N of the {len(self.allowed())} allowed MoE layers "
                             f"reaches ratios {ranges}; pick a ratio in these ranges or change -o k_u / group_size "
                             "/ edges")
        top = len(self.allowed()) if isinstance(s.num_layers, int) and s.layers is None else len(self.L)
        if not 1 <= N <= top:
            raise RatioError(f"-o {where}: must decompose 1..{top} layers on this model (edges={self.edges()})")
        if not self.feasible(N):
            lo, hi = self.ratio_range(N)
            raise RatioError(f"--ratio {self.ctx.ratio}: infeasible for moe-svd with {where} and {self._desc()}: "
                             f"decomposing {N} layer(s) reaches ratios {max(lo, 0):.4f} to {hi:.4f} only")
        return N

    def _desc(self) -> str:
        s = self.settings
        if not s.share:
            return "share=false"
        return f"k_u={self.k_u(self.group_size())} of group_size={self.group_size()}"

    def check_feasible(self) -> None:
        s, E = self.settings, self.E
        if s.group_size is not None and not 1 <= s.group_size <= E:
            raise RatioError(f"-o group_size={s.group_size}: must be in 1..{E}")
        if s.k_u is not None and not 1 <= s.k_u <= self.group_size():
            raise RatioError(f"-o k_u={s.k_u}: must be in 1..group_size={self.group_size()}")
        if not s.share and (s.k_u is not None or s.group_size is not None or s.combine != "refit"):
            raise RatioError("-o share=false decomposes every expert on its own: k_u, group_size and combine "
                             "do not apply")
        if s.layers is not None:
            bad = [l for l in s.layers if l not in self.L]
            if bad or len(set(s.layers)) != len(s.layers):
                raise RatioError(f"-o layers={s.layers}: must be distinct MoE layers among {self.L}")
        self.num_decomposed()

    def dry_run(self) -> list[dict[str, Any]]:
        N = self.num_decomposed()
        plan = self._select({l: 0.0 for l in self.L}) if not self.needs_plan_pass else None
        per = (self.total_budget() - (len(self.L) - N) * self.D) // N
        r = allocate_ranks(per, self.factorizations())
        chosen = plan["decomposed"] if plan else None
        return [{"layer": l, "decomposed": "decided by the plan pass" if chosen is None else str(l) in chosen,
                 "rank": f"{min(r)}-{max(r)}" if min(r) != max(r) else r[0], "decomposed_layers": N,
                 "params_if_decomposed": per} for l in self.L]

    # ----- plan pass: sensitivity (Eq. 4) and selection ---------------------------------------------------------
    def observe_hidden(self, layer: int, hidden: list[torch.Tensor]) -> None:
        total = sum(float(h.float().square().sum(dtype=torch.float64)) for h in hidden)  # one batch at a time
        self._hidden_ms[layer] = total / max(sum(h.numel() // h.shape[-1] for h in hidden), 1)

    def observe_layer(self, layer: int, weights: ExpertWeights, calib: LayerCalibration | None) -> None:
        obs = layer_sensitivity(weights, calib, self.settings.tau, self.settings.p_threshold)
        if self.settings.selection == "measured":
            N = self.num_decomposed()
            comp = self.compress_with_budget(layer, weights, calib,
                                             (self.total_budget() - (len(self.L) - N) * self.D) // N)
            obs["error"] = residual_error(self.arch, layer, comp, weights, calib, self._hidden_ms[layer])
        self._obs[layer] = obs

    def make_plan(self) -> dict[str, Any]:
        key = "error" if self.settings.selection == "measured" else "S"
        return self._select({l: self._obs[l][key] for l in self.L}, self._obs)

    def load_plan(self, plan: dict[str, Any]) -> None:
        self._plan = plan

    def _select(self, sens: dict[int, float], obs: dict | None = None) -> dict[str, Any]:
        """Decompose the N least sensitive allowed layers (edges last unless edges=any); split the budget evenly."""
        s, N = self.settings, self.num_decomposed()
        if s.layers is not None:
            chosen = list(s.layers)
        elif s.selection == "uniform":
            chosen = list(self.L)
        else:
            sign = -1.0 if s.selection == "reverse" else 1.0
            edges = {self.L[0], self.L[-1]} if self.edges() == "last" else set()
            order = sorted(self.allowed(), key=lambda l: (l in edges, sign * sens[l], l))
            chosen = order[:N]
        chosen = sorted(chosen)
        budget = self.total_budget() - (len(self.L) - N) * self.D
        share = [budget // N + (1 if i < budget % N else 0) for i in range(N)]
        plan: dict[str, Any] = {"decomposed": {str(l): b for l, b in zip(chosen, share)},
                                "order_by_sensitivity": sorted(self.L, key=lambda l: (sens[l], l))}
        if obs is not None:
            plan["sensitivity"] = {str(l): obs[l] for l in self.L}
        return plan

    def plan(self) -> dict[str, Any]:
        if self._plan is None:  # no plan pass: the selection does not depend on calibration
            self._plan = self._select({l: 0.0 for l in self.L})
        return self._plan

    # ----- the work ---------------------------------------------------------------------------------------------
    def compress_layer(self, layer: int, weights: ExpertWeights,
                       calib: LayerCalibration | None) -> CompressedLayer | None:
        plan = self.plan()
        budget = plan["decomposed"].get(str(layer))
        if budget is None:
            return None
        comp = self.compress_with_budget(layer, weights, calib, budget)
        comp.info["selection"] = {"decomposed": [int(l) for l in plan["decomposed"]], "budget": budget,
                                  **plan.get("sensitivity", {}).get(str(layer), {})}
        return comp

    def compress_with_budget(self, layer: int, weights: ExpertWeights, calib: LayerCalibration | None,
                             budget: int) -> CompressedLayer:
        if calib is None:
            raise RatioError("moe-svd needs calibration data (routing frequency and activation Grams)")
        s = self.settings
        grams = _GramCache(weights, calib, s.damp, s.shrink, self.ctx.device)
        cache = lambda: grams if grams.keep else _GramCache(weights, calib, s.damp, s.shrink, self.ctx.device)  # noqa
        if not s.share:
            return self._per_expert(layer, weights, calib, cache(), budget)
        if not self.fallback():
            return self._shared(layer, weights, calib, cache(), budget)
        share, err = self.sharing_pays(layer, weights, calib, budget)
        chosen = (self._shared if share else self._per_expert)(layer, weights, calib, cache(), budget)
        chosen.info["sharing_pays"] = {"shared": share, "judged_on": "held-out calibration tokens",
                                       **{f"{k}_rms_dy": round(v, 6) for k, v in err.items()}}
        return chosen

    def sharing_pays(self, layer: int, weights: ExpertWeights, calib: LayerCalibration,
                     budget: int) -> tuple[bool, dict[str, float]]:
        """Does sharing pay in this layer? [ours] Both fits — shared and per-expert whitened SVD (``svd`` at the
        same budget) — on the calibration tokens minus a held-out quarter (``LayerCalibration.holdout_split``),
        judged by the change of the routed MoE output on the held-out quarter: in-sample the more flexible shared fit
        wins every layer of the second fixture yet loses on held-out text. Sharing is kept only when it is lower by
        more than two standard errors over held-out sequences (``clearly_lower``); the winner is then refitted on
        every token by the caller. Returns (sharing kept, RMS Δy of each candidate); the eval text is never seen."""
        s = self.settings
        fit, held = calib.holdout_split()
        grams = _GramCache(weights, fit, s.damp, s.shrink, self.ctx.device)
        cache = lambda: grams if grams.keep else _GramCache(weights, fit, s.damp, s.shrink, self.ctx.device)  # noqa
        cands = {"shared": self._shared(layer, weights, fit, cache(), budget)}
        try:
            cands["per_expert"] = self._per_expert(layer, weights, fit, cache(), budget)
        except RatioError:  # the budget leaves per-expert SVD below rank 1: sharing is the only fit
            return True, {}
        dy2 = {k: routed_output_sq_error(self.arch, layer, c, weights, held) for k, c in cands.items()}  # [T_held]
        err = {k: math.sqrt(float(v.mean())) for k, v in dy2.items()}
        return clearly_lower(dy2["shared"], dy2["per_expert"]), err

    def _per_expert(self, layer: int, weights: ExpertWeights, calib: LayerCalibration, grams: _GramCache,
                    budget: int) -> CompressedLayer:
        """Per-expert whitened SVD of a decomposed layer (``share=false``, "selective SVD", and the fallback when
        sharing does not pay): ``svd`` at this budget."""
        s = self.settings
        return per_expert_svd(self.name, layer, weights, calib, grams, budget, s.damp, s.shrink, self.ctx.dtype)

    def _shared(self, layer: int, weights: ExpertWeights, calib: LayerCalibration, grams: _GramCache,
                budget: int) -> CompressedLayer:
        E, dev = self.E, self.ctx.device
        freq = calib.frequency()  # [E]
        groups = self.groups()
        # frequency rank π inside each group (ties by expert index) and the source expert e* (Eq. 5)
        order = [sorted(mem, key=lambda e: (-float(freq[e]), e)) for mem in groups]
        facts = self.factorizations()
        shared, pooled = self.shared_projs(), self.v_source() == "pooled"
        # pass 1: whitened spectra decide the ranks (Eq. 2 on e*, or of the pooled stack; per-expert down: its own)
        spectra = {}
        for g, mem in enumerate(groups):
            src = order[g][0]
            for p in shared:
                spectra[p, g] = (pooled_spectrum(weights, grams, p, mem, freq) if pooled else
                                 torch.linalg.svdvals(weights.get(p, src, torch.float64).to(dev)
                                                      @ grams.white(p, src).S) ** 2)  # [min(out, in)]
            if "down" not in shared:
                for e in mem:
                    spectra["down", e] = torch.linalg.svdvals(weights.get("down", e, torch.float64).to(dev)
                                                              @ grams.white("down", e).S) ** 2
            for e in mem:
                grams.drop(e)  # recomputed in pass 2: holds at most one group's statistics at a time
        sig = [spectra[f.proj, f.group] for f in facts]
        ranks = allocate_ranks(budget, facts, sig)
        if min(ranks) < 1:
            raise RatioError(f"layer {layer}: budget {budget} leaves a rank below 1")
        rank = {(f.proj, f.group): r for f, r in zip(facts, ranks)}
        # pass 2, one group at a time: shared right factor, per-expert statistics, slots
        V = {p: [] for p in shared}
        U = {p: [] for p in shared}
        tensors = {}
        slot_of = [0] * E
        err_num = {p: 0.0 for p in shared}
        err_den = {p: 0.0 for p in shared}
        slot_base = 0
        for g, mem in enumerate(groups):
            k = self.k_u(len(mem))
            fits = {p: project_group(weights, grams, p, order[g], k, rank[p, g], self.settings.combine, dev,
                                     freq if pooled else None) for p in shared}
            pos_slot, slots = trim(fits, k, self.settings.combine)
            for pi, e in enumerate(order[g]):
                slot_of[e] = slot_base + pos_slot[pi]
            for p, fit in fits.items():
                err_num[p] += sum(fit.error(i, slots[p][c]) for i, c in enumerate(pos_slot))
                err_den[p] += sum(fit.c)
                right, left = fit.balanced(slots[p])
                V[p].append(right)
                U[p] += left
            if "down" not in shared:  # per-expert down, fitted on ĥ of the gate/up as written (down_target)
                s = self.settings
                for pi, e in enumerate(order[g]):
                    gu = [(slots[p][pos_slot[pi]] @ fits[p].R0).to(self.ctx.dtype).double().cpu() for p in GU]
                    W, G = grams.c.down_target(e, weights, *gu, s.damp, s.shrink)
                    L, R = whitened_svd(W.to(dev), whitening(G.to(dev))).factors(rank["down", e])
                    tensors["down", "lr_u", e], tensors["down", "lr_v", e] = L.cpu(), R.cpu()
            for e in mem:
                grams.drop(e)
            slot_base += k
        right_groups = [next(g for g, mem in enumerate(groups) if e in mem) for e in range(E)]
        projs = {}
        for p in shared:
            tensors[p, "lr_v", None] = torch.cat(V[p]).cpu()  # [Σ_g r_g, in]
            tensors[p, "lr_u", None] = torch.cat(U[p], dim=1).cpu()  # [out, Σ_s r_s]
            projs[p] = ProjSpec(lowrank=LowRankTerm(ranks=[rank[p, right_groups[e]] for e in range(E)],
                                                    right_groups=right_groups, left_slots=list(slot_of)))
        if "down" not in shared:
            projs["down"] = ProjSpec(lowrank=LowRankTerm(ranks=[rank["down", e] for e in range(E)]))
        info = {"ranks": _rank_info(rank), "sources": [o[0] for o in order], "left_slots": slot_of,
                "k_u": [self.k_u(len(mem)) for mem in groups], "combine": self.settings.combine,
                "v_source": self.v_source(), "share_down": "down" in shared,
                "whitened_rel_err": {p: math.sqrt(err_num[p] / err_den[p]) if err_den[p] > 0 else 0.0
                                     for p in shared}}
        return CompressedLayer(spec=LayerSpec(method=self.name, **projs), tensors=tensors, info=info)


# ----- sensitivity (Eq. 4, App. Alg. 1) -------------------------------------------------------------------------
def layer_sensitivity(weights: ExpertWeights, calib: LayerCalibration | None, tau: float = 2.0,
                      p_threshold: float = 1e-2) -> dict[str, Any]:
    """S_L = Σ_i f_i·p_i·a_i with f_i the routing frequency, p_i the principal rank (σ_j > p_threshold·σ_max of the
    plain weight SVD, mean over gate/up/down) and a_i the share of |h| > τ·mean|h| over expert i's intermediate
    activations h on its routed tokens."""
    E = weights.gate.shape[0]
    if calib is None:
        raise RatioError("moe-svd needs calibration data for its layer sensitivity")
    f = calib.frequency()  # [E]
    p = torch.zeros(E, dtype=torch.float64)
    a = torch.zeros(E, dtype=torch.float64)
    for e in range(E):
        for proj in PROJS:
            s = torch.linalg.svdvals(weights.get(proj, e))  # [min(out, in)]
            p[e] += float((s > p_threshold * s[0]).sum()) / len(PROJS)
        if calib.token_index(e).numel():
            h = calib.intermediate(e, weights).abs()  # [N_e, m]
            a[e] = float((h > tau * h.mean()).double().mean())
    S = float((f * p * a).sum())
    return {"S": S, "f": [round(float(v), 6) for v in f], "p": [round(float(v), 3) for v in p],
            "a": [round(float(v), 6) for v in a]}


METHOD = MoESVDMethod
