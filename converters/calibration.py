"""The shared calibration collector: what one MoE layer saw during the calibration pass.

Every method gets its statistics from here: routing counts and frequencies, per-expert inputs and their Grams for
gate/up, intermediate activations and their Grams for down (float64), and per-unit activation statistics. Only the
layer's inputs and routing are stored; per-expert statistics are computed on demand, one expert at a time, so peak
memory stays at one expert's working set (a per-expert n×n Gram of Qwen3-30B is 32 MiB, all 128 are 4 GiB).

The Gram API every method (and the quantization refit) calls: ``expert_gram_in`` / ``expert_gram_mid`` (weighted
and shrunk as ``CalibOptions`` say, regularized, float64) and ``down_target`` (down refitted on the compressed
intermediates ĥ). Grams are accumulated in float64 from float32 chunks of ``GRAM_CHUNK`` tokens (bounded memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .experts import ExpertWeights
from .whitening import regularize_gram

GRAM_CHUNK = 4096  # tokens per float64 accumulation step: Gram memory is O(chunk·d + d²), not O(T·d)
_MID_MEAN_TOKENS = 2048  # tokens per expert (strided) behind the layer-mean intermediate Gram (a shrinkage prior)


@dataclass(frozen=True)
class CalibOptions:
    """Switches of the shared calibration statistics (``moe-convert --gram-weight/--shrink/--down-fit``)."""

    weighted: bool = True  # Σ_t g_t²·x_t x_tᵀ: an expert's output counts with its routing weight g (False: Σ x xᵀ)
    shrink: Literal["smooth", "cliff"] = "smooth"  # smooth: every expert gets κ = shrink·d pseudo-tokens of the
    #   layer mean (gate/up and down); cliff: the old rule, only experts with N_e < d, gate/up only
    down_fit: Literal["compressed", "dense"] = "compressed"  # fit down on ĥ = silu(Ĝx)⊙(Ûx) or on dense h


def gram(x: torch.Tensor, weight: torch.Tensor | None = None, chunk: int = GRAM_CHUNK) -> torch.Tensor:
    """[d, d] float64 Σ_t w_t²·x_t x_tᵀ over rows of x [N, d] (w [N] or None), ``chunk`` rows at a time."""
    d = x.shape[1]
    out = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for a in range(0, x.shape[0], chunk):
        xc = x[a:a + chunk].double()
        if weight is not None:
            xc = xc * weight[a:a + chunk, None].double()
        out.addmm_(xc.T, xc)
    return out


def cross_gram(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None,
               chunk: int = GRAM_CHUNK) -> torch.Tensor:
    """[da, db] float64 Σ_t w_t²·a_t b_tᵀ (chunked like ``gram``)."""
    out = torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for s in range(0, a.shape[0], chunk):
        ac, bc = a[s:s + chunk].double(), b[s:s + chunk].double()
        if weight is not None:
            w2 = weight[s:s + chunk, None].double() ** 2
            ac = ac * w2
        out.addmm_(ac.T, bc)
    return out


@dataclass
class LayerCalibration:
    x: torch.Tensor  # [T, n] MoE-block inputs of every calibration token
    topk_ids: torch.Tensor  # [T, k] int64 routed experts
    topk_weights: torch.Tensor  # [T, k] float32 routing weights
    num_experts: int
    opts: CalibOptions = field(default_factory=CalibOptions)
    _index: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _mean: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    def counts(self) -> torch.Tensor:
        """[E] tokens routed to each expert."""
        return torch.bincount(self.topk_ids.reshape(-1), minlength=self.num_experts)

    def frequency(self) -> torch.Tensor:
        """[E] f_e = share of tokens whose top-k contains e (Σ_e f_e = k)."""
        return self.counts().double() / max(self.num_tokens, 1)

    def holdout_split(self, frac: float = 0.25, block: int = 256) -> tuple[LayerCalibration, LayerCalibration]:
        """(fit, held): a deterministic, disjoint split of the tokens for the choices a method must not judge on
        the tokens it fitted (in-sample error favours the more flexible fit). ``held`` is the last ⌈frac·T/block⌉
        whole blocks of ``block`` tokens — whole calibration sequences at the default --seq-len 256; the sequences
        are random windows of the calibration text, so the tail is a random subset — and ``fit`` the rest. Both are
        views of ``x`` (no copy) with this calibration's options. Fewer than two blocks: split at ⌈(1−frac)·T⌉."""
        T = self.num_tokens
        nblocks = T // block
        cut = (nblocks - max(1, math.ceil(frac * nblocks))) * block if nblocks >= 2 else math.ceil((1 - frac) * T)
        cut = min(max(cut, 1), T - 1) if T >= 2 else T
        part = lambda s: LayerCalibration(x=self.x[s], topk_ids=self.topk_ids[s], topk_weights=self.topk_weights[s],  # noqa: E731
                                          num_experts=self.num_experts, opts=self.opts)
        return part(slice(0, cut)), part(slice(cut, T))

    def _routes(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        if e not in self._index:
            tok, slot = (self.topk_ids == e).nonzero(as_tuple=True)
            self._index[e] = (tok, self.topk_weights[tok, slot])
        return self._index[e]

    def token_index(self, e: int) -> torch.Tensor:
        """[N_e] positions of the tokens routed to e."""
        return self._routes(e)[0]

    def route_weight(self, e: int) -> torch.Tensor:
        """[N_e] routing weight of e for each of its tokens."""
        return self._routes(e)[1]

    def inputs(self, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N_e, n] inputs routed to e."""
        return self.x[self.token_index(e)].to(dtype)

    def _weight(self, e: int) -> torch.Tensor | None:
        return self.route_weight(e) if self.opts.weighted else None

    def gram_in(self, e: int) -> torch.Tensor:
        """[n, n] float64 Σ_t (g_t²) x_t x_tᵀ over e's tokens (input of gate and up; g² when ``opts.weighted``)."""
        idx, n = self.token_index(e), self.x.shape[1]
        out = torch.zeros(n, n, dtype=torch.float64)
        w = self._weight(e)
        for a in range(0, idx.numel(), GRAM_CHUNK):
            out += gram(self.x[idx[a:a + GRAM_CHUNK]], None if w is None else w[a:a + GRAM_CHUNK])
        return out

    def token_unit(self, e: int) -> float:
        """Mean Gram weight of one of e's tokens: mean g² (``opts.weighted``; the layer's for an unrouted expert) or 1.
        A pseudo-token of the shrinkage prior carries this much, so the prior scales with the Gram it joins."""
        if not self.opts.weighted:
            return 1.0
        w = self.route_weight(e)
        return float(w.double().square().mean()) if w.numel() else float(self.topk_weights.double().square().mean())

    def mean_gram_in(self) -> torch.Tensor:
        """[n, n] float64 layer mean Gram per routed (token, expert) pair: Σ_t Σ_k g_tk²·x_t x_tᵀ / Σ_t Σ_k g_tk²
        (``opts.weighted``) or Σ_t x_t x_tᵀ / T. The shrinkage target of every expert's input Gram; chunked."""
        if self.opts.weighted:
            w2 = self.topk_weights.double().square().sum(1)  # [T]
            return gram(self.x, w2.sqrt()) / max(float(w2.sum()), 1e-30)
        return gram(self.x) / max(self.num_tokens, 1)

    def intermediate(self, e: int, w: ExpertWeights, gate: torch.Tensor | None = None,
                     up: torch.Tensor | None = None) -> torch.Tensor:
        """[N_e, m] float32 h = silu(W_g x) ⊙ (W_u x) of expert e on its tokens (input of down); with ``gate``/
        ``up`` [m, n] given (the compressed expert's), ĥ = silu(Ĝx) ⊙ (Ûx)."""
        x = self.inputs(e)
        g = w.get("gate", e) if gate is None else gate.float()
        u = w.get("up", e) if up is None else up.float()
        return torch.nn.functional.silu(x @ g.T) * (x @ u.T)

    def gram_mid(self, e: int, w: ExpertWeights, gate: torch.Tensor | None = None,
                 up: torch.Tensor | None = None) -> torch.Tensor:
        """[m, m] float64 Σ_t (g_t²) h_t h_tᵀ over e's tokens (ĥ with compressed ``gate``/``up``)."""
        return gram(self.intermediate(e, w, gate, up), self._weight(e))

    def mean_gram_mid(self, w: ExpertWeights) -> torch.Tensor:
        """[m, m] float64 layer mean of the dense intermediate Grams per unit of token mass (the shrinkage target of
        down's Grams), from at most ``_MID_MEAN_TOKENS`` strided tokens per expert; cached per layer."""
        if "mid" not in self._mean:
            m = w.gate.shape[1]
            tot, mass = torch.zeros(m, m, dtype=torch.float64), 0.0
            for e in range(self.num_experts):
                idx = self.token_index(e)
                if not idx.numel():
                    continue
                step = max(1, math.ceil(idx.numel() / _MID_MEAN_TOKENS))
                x = self.x[idx[::step]].float()
                h = torch.nn.functional.silu(x @ w.get("gate", e).T) * (x @ w.get("up", e).T)
                r = self._weight(e)
                r = None if r is None else r[::step]
                tot += gram(h, r)
                mass += float(r.double().square().sum()) if r is not None else float(h.shape[0])
            self._mean["mid"] = tot / max(mass, 1e-30)
        return self._mean["mid"]

    def _mean_in_cached(self) -> torch.Tensor:
        if "in" not in self._mean:
            self._mean["in"] = self.mean_gram_in()
        return self._mean["in"]

    # --- the Gram API: weighted, shrunk, regularized -------------------------------------------------------------
    def expert_gram_in(self, e: int, damp: float = 1e-4, shrink: float = 0.1) -> torch.Tensor:
        """[n, n] float64 regularized input Gram of expert e (gate/up): weighted by g² and shrunk toward the layer
        mean as ``opts`` say, then relatively damped (``whitening.regularize_gram``)."""
        return regularize_gram(self.gram_in(e), self.token_index(e).numel(), self._mean_in_cached(), damp, shrink,
                               smooth=self.opts.shrink == "smooth", unit=self.token_unit(e))

    def expert_gram_mid(self, e: int, w: ExpertWeights, damp: float = 1e-4, shrink: float = 0.1,
                        gate: torch.Tensor | None = None, up: torch.Tensor | None = None) -> torch.Tensor:
        """[m, m] float64 regularized Gram of down's input (h, or ĥ with compressed ``gate``/``up``); shrunk toward
        the layer-mean intermediate Gram when ``opts.shrink`` is smooth (the cliff rule never shrank down)."""
        smooth = self.opts.shrink == "smooth"
        return regularize_gram(self.gram_mid(e, w, gate, up), self.token_index(e).numel(),
                               self.mean_gram_mid(w) if smooth else None, damp, shrink, smooth=smooth,
                               unit=self.token_unit(e))

    def down_target(self, e: int, w: ExpertWeights, gate: torch.Tensor | None, up: torch.Tensor | None,
                    damp: float = 1e-4, shrink: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
        """(W* [n, m], G [m, m]) float64 to fit down with: any Ŵ then has output error ‖W_d H − Ŵ Ĥ‖² =
        ‖(Ŵ − W*) Ĝ^½‖² + const, so every method's whitened fit of W* under Ĝ fits down on the compressed
        intermediates ĥ = silu(Ĝx)⊙(Ûx) against the dense output W_d h [ours; rs-moe's ridge base does the same].

        W* = W_d C Ĝ⁻¹ with C = Σ g²·h ĥᵀ and Ĝ the regularized Σ g²·ĥ ĥᵀ. With ``opts.down_fit == "dense"`` or no
        compressed gate/up: (W_d, regularized Σ g²·h hᵀ), the previous behaviour."""
        Wd = w.get("down", e, torch.float64)
        if self.opts.down_fit == "dense" or (gate is None and up is None):
            return Wd, self.expert_gram_mid(e, w, damp, shrink)
        G_hat = self.expert_gram_mid(e, w, damp, shrink, gate, up)
        if not self.token_index(e).numel():
            return Wd, G_hat
        C = cross_gram(self.intermediate(e, w), self.intermediate(e, w, gate, up), self._weight(e))  # [m, m]
        L, info = torch.linalg.cholesky_ex(G_hat)
        rhs = (Wd @ C).T  # [m, n]
        W_star = (torch.cholesky_solve(rhs, L) if info.item() == 0 else torch.linalg.lstsq(G_hat, rhs).solution).T
        return W_star, G_hat


def moe_output(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               expert_fn) -> torch.Tensor:
    """Σ_k w_tk · expert_{id_tk}(x_t) for every token; expert_fn(e, x_e) → [N_e, n]."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, n]
    for e in topk_ids.unique().tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        y = expert_fn(e, x[tok].float())  # [N_e, n]
        out.index_add_(0, tok, y * topk_weights[tok, slot, None].float())
    return out


def dense_expert_fn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    """expert_fn over stacked dense weights gate/up [E, m, n], down [E, n, m]."""

    def fn(e: int, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(x @ gate[e].T.float()) * (x @ up[e].T.float())
        return h @ down[e].T.float()

    return fn


def routed_output_change(cfg, layer: int, get, weights: ExpertWeights, calib: LayerCalibration,
                         max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([T', n] Δy, [T', n] y) on every ⌈T/max_tokens⌉-th token of ``calib`` (all without ``max_tokens``): y the
    dense routed MoE output Σ_k g_tk·expert(x_t), Δy the change the compressed layer ``layer`` of ``cfg`` (a
    format.MoELowRankConfig, tensors by name through ``get``) makes — the routing-weighted objective every
    method's fit shares, and the report's output error."""
    from vllm_moe_lowrank.format import PROJS
    from vllm_moe_lowrank.materialize import materialize_projection

    def approx(e: int, xe: torch.Tensor) -> torch.Tensor:  # one expert materialized at a time
        g, u, d = (materialize_projection(cfg, layer, p, e, get).float() for p in PROJS)
        return (torch.nn.functional.silu(xe @ g.T) * (xe @ u.T)) @ d.T

    step = max(1, calib.num_tokens // max_tokens) if max_tokens else 1
    x, ids, w = calib.x[::step].float(), calib.topk_ids[::step], calib.topk_weights[::step]
    y = moe_output(x, ids, w, dense_expert_fn(weights.gate, weights.up, weights.down))
    return moe_output(x, ids, w, approx) - y, y


def routed_output_sq_error(arch, layer: int, comp, weights: ExpertWeights, calib: LayerCalibration,
                           max_tokens: int | None = None) -> torch.Tensor:
    """[T'] float64 ‖Δy_t‖² per token (``routed_output_change``) of a compressed layer ``comp`` (a
    ``method.CompressedLayer``), before it is cast for writing."""
    from vllm_moe_lowrank.format import FORMAT_VERSION, MoELowRankConfig

    cfg = MoELowRankConfig(format_version=FORMAT_VERSION, method=comp.spec.method, num_experts=arch.num_experts,
                           hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                           moe_prefix=arch.moe_prefix, expert_names=arch.expert_names, moe_layers=[layer],
                           layers={layer: comp.spec})
    named = {cfg.tensor_name(layer, p, suf, e): t for (p, suf, e), t in comp.tensors.items()}
    dy, _ = routed_output_change(cfg, layer, named.__getitem__, weights, calib, max_tokens)
    return dy.double().square().sum(-1)


def residual_error(arch, layer: int, comp, weights: ExpertWeights, calib: LayerCalibration, hidden_ms: float = 1.0,
                   max_tokens: int = 4096) -> float:
    """RMS of the routed MoE output change (``routed_output_sq_error``) over √``hidden_ms`` [ours]: with
    ``hidden_ms`` the mean ‖h‖² of the decoder layer's output it sees how much the layer's MoE output weighs in the
    residual stream (moe-svd's measured selection)."""
    dy2 = routed_output_sq_error(arch, layer, comp, weights, calib, max_tokens)
    return math.sqrt(float(dy2.mean()) / max(hidden_ms, 1e-30))


def clearly_lower(a: torch.Tensor, b: torch.Tensor, block: int = 256, z: float = 2.0) -> bool:
    """Is per-token error ``a`` [T] lower than ``b`` [T] on held-out tokens by more than ``z`` standard errors of
    the paired difference? Tokens of one calibration sequence (``block`` consecutive) are correlated, so the
    standard error is taken over per-block means. A choice that wins only within the noise of the held-out sample
    should not be taken over the simpler fit. Fewer than two blocks: a plain a.mean() < b.mean()."""
    d = (a - b).double()
    B = d.numel() // block
    if B < 2:
        return float(d.mean()) < 0
    m = d[:B * block].reshape(B, block).mean(1)  # [B]
    return float(m.mean()) + z * float(m.std()) / math.sqrt(B) < 0
