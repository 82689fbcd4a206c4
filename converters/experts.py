"""Reading one layer's routed-expert weights from a checkpoint, per-expert or fused 3-D layout.

Fused layouts: transformers ≥ 5's ``experts.gate_up_proj`` [E, 2m, n] + ``experts.down_proj`` [E, n, m] (or both
transposed), and a family's own fused tensors (``arch.fused_names``, e.g. Granite-MoE's ``input_linear`` /
``output_linear``), split into per-expert gate / up / down on read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import MoEArch
from .checkpoint import Checkpoint
from .errors import CheckpointError


@dataclass
class ExpertWeights:
    """One MoE layer's routed experts in HF layout, in the checkpoint's dtype."""

    gate: torch.Tensor  # [E, m, n]
    up: torch.Tensor  # [E, m, n]
    down: torch.Tensor  # [E, n, m]

    def proj(self, p: str) -> torch.Tensor:
        return getattr(self, p)

    def get(self, p: str, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.proj(p)[e].to(dtype)


def _fused_names(ckpt: Checkpoint, arch: MoEArch, layer: int) -> tuple[str, str] | None:
    prefix = arch.prefix(layer)
    candidates = [(f"{prefix}.gate_up_proj{s}", f"{prefix}.down_proj{s}") for s in ("", ".weight")]
    if arch.fused_names:
        candidates.insert(0, tuple(n.format(layer=layer) for n in arch.fused_names))
    return next(((gu, d) for gu, d in candidates if gu in ckpt and d in ckpt), None)


def expert_tensor_names(ckpt: Checkpoint, arch: MoEArch, layer: int) -> list[str]:
    """Checkpoint names holding the routed experts of one layer: the weights, then the FP8 scales of an FP8
    checkpoint (what the compressed layer replaces)."""
    weights = expert_weight_names(ckpt, arch, layer)
    return weights + [c for n in weights for c in ckpt.companions(n)]


def expert_weight_names(ckpt: Checkpoint, arch: MoEArch, layer: int) -> list[str]:
    """Checkpoint names of the routed-expert weights of one layer (checked to be complete)."""
    prefix = arch.prefix(layer)
    fused = _fused_names(ckpt, arch, layer)
    if fused:
        return list(fused)
    names = [f"{prefix}.{e}.{getattr(arch.expert_names, p)}.weight"
             for e in range(arch.num_experts) for p in ("gate", "up", "down")]
    missing = [n for n in names if n not in ckpt]
    if missing:
        raise CheckpointError(f"{ckpt.path}: layer {layer} lacks {len(missing)} routed-expert tensor(s), e.g. "
                              f"{missing[0]!r} (config.json: {arch.num_experts} experts); the checkpoint is "
                              f"incomplete or not a {arch.model_type} checkpoint")
    extra = sorted({int(e) for t in ckpt.tensors if t.startswith(prefix + ".")
                    and (e := t[len(prefix) + 1:].split(".", 1)[0]).isdigit() and int(e) >= arch.num_experts})
    if extra:
        raise CheckpointError(f"{ckpt.path}: layer {layer} has weights for expert {extra[-1]} but config.json says "
                              f"{arch.num_experts} experts; config.json and the weights disagree")
    return names


def load_expert_weights(ckpt: Checkpoint, arch: MoEArch, layer: int) -> ExpertWeights:
    """Read one layer's routed experts; FP8 weights are dequantized tensor by tensor (Checkpoint.dequant_dtype)."""
    names = expert_weight_names(ckpt, arch, layer)
    E, n, m = arch.num_experts, arch.hidden_size, arch.intermediate_size
    if len(names) == 2:  # fused [E, 2m, n] + [E, n, m] (transformers) or transposed [E, n, 2m] + [E, m, n]
        gu, d = (ckpt.get_dequantized([nm])[nm] for nm in names)
        if gu.shape == (E, n, 2 * m) and gu.shape != (E, 2 * m, n):
            gu, d = gu.transpose(1, 2), d.transpose(1, 2)
        if gu.shape != (E, 2 * m, n) or d.shape != (E, n, m):
            raise CheckpointError(f"{ckpt.path}: fused expert tensors {names} have shapes {list(gu.shape)}, "
                                  f"{list(d.shape)}; expected [{E}, {2 * m}, {n}] and [{E}, {n}, {m}]")
        _check_finite(ckpt, names[0], gu)
        _check_finite(ckpt, names[1], d)
        return ExpertWeights(gate=gu[:, :m].contiguous(), up=gu[:, m:].contiguous(), down=d.contiguous())
    dtype = ckpt.dequant_dtype if ckpt.is_fp8(names[0]) else ckpt.info(names[0]).float_dtype or torch.float32
    out = ExpertWeights(gate=torch.empty(E, m, n, dtype=dtype), up=torch.empty(E, m, n, dtype=dtype),
                        down=torch.empty(E, n, m, dtype=dtype))
    for i, (name, w) in enumerate(ckpt.iter_dequantized(names, dtype)):  # in place: no second copy of the layer
        e, p = divmod(i, 3)
        dst = out.proj(("gate", "up", "down")[p])[e]
        if w.shape != dst.shape:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(w.shape)}, expected "
                                  f"{list(dst.shape)} from config.json")
        _check_finite(ckpt, name, w)
        dst.copy_(w)
    return out


def _check_finite(ckpt: Checkpoint, name: str, w: torch.Tensor) -> None:
    """NaN/Inf weights would only surface later as a failed Cholesky or SVD; name the tensor (and, for a fused
    [E, ...] tensor, the expert) before any fitting."""
    bad = ~torch.isfinite(w)
    if bad.any():
        where = f" (expert {int(bad.flatten(1).any(1).nonzero()[0])})" if w.dim() == 3 else ""
        raise CheckpointError(f"{ckpt.path}: tensor {name!r}{where} has {int(bad.sum()):,} NaN/Inf value(s); the "
                              "checkpoint is corrupt: re-download or re-export it")


def source_layout(arch: MoEArch, layer: int, weights: ExpertWeights) -> dict[str, torch.Tensor]:
    """One layer's experts named and shaped as the family's own checkpoints store them (what transformers loads):
    its fused tensors where it has them (Granite-MoE), else one tensor per expert and projection."""
    if arch.fused_names:
        gate_up, down = (n.format(layer=layer) for n in arch.fused_names)
        return {gate_up: torch.cat([weights.gate, weights.up], dim=1).contiguous(), down: weights.down.contiguous()}
    names = arch.expert_names
    return {f"{arch.prefix(layer)}.{e}.{getattr(names, p)}.weight": weights.proj(p)[e].contiguous()
            for e in range(arch.num_experts) for p in ("gate", "up", "down")}
