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


def distribute_units(total: int, weights: list[float], floor: list[int] | None = None,
                     cap: list[int] | None = None) -> list[int]:
    """Split ``total`` integer units proportionally to ``weights`` (largest remainder), respecting floor and cap.

    The result sums to ``total`` exactly when the caps allow it.
    """
    k = len(weights)
    floor = floor or [0] * k
    cap = cap or [total] * k
    out = list(floor)
    left = total - sum(out)
    active = [i for i in range(k) if out[i] < cap[i]]
    while left > 0 and active:
        wsum = sum(weights[i] for i in active) or float(len(active))
        share = {i: left * ((weights[i] if wsum else 1.0) / wsum) for i in active}
        given = 0
        for i in active:
            add = min(int(share[i]), cap[i] - out[i])
            out[i] += add
            given += add
        rem = left - given
        order = sorted(active, key=lambda i: share[i] - int(share[i]), reverse=True)
        for i in order:
            if rem == 0:
                break
            if out[i] < cap[i]:
                out[i] += 1
                rem -= 1
        left = total - sum(out)
        active = [i for i in active if out[i] < cap[i]]
        if given == 0 and rem == left:
            break
    return out


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
