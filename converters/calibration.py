"""The shared calibration collector: what one MoE layer saw during the calibration pass.

Every method gets its statistics from here: routing counts and frequencies, per-expert inputs and their Grams for
gate/up, intermediate activations and their Grams for down (float64), and per-unit activation statistics. Only the
layer's inputs and routing are stored; per-expert statistics are computed on demand, one expert at a time, so peak
memory stays at one expert's working set (a per-expert n×n Gram of Qwen3-30B is 32 MiB, all 128 are 4 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .experts import ExpertWeights


@dataclass
class LayerCalibration:
    x: torch.Tensor  # [T, n] MoE-block inputs of every calibration token
    topk_ids: torch.Tensor  # [T, k] int64 routed experts
    topk_weights: torch.Tensor  # [T, k] float32 routing weights
    num_experts: int
    _index: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    def counts(self) -> torch.Tensor:
        """[E] tokens routed to each expert."""
        return torch.bincount(self.topk_ids.reshape(-1), minlength=self.num_experts)

    def frequency(self) -> torch.Tensor:
        """[E] f_e = share of tokens whose top-k contains e (Σ_e f_e = k)."""
        return self.counts().double() / max(self.num_tokens, 1)

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

    def gram_in(self, e: int) -> torch.Tensor:
        """[n, n] float64 Σ_t x_t x_tᵀ over e's tokens (input of gate and up)."""
        x = self.inputs(e, torch.float64)
        return x.T @ x

    def mean_gram_in(self) -> torch.Tensor:
        """[n, n] float64 per-token average Gram of the layer (the shrinkage target for rarely routed experts)."""
        x = self.x.double()
        return (x.T @ x) / max(self.num_tokens, 1)

    def intermediate(self, e: int, w: ExpertWeights) -> torch.Tensor:
        """[N_e, m] float32 h = silu(W_g x) ⊙ (W_u x) of expert e on its tokens (input of down)."""
        x = self.inputs(e)
        return torch.nn.functional.silu(x @ w.get("gate", e).T) * (x @ w.get("up", e).T)

    def gram_mid(self, e: int, w: ExpertWeights) -> torch.Tensor:
        """[m, m] float64 Σ_t h_t h_tᵀ over e's tokens."""
        h = self.intermediate(e, w).double()
        return h.T @ h


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
