"""Check a written moe_lowrank checkpoint against its quantization_config and count what it really stores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from vllm_moe_lowrank.format import FormatError, MoELowRankConfig

from .checkpoint import Checkpoint

_INT_TAGS = {"I64", "I32", "I16", "I8", "U8", "BOOL"}


@dataclass
class Counts:
    original: int  # routed-expert parameters of the uncompressed model
    kept: int  # floats stored for routed experts (compressed and dense layers)
    index_bytes: int  # integer index tensors of the experts

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.kept / self.original


def verify_checkpoint(folder: str | Path) -> tuple[MoELowRankConfig, Counts]:
    """Every tensor the format expects is present with its exact shape, and nothing else sits under the routed
    experts; returns the config and exact counts from the written tensors."""
    ckpt = Checkpoint(folder)
    cfg = MoELowRankConfig.from_hf_config(ckpt.config)
    expected = cfg.all_expert_tensor_specs()
    problems = []
    kept = index_bytes = 0
    for name, spec in expected.items():
        if name not in ckpt:
            problems.append(f"missing tensor {name!r} (shape {list(spec.shape)})")
            continue
        info = ckpt.info(name)
        if info.shape != spec.shape:
            problems.append(f"tensor {name!r} has shape {list(info.shape)}, the config says {list(spec.shape)}")
        if (info.dtype in _INT_TAGS) != (spec.dtype == "int32"):
            problems.append(f"tensor {name!r} has dtype {info.dtype}, the format wants {spec.dtype}")
        numel = math.prod(info.shape)
        if spec.is_param:
            kept += numel
        else:
            index_bytes += numel * 4
    prefixes = tuple(cfg.prefix(l) + "." for l in cfg.moe_layers)
    extra = [n for n in ckpt.tensors if n.startswith(prefixes) and n not in expected]
    problems += [f"unexpected tensor {n!r} under the routed experts" for n in extra[:5]]
    if problems:
        raise FormatError(f"{folder}: does not match its quantization_config: " + "; ".join(problems[:8]) +
                          (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    return cfg, Counts(original=cfg.original_expert_params(), kept=kept, index_bytes=index_bytes)
