"""Exact parameter accounting shared by all methods.

Convention (docs/methods.md): ``ratio`` ρ is the fraction of routed-expert parameters removed. A layer keeps at most
⌊(1 − ρ)·3·E·n·m⌋ parameters; every stored float counts once (shared tensors once per layer), integer indices are
reported separately.
"""

from __future__ import annotations

import math

import torch

from .errors import RatioError


def check_ratio(ratio: float) -> None:
    if not (0.0 < ratio < 1.0) or math.isnan(ratio):
        raise RatioError(f"--ratio {ratio}: must be in (0, 1), the fraction of routed-expert parameters removed")


def layer_budget(ratio: float, num_experts: int, n: int, m: int) -> int:
    """Parameters one MoE layer may keep."""
    return math.floor((1.0 - ratio) * 3 * num_experts * n * m)


def top_up_ranks(base: int, total: int, gains: torch.Tensor) -> list[int]:
    """Give every factorization rank ``base`` and the ``total − base·k`` remaining ranks, one each, to the
    factorizations with the largest ``gains`` (e.g. σ²_{base+1}: the error removed by one more rank)."""
    k = gains.numel()
    extra = total - base * k
    assert 0 <= extra <= k, (base, total, k)
    ranks = [base] * k
    for i in torch.argsort(gains, descending=True)[:extra].tolist():
        ranks[i] += 1
    return ranks
