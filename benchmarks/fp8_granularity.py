"""FP8 scale granularity, measured: the error of rounding a converted checkpoint's float tensors to e4m3.

    python benchmarks/fp8_granularity.py CKPT [CKPT ...]     # checkpoints converted with --factor-dtype float32

For each scale granularity (one scale per tensor, per 128×128 block, per column, per row, the format's choice:
``format.scale_axis`` of version 3 — per rank component for the factors, per bucket for res_eta, per unit for
down's weight, per row otherwise — and of version 2, where down's weight was per row) every float tensor of every
compressed layer is rounded to float8_e4m3fn and back; printed: the relative Frobenius error of the materialized
expert weights (materialize.materialize_projection), mean over layers, of all projections and of down alone.
docs/format.md quotes the result.
"""

from __future__ import annotations

import math
import sys

import torch

from vllm_moe_lowrank.converters.checkpoint import Checkpoint
from vllm_moe_lowrank.format import FP8_MAX, PROJS, MoELowRankConfig, scale_axis
from vllm_moe_lowrank.materialize import materialize_projection


def _round(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (w / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double() * s


def per_axis(w: torch.Tensor, axis: int | None) -> torch.Tensor:
    w = w.double()
    if axis is None:
        return _round(w, w.abs().max().clamp(min=1e-30) / FP8_MAX)
    return _round(w, w.abs().amax(dim=1 - axis, keepdim=True).clamp(min=1e-30) / FP8_MAX)


def per_block(w: torch.Tensor, b: int = 128) -> torch.Tensor:
    w, out = w.double(), torch.empty(w.shape, dtype=torch.float64)
    for i in range(0, w.shape[0], b):
        for j in range(0, w.shape[1], b):
            blk = w[i:i + b, j:j + b]
            out[i:i + b, j:j + b] = _round(blk, blk.abs().max().clamp(min=1e-30) / FP8_MAX)
    return out


SCHEMES = {"tensor": lambda w, s: per_axis(w, None), "block128": lambda w, s: per_block(w),
           "column": lambda w, s: per_axis(w, 1), "row": lambda w, s: per_axis(w, 0),
           "format v2": lambda w, s: per_axis(w, scale_axis(s.proj, s.suffix, 2)),
           "format v3": lambda w, s: per_axis(w, scale_axis(s.proj, s.suffix, 3))}


def measure(folder: str) -> dict[tuple[str, str], float]:
    """{(scheme, "all" | "down"): relative error of the materialized experts, mean over layers}."""
    ck = Checkpoint(folder)
    cfg = MoELowRankConfig.from_hf_config(ck.config)
    sums = {(k, w): 0.0 for k in SCHEMES for w in ("all", "down")}
    for layer in cfg.layers:
        specs = cfg.tensor_specs(layer)
        t = ck.get_many(specs)
        for k, fn in SCHEMES.items():
            q = {n: fn(v, specs[n]) if specs[n].dtype == "float" and v.dim() == 2 and v.numel() else v
                 for n, v in t.items()}
            num, den = dict.fromkeys(PROJS, 0.0), dict.fromkeys(PROJS, 0.0)
            for e in range(cfg.num_experts):
                for p in PROJS:
                    a = materialize_projection(cfg, layer, p, e, t.__getitem__)
                    num[p] += float((a - materialize_projection(cfg, layer, p, e, q.__getitem__)).square().sum())
                    den[p] += float(a.square().sum())
            sums[k, "all"] += math.sqrt(sum(num.values()) / sum(den.values())) / len(cfg.layers)
            sums[k, "down"] += math.sqrt(num["down"] / den["down"]) / len(cfg.layers)
    return sums


def main() -> None:
    print("| checkpoint | experts | " + " | ".join(SCHEMES) + " |")
    print("|---" * (len(SCHEMES) + 2) + "|")
    for folder in sys.argv[1:]:
        r = measure(folder)
        for w in ("all", "down"):
            print(f"| {folder} | {w} | " + " | ".join(f"{r[k, w]:.4f}" for k in SCHEMES) + " |")


if __name__ == "__main__":
    main()
