"""Baseline ``svd``: activation-whitened per-expert SVD (SVD-LLM whitening) at one uniform rank.

Every projection of every expert gets rank r or r + 1, where r is the uniform rank the ratio allows and the few
leftover ranks of the layer's budget go to the factorizations whose next singular value removes the most
(whitened) output error — so the achieved ratio matches the request to within one rank per layer.
"""

from __future__ import annotations

import torch

from vllm_moe_lowrank.format import PROJS, LayerSpec, LowRankTerm, ProjSpec

from ..budget import layer_budget, top_up_ranks
from ..calibration import LayerCalibration
from ..errors import RatioError
from ..experts import ExpertWeights
from ..method import CompressedLayer, Damp, Method, MethodSettings, Shrink
from ..whitening import whitened_svd, whitening


class SVDSettings(MethodSettings):
    whiten: bool = True  # False: plain weight SVD, data-free
    damp: Damp = 1e-4  # relative Gram damping
    shrink: Shrink = 0.1  # Gram shrinkage toward the layer mean: κ = shrink·d pseudo-tokens (calibration.py)


class SVDMethod(Method):
    name = "svd"
    Settings = SVDSettings

    def __init__(self, ctx, settings: SVDSettings):
        super().__init__(ctx, settings)
        self.needs_calibration = settings.whiten

    def _total_rank(self) -> int:
        a = self.arch
        return layer_budget(self.ctx.ratio, a.num_experts, a.hidden_size, a.intermediate_size) // (
            a.hidden_size + a.intermediate_size)

    def check_feasible(self) -> None:
        a = self.arch
        k = 3 * a.num_experts
        if self._total_rank() < k:
            limit = 1 - (a.hidden_size + a.intermediate_size) / (a.hidden_size * a.intermediate_size)
            raise RatioError(f"--ratio {self.ctx.ratio}: infeasible for svd on this model (rank would drop below 1); "
                             f"the largest feasible ratio is {limit:.4f}")

    def dry_run(self):
        total, k = self._total_rank(), 3 * self.arch.num_experts
        r = total // k
        return [{"layer": l, "rank": r if total % k == 0 else f"{r}-{r + 1}",
                 "params": total * (self.arch.hidden_size + self.arch.intermediate_size)}
                for l in self.arch.moe_layers]

    splits_experts = True  # whitening and SVDs per expert; ranks topped up and down refitted in merge_experts

    def compress_layer(self, layer: int, weights: ExpertWeights, calib: LayerCalibration | None) -> CompressedLayer:
        return self.merge_experts(layer, weights, calib,
                                  [self.fit_experts(layer, list(range(self.arch.num_experts)), weights, calib)])

    def fit_experts(self, layer: int, experts: list[int], weights: ExpertWeights, calib: LayerCalibration | None):
        """Each expert's whitened SVDs kept to rank base + 1 (in the output dtype), and the gain of that rank."""
        s, dev = self.settings, self.ctx.device
        base = self._total_rank() // (3 * self.arch.num_experts)
        factors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        gains: dict[tuple[str, int], float] = {}
        for e in experts:
            white_in = white_mid = None
            if calib is not None:
                white_in = whitening(calib.expert_gram_in(e, s.damp, s.shrink).to(dev))
                white_mid = whitening(calib.expert_gram_mid(e, weights, s.damp, s.shrink).to(dev))
            for p in PROJS:
                svd = whitened_svd(weights.get(p, e, torch.float64).to(dev), white_mid if p == "down" else white_in)
                gains[p, e] = float(svd.sigma[base] ** 2) if base < svd.sigma.numel() else 0.0
                L, R = svd.factors(min(base + 1, svd.sigma.numel()))
                factors[p, e] = (L.to("cpu", self.ctx.dtype), R.to("cpu", self.ctx.dtype))
        return factors, gains

    def merge_experts(self, layer: int, weights: ExpertWeights, calib: LayerCalibration | None,
                      parts) -> CompressedLayer:
        E, s, dev = self.arch.num_experts, self.settings, self.ctx.device
        total = self._total_rank()
        base = total // (3 * E)
        factors = {k: v for f, _ in parts for k, v in f.items()}
        gains = {k: v for _, g in parts for k, v in g.items()}
        keys = list(factors)
        ranks = dict(zip(keys, top_up_ranks(base, total, torch.tensor([gains[k] for k in keys]))))
        tensors = {}
        for (p, e), (L, R) in factors.items():
            r = ranks[p, e]
            tensors[p, "lr_u", e], tensors[p, "lr_v", e] = L[:, :r].contiguous(), R[:r].contiguous()
        if calib is not None and calib.opts.down_fit == "compressed":
            for e in range(E):  # down refitted at its rank on ĥ of the gate/up as written (calibration.down_target)
                gu = [(tensors[p, "lr_u", e].double() @ tensors[p, "lr_v", e].double()) for p in ("gate", "up")]
                W, G = calib.down_target(e, weights, *gu, s.damp, s.shrink)
                L, R = whitened_svd(W.to(dev), whitening(G.to(dev))).factors(ranks["down", e])
                tensors["down", "lr_u", e], tensors["down", "lr_v", e] = (
                    L.to("cpu", self.ctx.dtype).contiguous(), R.to("cpu", self.ctx.dtype).contiguous())
        spec = LayerSpec(method=self.name, **{
            p: ProjSpec(lowrank=LowRankTerm(ranks=[ranks[p, e] for e in range(E)])) for p in PROJS})
        return CompressedLayer(spec=spec, tensors=tensors, info={"rank": base, "total_rank": total})


METHOD = SVDMethod
