"""Reading one layer's routed-expert weights from a checkpoint, per-expert or fused 3-D layout."""

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


def _fused_names(ckpt: Checkpoint, prefix: str) -> tuple[str, str] | None:
    for suffix in ("", ".weight"):
        gu, d = f"{prefix}.gate_up_proj{suffix}", f"{prefix}.down_proj{suffix}"
        if gu in ckpt and d in ckpt:
            return gu, d
    return None


def expert_tensor_names(ckpt: Checkpoint, arch: MoEArch, layer: int) -> list[str]:
    """Checkpoint names holding the routed experts of one layer (checked to be complete)."""
    prefix = arch.prefix(layer)
    fused = _fused_names(ckpt, prefix)
    if fused:
        return list(fused)
    names = [f"{prefix}.{e}.{getattr(arch.expert_names, p)}.weight"
             for e in range(arch.num_experts) for p in ("gate", "up", "down")]
    missing = [n for n in names if n not in ckpt]
    if missing:
        raise CheckpointError(f"{ckpt.path}: layer {layer} lacks {len(missing)} routed-expert tensor(s), e.g. "
                              f"{missing[0]!r}; the checkpoint is incomplete or not a {arch.model_type} checkpoint")
    return names


def load_expert_weights(ckpt: Checkpoint, arch: MoEArch, layer: int) -> ExpertWeights:
    names = expert_tensor_names(ckpt, arch, layer)
    E, n, m = arch.num_experts, arch.hidden_size, arch.intermediate_size
    if len(names) == 2:  # fused [E, 2m, n] + [E, n, m] (transformers) or transposed [E, n, 2m] + [E, m, n]
        gu, d = ckpt.get(names[0]), ckpt.get(names[1])
        if gu.shape == (E, n, 2 * m) and gu.shape != (E, 2 * m, n):
            gu, d = gu.transpose(1, 2), d.transpose(1, 2)
        if gu.shape != (E, 2 * m, n) or d.shape != (E, n, m):
            raise CheckpointError(f"{ckpt.path}: fused expert tensors {names} have shapes {list(gu.shape)}, "
                                  f"{list(d.shape)}; expected [{E}, {2 * m}, {n}] and [{E}, {n}, {m}]")
        return ExpertWeights(gate=gu[:, :m].contiguous(), up=gu[:, m:].contiguous(), down=d.contiguous())
    dtype = ckpt.info(names[0]).float_dtype or torch.float32
    out = ExpertWeights(gate=torch.empty(E, m, n, dtype=dtype), up=torch.empty(E, m, n, dtype=dtype),
                        down=torch.empty(E, n, m, dtype=dtype))
    for i, (name, w) in enumerate(ckpt.iter_tensors(names)):  # filled in place: no second copy of the layer
        e, p = divmod(i, 3)
        dst = out.proj(("gate", "up", "down")[p])[e]
        if w.shape != dst.shape:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} has shape {list(w.shape)}, expected "
                                  f"{list(dst.shape)} from config.json")
        dst.copy_(w)
    return out
