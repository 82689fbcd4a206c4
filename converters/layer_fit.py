"""One MoE layer's fit as it is written: the method's fit, the cast through the format (names, shapes, dtypes,
FP8 rounding with its refit) and the report entry with the weight and output errors of what is written.

``fit_layer`` is the one code path of the serial converter and of a Ray task (distributed.py); the streaming
pipeline (pipeline.py) also uses ``written_expert_fn`` to run a layer again on its experts as written
(``--propagate compressed``) and ``format_config`` for the output's ``quantization_config``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vllm_moe_lowrank.format import FACTOR_DTYPES, FORMAT_VERSION, PROJS, SCALE_SUFFIX, MoELowRankConfig
from vllm_moe_lowrank.materialize import materialize_projection

from .arch import MoEArch
from .calibration import LayerCalibration, dense_expert_fn, routed_output_change
from .checkpoint import Checkpoint
from .errors import ConvertError
from .experts import ExpertWeights
from .method import CompressedLayer, Method
from .quantize import dense_fp8_tensors, quantize_layer

_ERR_TOKENS = 4096  # calibration tokens used for the report's output error


def factor_dtype_name(out_dtype: torch.dtype) -> str:
    return next(k for k, v in FACTOR_DTYPES.items() if v == out_dtype)


def format_config(arch: MoEArch, method: str, ratio: float, layers: dict[int, Any],
                  achieved: float | None = None, linear_quantization: dict | None = None,
                  factor_dtype: str | None = None, dense_quantization=None) -> MoELowRankConfig:
    return MoELowRankConfig(
        format_version=FORMAT_VERSION, method=method, target_ratio=ratio, achieved_ratio=achieved,
        num_experts=arch.num_experts, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        moe_prefix=arch.moe_prefix, expert_names=arch.expert_names, moe_layers=list(arch.moe_layers), layers=layers,
        linear_quantization=linear_quantization, factor_dtype=factor_dtype, dense_quantization=dense_quantization)


def fit_layer(arch: MoEArch, method: Method, layer: int, weights: ExpertWeights, calib: LayerCalibration | None,
              out_dtype: torch.dtype, parts: list | None = None) -> dict[str, Any]:
    """Fit one MoE layer: {"spec": its format spec (JSON; None: kept dense), "tensors": what is written for its
    experts, "report": its report entry}. The one code path of the serial converter and of a Ray task (``parts``:
    the ``Method.fit_experts`` results of expert groups fitted as separate tasks)."""
    comp = (method.merge_experts(layer, weights, calib, parts) if parts
            else method.compress_layer(layer, weights, calib))
    report: dict[str, Any] = {"status": "dense"}
    if comp is None:
        return {"spec": None, "tensors": _dense_expert_tensors(arch, layer, weights), "report": report}
    tensors = cast_layer(arch, method.name, layer, comp, out_dtype, weights, calib)
    comp.tensors.clear()  # the cast copies are what gets written; free the method's originals
    params = sum(t.numel() for n, t in tensors.items()
                 if t.is_floating_point() and not n.endswith(SCALE_SUFFIX))  # FP8 scales: bytes only
    report = {"status": "compressed", **comp.info,
              "ranks": {p: comp.spec.proj(p).lowrank.ranks for p in PROJS if comp.spec.proj(p).lowrank},
              "params": params,
              "layer_ratio": 1 - params / (3 * arch.num_experts * arch.hidden_size * arch.intermediate_size),
              **_layer_errors(arch, method.name, layer, comp, tensors, weights, calib)}
    return {"spec": comp.spec.model_dump(mode="json"), "tensors": tensors, "report": report}


def cast_layer(arch: MoEArch, method: str, layer: int, comp: CompressedLayer, dtype: torch.dtype,
               weights: ExpertWeights | None = None, calib: LayerCalibration | None = None) -> dict[str, torch.Tensor]:
    """Name and cast a method's tensors through the format, checking each against the format's exact shape.
    FP8 (``dtype`` float8_e4m3fn): rounded with per-row scales by ``quantize.quantize_layer``, whose left-factor
    refit uses the layer's original ``weights`` and ``calib`` when given."""
    fp8 = dtype == torch.float8_e4m3fn
    cfg = format_config(arch, method, 0.5, {layer: comp.spec}, factor_dtype=factor_dtype_name(dtype) if fp8 else None)
    specs = {n: s for n, s in cfg.tensor_specs(layer).items() if s.scale_of is None}
    out = {}
    for (p, suffix, e), t in comp.tensors.items():
        name = cfg.tensor_name(layer, p, suffix, e)
        spec = specs.get(name)
        if spec is None:
            raise ConvertError(f"method {method} produced tensor {name!r} that its layer spec does not declare")
        if tuple(t.shape) != spec.shape:
            raise ConvertError(f"method {method} produced {name!r} with shape {list(t.shape)}; the format "
                               f"expects {list(spec.shape)}")
        target = {"float": dtype, "fp8": torch.float32, "float32": torch.float32, "int32": torch.int32}[spec.dtype]
        out[name] = t.detach().to("cpu", target).contiguous()
    missing = sorted(set(specs) - set(out))
    if missing:
        raise ConvertError(f"method {method} did not produce {len(missing)} tensor(s) of layer {layer}, e.g. "
                           f"{missing[0]!r}")
    if fp8:
        out, _ = quantize_layer(cfg, layer, out, weights, calib)
    return out


def _layer_errors(arch: MoEArch, method: str, layer: int, comp: CompressedLayer, tensors: dict[str, torch.Tensor],
                  weights: ExpertWeights, calib: LayerCalibration | None) -> dict[str, Any]:
    """Relative errors of what is written: per projection ‖W − Ŵ‖_F / ‖W‖_F over all experts, and the routed
    MoE output error on (up to 4096) calibration tokens.

    A units split (RS-MoE) stores each expert's units in its own compact order, which changes the expert's weights
    by a permutation but not its function; weight errors are then undefined (None) and the output error is the
    measure."""
    cfg = format_config(arch, method, 0.5, {layer: comp.spec})
    get = tensors.__getitem__
    out: dict[str, Any] = {"weight_rel_err": None}
    if comp.spec.units is None:
        num = {p: 0.0 for p in PROJS}
        den = {p: 0.0 for p in PROJS}
        for e in range(arch.num_experts):
            for p in PROJS:
                w = weights.get(p, e, torch.float64)
                num[p] += float((w - materialize_projection(cfg, layer, p, e, get)).square().sum())
                den[p] += float(w.square().sum())
        out["weight_rel_err"] = {p: math.sqrt(num[p] / den[p]) if den[p] else 0.0 for p in PROJS}
    if calib is not None:
        dy, y = routed_output_change(cfg, layer, get, weights, calib, _ERR_TOKENS)
        out["output_rel_err"] = float(dy.norm() / y.norm().clamp(min=1e-30))
    return out


def _dense_expert_tensors(arch: MoEArch, layer: int, weights: ExpertWeights) -> dict[str, torch.Tensor]:
    names = arch.expert_names
    return {f"{arch.prefix(layer)}.{e}.{getattr(names, p)}.weight": weights.proj(p)[e].contiguous()
            for e in range(arch.num_experts) for p in PROJS}


def dense_fp8(ckpt: Checkpoint, fit: dict[str, Any], dq) -> dict[str, Any]:
    """A layer the method left dense, in an FP8 conversion (``dq``: its format.DenseQuant, else None): its experts
    in FP8 with scales (quantize.dense_fp8_tensors: an FP8 source's own tensors copied). Idempotent."""
    if dq is None or fit["spec"] is not None or "requantized" in fit:
        return fit
    tensors, requantized = dense_fp8_tensors(ckpt, fit["tensors"], dq)
    return {**fit, "tensors": tensors, "requantized": requantized}


def written_expert_fn(arch: MoEArch, method: str, layer: int, spec, tensors: dict[str, torch.Tensor], dq=None):
    """expert_fn of the compressed experts exactly as written (after the cast), materialized once per layer
    (``spec``: the layer's spec, or the CompressedLayer holding it; None: a dense layer's FP8 experts, ``dq``)."""
    cfg = (format_config(arch, method, 0.5, {}, factor_dtype="fp8_e4m3", dense_quantization=dq) if spec is None
           else format_config(arch, method, 0.5, {layer: getattr(spec, "spec", spec)}))
    stack = {p: torch.stack([materialize_projection(cfg, layer, p, e, tensors.__getitem__).float()
                             for e in range(arch.num_experts)]) for p in PROJS}  # [E, out, in] float32
    return dense_expert_fn(stack["gate"], stack["up"], stack["down"])
