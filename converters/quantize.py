"""FP8 factors for every method: round every float tensor of a compressed layer to float8_e4m3fn with float32
scales along the format's axis (``rounding.quantize_rows``), quantization-aware where that is cheap.

Order (quantize one factor, refit the other in closed form — the GPTQ/SVD-LLM-style correction, applied per
expert):

1. every float tensor that is not an expert's own left factor is rounded as it is (scales per rank component
   for the factors, per unit for down's weight, per row otherwise: ``format.scale_axis``): right factors (per
   expert, per group, MoBE bases), shared left slots, dense / kept-unit weights, residual ``res_eta``, the RS-MoE
   ``base``;
2. projection by projection (gate, up, then down), each expert's left factor L_e [out, r] is refit against the
   quantized right factor R̂_e = act(R_q) under the same whitened objective the methods minimise,

       min_L ‖(T_e − L R̂_e) S‖_F,  G = S Sᵀ   →   L = T_e G R̂ᵀ (R̂ G R̂ᵀ)⁻¹,

   where T_e is what the low-rank term has to supply: the original weight minus the projection's other (already
   quantized) terms, and G the calibration Gram from ``calibration.py`` (gate/up: ``expert_gram_in``; down:
   ``down_target`` on the intermediates of the quantized gate/up, whose target W* replaces W). Then L_e is
   rounded. With a units split (RS-MoE: experts store their units in a compact order the original weight does not
   have) gate/up refit against the unquantized term L₀R₀ instead of W, and down's left factor is only rounded.
   Without calibration G = I (plain least squares).

MoE layers a method leaves dense are written in FP8 too (``dense_fp8_tensors``), in vLLM's fp8 layout
(``format.DenseQuant``): an FP8 source's expert tensors and scales copied byte for byte, a float source's weights
quantized in 128×128 blocks.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_moe_lowrank.format import DENSE_FP8, PROJS, DenseQuant, MoELowRankConfig
from vllm_moe_lowrank.materialize import materialize_projection, right_factor
from vllm_moe_lowrank.rounding import quantize_blocks, quantize_rows

from .calibration import LayerCalibration
from .checkpoint import INPUT_SCALE, Checkpoint, SourceQuant
from .errors import CheckpointError
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
        q, s = quantize_rows(t, specs[name].scale_axis)
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


# ----- MoE layers a method leaves dense --------------------------------------------------------------------------
def dense_quant(source: SourceQuant | None) -> DenseQuant:
    """FP8 layout of the dense-kept experts in an FP8 conversion: an FP8 source's own (its tensors are copied),
    else 128×128 blocks (format.DENSE_FP8, what published FP8 MoE checkpoints use and vLLM's FP8 MoE method serves;
    docs/format.md, "Dense-kept MoE layers")."""
    if source is None:
        return DENSE_FP8
    return DenseQuant(activation_scheme=source.activation_scheme, weight_block_size=source.weight_block_size)


def dense_fp8_tensors(ckpt: Checkpoint, dense: dict[str, torch.Tensor],
                      dq: DenseQuant) -> tuple[dict[str, torch.Tensor], bool]:
    """The experts of a layer left dense, as ``format.dense_tensor_specs`` with ``dense_quantization`` = dq, from
    ``dense``: the layer's float expert weights by their format names (``<moe_prefix>.<e>.<proj>.weight``).

    A weight the source stores in FP8 under the same name is copied byte for byte with its scale (and input scale);
    any other one is quantized from its float weight with dq's blocks. Returns (tensors, whether any weight was
    quantized here, i.e. differs from what the source computes)."""
    out: dict[str, torch.Tensor] = {}
    requantized = False
    for name, w in dense.items():
        stem = name.removesuffix("weight")
        if name in ckpt and ckpt.is_fp8(name):
            src = ckpt.get_many([name, ckpt.scale_name(name)])
            out[name] = src[name]
            out[stem + dq.scale_suffix] = src[ckpt.scale_name(name)].float().reshape(
                dq.scale_shape(tuple(src[name].shape)))  # float32 already in published checkpoints: same bytes
        else:
            out[name], out[stem + dq.scale_suffix] = quantize_blocks(w, dq.weight_block_size)
            requantized = True
        if dq.activation_scheme == "static":
            if stem + INPUT_SCALE not in ckpt:
                raise CheckpointError(f"{ckpt.path}: {name!r} has no {INPUT_SCALE!r}, which static activation "
                                      "quantization (activation_scheme 'static' in config.json) needs")
            out[stem + INPUT_SCALE] = ckpt.get(stem + INPUT_SCALE).float().reshape(())
    return out, requantized
