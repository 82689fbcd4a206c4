"""FP8 scale granularity, measured: the error of rounding a converted checkpoint's float tensors to e4m3.

    python benchmarks/fp8_granularity.py CKPT [CKPT ...]     # checkpoints converted with --factor-dtype float32

For each scale granularity (one scale per tensor, per 128×128 block, per column, per row, per rank component =
the format's choice: columns of lr_u, rows of everything else) every float tensor of every compressed layer is
rounded to float8_e4m3fn and back; printed: the relative Frobenius error of the tensors and of the materialized
expert weights (format.materialize_projection), mean over layers. docs/format.md quotes the result.
"""

from __future__ import annotations

import math
import sys

import torch

from vllm_moe_lowrank.converters.checkpoint import Checkpoint
from vllm_moe_lowrank.format import FP8_MAX, PROJS, MoELowRankConfig, materialize_projection, scale_axis


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


SCHEMES = {"tensor": lambda w, sfx: per_axis(w, None), "block128": lambda w, sfx: per_block(w),
           "column": lambda w, sfx: per_axis(w, 1), "rank (format)": lambda w, sfx: per_axis(w, scale_axis(sfx)),
           "row": lambda w, sfx: per_axis(w, 0)}


def measure(folder: str) -> dict[str, float]:
    ck = Checkpoint(folder)
    cfg = MoELowRankConfig.from_hf_config(ck.config)
    sums = {k: 0.0 for k in SCHEMES}
    for layer in cfg.layers:
        specs = cfg.tensor_specs(layer)
        t = ck.get_many(specs)
        for k, fn in SCHEMES.items():
            q = {n: fn(v, specs[n].suffix) if specs[n].dtype == "float" and v.dim() == 2 and v.numel() else v
                 for n, v in t.items()}
            num = den = 0.0
            for e in range(cfg.num_experts):
                for p in PROJS:
                    a = materialize_projection(cfg, layer, p, e, t.__getitem__)
                    num += float((a - materialize_projection(cfg, layer, p, e, q.__getitem__)).square().sum())
                    den += float(a.square().sum())
            sums[k] += math.sqrt(num / den) / len(cfg.layers)
    return sums


def main() -> None:
    print("| checkpoint | " + " | ".join(SCHEMES) + " |")
    print("|---" * (len(SCHEMES) + 1) + "|")
    for folder in sys.argv[1:]:
        r = measure(folder)
        print(f"| {folder} | " + " | ".join(f"{r[k]:.4f}" for k in SCHEMES) + " |")


if __name__ == "__main__":
    main()
