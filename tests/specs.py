"""Layer specs exercising every term kind of the moe_lowrank format, for kernel and plugin tests.

``CASES[name](E, m, rng, r)`` returns a LayerSpec for E experts with m intermediate units (hidden size is free)
and ranks up to about r, ragged on purpose. Each case mirrors how a method uses the format (see format.py and
methods.md §6).
"""

from __future__ import annotations

import random

from vllm_moe_lowrank.format import (BaseTerm, DenseTerm, LayerSpec, LowRankTerm, ProjSpec, ResidualTerm,
                                     UnitSplit)


def _ranks(E: int, rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(E)]


def _grouped(E: int, G: int, rng: random.Random, lo: int, hi: int) -> tuple[list[int], list[int]]:
    """(group of each expert, rank of each expert = its group's rank)."""
    groups = [e % G for e in range(E)]
    gr = [rng.randint(lo, hi) for _ in range(G)]
    return groups, [gr[g] for g in groups]


def svd(E, m, rng, r=8):
    """Per-expert L·R on every projection (the svd baseline)."""
    return LayerSpec(method="svd", **{p: ProjSpec(lowrank=LowRankTerm(ranks=_ranks(E, rng, r * 3 // 4, r)))
                                      for p in ("gate", "up", "down")})


def moe_svd(E, m, rng, r=8):
    """Group-shared right factor + left slots everywhere; the first two experts of each group share a slot, so
    they are identical functions."""
    groups = [0 if e < E // 2 else 1 for e in range(E)]
    slots, nxt = [], 0
    for e in range(E):
        first_of_group = e in (0, E // 2)
        slots.append(nxt)
        nxt += 0 if first_of_group else 1
    projs = {}
    for p in ("gate", "up", "down"):
        gr = [rng.randint(r * 3 // 4, r), rng.randint(r * 3 // 4, r)]
        ranks = [gr[g] for g in groups]
        projs[p] = ProjSpec(lowrank=LowRankTerm(ranks=ranks, right_groups=groups, left_slots=slots))
    return LayerSpec(method="moe-svd", **projs)


def mobe(E, m, rng, r=8, act="silu"):
    """gate/up basis mix with a weight-space act and per-expert left factors; down dense."""
    lr = lambda: LowRankTerm(ranks=[r] * E, num_bases=3, act=act)  # noqa: E731
    return LayerSpec(method="mobe", gate=ProjSpec(lowrank=lr()), up=ProjSpec(lowrank=lr()),
                     down=ProjSpec(dense=DenseTerm()))


def mobe_identity(E, m, rng, r=8):
    """Basis mix with act=identity on gate/up (B_j·x shared per token) and tanh basis mix on down."""
    return LayerSpec(method="mobe", gate=ProjSpec(lowrank=LowRankTerm(ranks=[r - 1] * E, num_bases=4)),
                     up=ProjSpec(lowrank=LowRankTerm(ranks=[r] * E, num_bases=2)),
                     down=ProjSpec(lowrank=LowRankTerm(ranks=[r * 3 // 4] * E, num_bases=3, act="tanh")))


def rfid(E, m, rng, r=8):
    """gate/up: group-shared right factor with silu and ragged group ranks, plus the sparse residual."""
    G = max(2, E // 3)
    res_groups = [e % G for e in range(E)]
    projs = {}
    for p in ("gate", "up"):
        groups, ranks = _grouped(E, G, rng, r * 3 // 4, r)
        projs[p] = ProjSpec(lowrank=LowRankTerm(ranks=ranks, right_groups=groups, act="silu"),
                            residual=ResidualTerm(groups=res_groups, width=5))
    return LayerSpec(method="rfid-moe", down=ProjSpec(dense=DenseTerm()), **projs)


def rs_moe(E, m, rng, r=8):
    """RS-MoE: exact + low-rank units (some pruned), down base over the low-rank units."""
    exact = [rng.randint(0, m // 3) for _ in range(E)]
    lowrank = [rng.randint(m - x - max(1, m // 16), m - x) for x in exact]  # a few units pruned
    units = UnitSplit(exact=exact, lowrank=lowrank)
    gu = lambda: ProjSpec(dense=DenseTerm(units="exact"),  # noqa: E731
                          lowrank=LowRankTerm(units="lowrank", ranks=_ranks(E, rng, r * 3 // 4, r)))
    down = ProjSpec(dense=DenseTerm(units="exact"),
                    lowrank=LowRankTerm(units="lowrank", ranks=_ranks(E, rng, r * 3 // 4, r)),
                    base=BaseTerm(units="lowrank"))
    return LayerSpec(method="rs-moe", units=units, gate=gu(), up=gu(), down=down)


def mixed(E, m, rng, r=8):
    """Everything else: slots without groups, groups without slots, dense over all units plus a low-rank
    correction, the residual and group-shared right factor on down, a base over all units."""
    groups, granks = _grouped(E, 3, rng, r * 3 // 4, r)
    slots = [e // 2 for e in range(E)]
    sranks = [r - (e // 2) % 3 for e in range(E)]
    return LayerSpec(
        method="mixed",
        gate=ProjSpec(lowrank=LowRankTerm(ranks=sranks, left_slots=slots), residual=ResidualTerm(
            groups=[e % 2 for e in range(E)], width=4)),
        up=ProjSpec(dense=DenseTerm(), lowrank=LowRankTerm(ranks=_ranks(E, rng, r // 2, r), act="tanh")),
        down=ProjSpec(lowrank=LowRankTerm(ranks=granks, right_groups=groups),
                      residual=ResidualTerm(groups=[e % 3 for e in range(E)], width=6), base=BaseTerm(units="all")),
    )


CASES = {"svd": svd, "moe_svd": moe_svd, "mobe": mobe, "mobe_identity": mobe_identity, "rfid": rfid,
         "rs_moe": rs_moe, "mixed": mixed}
