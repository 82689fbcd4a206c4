"""FP8 factors for every method: round every float tensor of a compressed layer to float8_e4m3fn with per-row
float32 scales (``format.quantize_rows``), quantization-aware where that is cheap.

Order (quantize one factor, refit the other in closed form — the GPTQ/SVD-LLM-style correction, applied per
expert):

1. every float tensor that is not an expert's own left factor is rounded as it is (scales per rank component
   for the factors, per row otherwise: ``format.scale_axis``): right factors (per expert, per
   group, MoBE bases), shared left slots, dense / kept-unit weights, residual ``res_eta``, the RS-MoE ``base``;
2. projection by projection (gate, up, then down), each expert's left factor L_e [out, r] is refit against the
   quantized right factor R̂_e = act(R_q) under the same whitened objective the methods minimise,

       min_L ‖(T_e − L R̂_e) S‖_F,  G = S Sᵀ   →   L = T_e G R̂ᵀ (R̂ G R̂ᵀ)⁻¹,

   where T_e is what the low-rank term has to supply: the original weight minus the projection's other (already
   quantized) terms, and G the calibration Gram from ``calibration.py`` (gate/up: ``expert_gram_in``; down:
   ``down_target`` on the intermediates of the quantized gate/up, whose target W* replaces W). Then L_e is
   rounded. With a units split (RS-MoE: experts store their units in a compact order the original weight does not
   have) gate/up refit against the unquantized term L₀R₀ instead of W, and down's left factor is only rounded.
   Without calibration G = I (plain least squares).
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_moe_lowrank.format import (PROJS, MoELowRankConfig, materialize_projection, quantize_rows,
                                     right_factor, scale_axis)

from .calibration import LayerCalibration
from .experts import ExpertWeights
from .whitening import solve_spd


def _refit_left(T: torch.Tensor, R: torch.Tensor, G: torch.Tensor | None) -> torch.Tensor:
    """argmin_L ‖(T − L R) S‖_F with G = S Sᵀ (None: identity): L = T G Rᵀ (R G Rᵀ)⁻¹; float64 [out, r]."""
    RG = R if G is None else R @ G  # [r, in]
    M = RG @ R.T  # [r, r]
    M = M + 1e-10 * torch.trace(M).clamp(min=1e-30) / max(M.shape[0], 1) * torch.eye(M.shape[0], dtype=M.dtype)
    return solve_spd(M, T @ RG.T)


def quantize_layer(cfg: MoELowRankConfig, layer: int, tensors: dict[str, torch.Tensor],
                   weights: ExpertWeights | None, calib: LayerCalibration | None,
                   refit: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The layer's tensors as written with ``cfg.factor_dtype == "fp8_e4m3"``: FP8 data + float32 ``*_scale``,
    float32 / int32 tensors unchanged. ``tensors``: the method's tensors by checkpoint name (float, unquantized).
    Returns (tensors, info) with info["fp8_refit"] = number of left factors refit."""
    assert cfg.quantized, "quantize_layer needs a config with factor_dtype fp8_e4m3"
    specs = cfg.tensor_specs(layer)
    spec = cfg.layers[layer]
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}  # per-expert left factors, refit after their right factors are rounded

    def put(name: str, t: torch.Tensor) -> None:
        q, s = quantize_rows(t, scale_axis(specs[name].suffix))
        out[name], out[specs[name].scale] = q, s

    for name, ts in specs.items():
        if ts.scale_of is not None:
            continue
        t = tensors[name]
        if ts.dtype == "fp8":
            lr = spec.proj(ts.proj).lowrank
            if refit and ts.suffix == "lr_u" and ts.expert is not None and lr is not None and lr.ranks[ts.expert]:
                pending[name] = t
            else:
                put(name, t)
        else:
            out[name] = t.to(ts.torch_dtype).contiguous()

    def get(name: str) -> torch.Tensor:
        return pending[name].double() if name in pending else out[name]

    refits = 0
    for p in PROJS:
        for e in range(cfg.num_experts):
            name = cfg.tensor_name(layer, p, "lr_u", e)
            if name not in pending:
                continue
            L0 = pending[name].double()  # [out, r]
            R_hat = right_factor(cfg, layer, p, e, get)  # [r, in], quantized, act applied
            T = G = None
            if spec.units is None and weights is not None:
                others = materialize_projection(cfg, layer, p, e, get) - L0 @ R_hat  # [out, in]
                W = weights.get(p, e, torch.float64)
                if calib is not None and p == "down":
                    gate, up = (materialize_projection(cfg, layer, q, e, get) for q in ("gate", "up"))  # rounded
                    W, G = calib.down_target(e, weights, gate, up)
                elif calib is not None:
                    G = calib.expert_gram_in(e)
                T = W - others
            elif p != "down":  # units split: match the unquantized term (compact unit order)
                T = L0 @ right_factor(cfg, layer, p, e, tensors.__getitem__)
                G = calib.expert_gram_in(e) if calib is not None else None
            if T is not None:
                pending[name] = _refit_left(T, R_hat, G)
                refits += 1
            put(name, pending.pop(name))
    for name, t in pending.items():
        put(name, t)
    return out, {"fp8_refit": refits}
