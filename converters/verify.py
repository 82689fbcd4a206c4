"""Check a written moe_lowrank checkpoint against its quantization_config and count what it really stores."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from vllm_moe_lowrank.format import FormatError, MoELowRankConfig

from .checkpoint import _DTYPE_BYTES, Checkpoint

_INT_TAGS = {"I64", "I32", "I16", "I8", "U8", "BOOL"}
_SPEC_TAGS = {"fp8": {"F8_E4M3"}, "float32": {"F32"}, "int32": {"I32"}}  # "float": any float tag but FP8


@dataclass
class Counts:
    original: int  # routed-expert parameters of the uncompressed model
    kept: int  # floats stored for routed experts (compressed and dense layers)
    index_bytes: int  # integer index tensors of the experts
    expert_bytes: int = 0  # every routed-expert tensor as written: factors, FP8 scales, indices, dense layers
    total_bytes: int = 0  # every tensor of the checkpoint (what a server loads)

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.kept / self.original


def tensor_bytes(ckpt: Checkpoint, names) -> int:
    """Stored bytes of the named tensors, from the safetensors headers."""
    return sum(math.prod(ckpt.info(n).shape) * _DTYPE_BYTES.get(ckpt.info(n).dtype, 0) for n in names)


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
        want = _SPEC_TAGS.get(spec.dtype)
        if (info.dtype not in want) if want else (info.dtype in _INT_TAGS or info.dtype == "F8_E4M3"):
            problems.append(f"tensor {name!r} has dtype {info.dtype}, the format wants {spec.dtype}")
        numel = math.prod(info.shape)
        if spec.is_param:
            kept += numel
        else:
            index_bytes += numel * 4
    prefixes = tuple(cfg.prefix(l) + "." for l in cfg.moe_layers)
    extra = [n for n in ckpt.tensors if n.startswith(prefixes) and n not in expected]
    problems += [f"unexpected tensor {n!r} under the routed experts" for n in extra[:5]]
    under = re.compile(re.escape(cfg.moe_prefix).replace(re.escape("{layer}"), r"(\d+)") + r"\.")
    unlisted: dict[int, str] = {}  # a layer with expert tensors that moe_layers omits -> one of its tensors
    for n in ckpt.tensors:
        if (m := under.match(n)) and int(m.group(1)) not in cfg.moe_layers:
            unlisted.setdefault(int(m.group(1)), n)
    problems += [f"layer {layer} has routed-expert tensors (e.g. {n!r}) but quantization_config.moe_layers does "
                 "not list it" for layer, n in sorted(unlisted.items())[:3]]
    if problems:
        raise FormatError(f"{folder}: does not match its quantization_config: " + "; ".join(problems[:8]) +
                          (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    return cfg, Counts(original=cfg.original_expert_params(), kept=kept, index_bytes=index_bytes,
                       expert_bytes=tensor_bytes(ckpt, expected), total_bytes=tensor_bytes(ckpt, ckpt.tensors))


def source_bytes(ckpt: Checkpoint, expert_names: list[str]) -> tuple[int, int]:
    """(routed-expert bytes, whole-checkpoint bytes) of a source checkpoint; ``expert_names``: its expert tensors
    (with an FP8 source's scales)."""
    return tensor_bytes(ckpt, expert_names), tensor_bytes(ckpt, ckpt.tensors)


def bytes_summary(expert_params: int, source_experts: int, source_total: int, experts: int,
                  total: int) -> dict[str, int | float]:
    """The report's byte accounting: source vs written, experts and whole checkpoint, with ratios."""
    return {"source_expert_bytes": source_experts, "expert_bytes": experts,
            "expert_bytes_ratio": round(experts / max(source_experts, 1), 6),
            "expert_bytes_vs_bf16": round(experts / max(2 * expert_params, 1), 6),
            "source_checkpoint_bytes": source_total, "checkpoint_bytes": total,
            "checkpoint_bytes_ratio": round(total / max(source_total, 1), 6)}
