"""On-device (token, expert) → function sorting, block-aligned like vLLM's ``moe_align_block_size``; no host sync.

Pair p = t·K + k (token t, k-th routed expert) maps to its local expert function f = func_of_expert[topk_ids[p]]
(−1: the expert is on another EP rank; such pairs are dropped). Pairs are grouped by function, and each function's
segment is padded to a multiple of BM rows, so every block of BM sorted rows belongs to exactly one function:

* ``sorted_pair [NB·BM]``: the pair id at each sorted position (padding positions are never read);
* ``pos_of_pair [P]``: the sorted position of each pair (−1: dropped) — the inverse permutation, used to gather
  each token's K outputs back in a fixed order (deterministic, no atomics on outputs);
* ``block_func [NB]`` / ``block_rows [NB]``: each block's function (−1: unused) and its number of valid rows.

NB = cdiv(P + min(F, P)·(BM−1), BM) depends only on shapes (static: CUDA-graph safe); unused blocks exit at once.
Positions inside a function's segment follow pair order in the one-program kernel and tile order (atomics) in the
parallel one; nothing downstream depends on that order (each row's result is independent of its block-mates and
outputs are gathered per pair).

Two implementations: one program for P ≤ SMALL_SORT_PAIRS (decode: one launch), and count → blocks → scatter
(three launches, parallel over tiles of pairs) above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SMALL_SORT_PAIRS = 512
_BLK = 64  # pairs per tile (the in-tile rank is a [BLK, BLK] comparison)
_BLKB = 128  # blocks per tile when writing the block tables


@dataclass
class Sorted:
    sorted_pair: torch.Tensor  # [NB*BM] int32
    pos_of_pair: torch.Tensor  # [P] int32
    block_func: torch.Tensor  # [NB] int32
    block_rows: torch.Tensor  # [NB] int32
    num_blocks: int  # NB (static)
    bm: int


def num_blocks(P: int, F: int, bm: int) -> int:
    return triton.cdiv(P + min(F, P) * (bm - 1), bm)


@triton.jit
def _func_tile(TOPK, FOE, p, P):
    """Function id of pairs p (−1 beyond P or off-rank)."""
    ok = p < P
    e = tl.load(TOPK + p, mask=ok, other=0)
    f = tl.load(FOE + e, mask=ok, other=-1).to(tl.int32)
    return tl.where(ok, f, -1)


@triton.jit
def _rank_in_tile(f, BLK: tl.constexpr):
    """For each pair of the tile: how many earlier pairs of the tile have the same function."""
    i = tl.arange(0, BLK)
    same = (f[:, None] == f[None, :]) & (i[None, :] < i[:, None])
    return tl.sum(same.to(tl.int32), axis=1)


@triton.jit
def _pick(vec, idx, fr):
    """vec[idx] for a small vector ``vec`` over ``fr`` (a one-hot gather; idx out of range gives 0)."""
    return tl.sum(tl.where(fr[None, :] == idx[:, None], vec[None, :], 0), axis=1)


@triton.jit
def _block_tables(counts, fr, F, NB, BLOCK_FUNC, BLOCK_ROWS, BM: tl.constexpr, BLKB: tl.constexpr):
    """Write block_func / block_rows from the per-function counts; return each function's first sorted row."""
    nblk = tl.where(fr < F, (counts + BM - 1) // BM, 0)
    bend = tl.cumsum(nblk, axis=0)  # exclusive end block of each function
    bstart = bend - nblk
    for b0 in range(0, NB, BLKB):
        b = b0 + tl.arange(0, BLKB)
        fb = tl.sum((bend[None, :] <= b[:, None]).to(tl.int32), axis=1)  # function of block b (F: unused)
        used = fb < F
        rows = _pick(counts, fb, fr) - (b - _pick(bstart, fb, fr)) * BM
        rows = tl.minimum(tl.maximum(rows, 0), BM)
        tl.store(BLOCK_FUNC + b, tl.where(used, fb, -1), mask=b < NB)
        tl.store(BLOCK_ROWS + b, tl.where(used, rows, 0), mask=b < NB)
    return bstart * BM


@triton.jit
def _align_one_kernel(TOPK, FOE, P, F, NB, SORTED, POS, BLOCK_FUNC, BLOCK_ROWS,
                      BM: tl.constexpr, BLK: tl.constexpr, FP: tl.constexpr, BLKB: tl.constexpr):
    """Everything in one program (small P): count, block tables, scatter in pair order."""
    fr = tl.arange(0, FP)
    counts = tl.zeros([FP], dtype=tl.int32)
    for p0 in range(0, P, BLK):
        f = _func_tile(TOPK, FOE, p0 + tl.arange(0, BLK), P)
        counts += tl.sum((f[:, None] == fr[None, :]).to(tl.int32), axis=0)
    start = _block_tables(counts, fr, F, NB, BLOCK_FUNC, BLOCK_ROWS, BM, BLKB)
    seen = tl.zeros([FP], dtype=tl.int32)
    for p0 in range(0, P, BLK):
        p = p0 + tl.arange(0, BLK)
        f = _func_tile(TOPK, FOE, p, P)
        pos = _pick(start + seen, f, fr) + _rank_in_tile(f, BLK)
        keep = f >= 0
        tl.store(SORTED + pos, p, mask=keep)
        tl.store(POS + p, tl.where(keep, pos, -1), mask=p < P)
        seen += tl.sum((f[:, None] == fr[None, :]).to(tl.int32), axis=0)


@triton.jit
def _align_count_kernel(TOPK, FOE, P, CNT, TILE_BASE, BLK: tl.constexpr, FP: tl.constexpr):
    """Per tile: count its pairs per function into CNT; the returned old values are the tile's base offsets."""
    pid = tl.program_id(0)
    fr = tl.arange(0, FP)
    f = _func_tile(TOPK, FOE, pid * BLK + tl.arange(0, BLK), P)
    local = tl.sum((f[:, None] == fr[None, :]).to(tl.int32), axis=0)
    old = tl.atomic_add(CNT + fr, local, mask=local > 0)
    tl.store(TILE_BASE + pid * FP + fr, tl.where(local > 0, old, 0))


@triton.jit
def _align_blocks_kernel(CNT, F, NB, START, BLOCK_FUNC, BLOCK_ROWS, BM: tl.constexpr, FP: tl.constexpr,
                         BLKB: tl.constexpr):
    fr = tl.arange(0, FP)
    counts = tl.load(CNT + fr, mask=fr < F, other=0)
    start = _block_tables(counts, fr, F, NB, BLOCK_FUNC, BLOCK_ROWS, BM, BLKB)
    tl.store(START + fr, start)


@triton.jit
def _align_scatter_kernel(TOPK, FOE, P, START, TILE_BASE, SORTED, POS, BLK: tl.constexpr, FP: tl.constexpr):
    pid = tl.program_id(0)
    fr = tl.arange(0, FP)
    p = pid * BLK + tl.arange(0, BLK)
    f = _func_tile(TOPK, FOE, p, P)
    base = tl.load(START + fr) + tl.load(TILE_BASE + pid * FP + fr)
    pos = _pick(base, f, fr) + _rank_in_tile(f, BLK)
    keep = f >= 0
    tl.store(SORTED + pos, p, mask=keep)
    tl.store(POS + p, tl.where(keep, pos, -1), mask=p < P)


def align_pairs(topk_ids: torch.Tensor, func_of_expert: torch.Tensor, num_funcs: int, bm: int,
                parallel: bool | None = None) -> Sorted:
    """Sort the T·K (token, expert) pairs by function into BM-aligned blocks (see the module docstring)."""
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    P, F, dev = ids.numel(), num_funcs, ids.device
    nb = num_blocks(P, F, bm)
    fp = triton.next_power_of_2(F + 1)
    sorted_pair = torch.empty(nb * bm, dtype=torch.int32, device=dev)
    pos = torch.empty(P, dtype=torch.int32, device=dev)
    block_func = torch.empty(nb, dtype=torch.int32, device=dev)
    block_rows = torch.empty(nb, dtype=torch.int32, device=dev)
    if parallel is None:
        parallel = P > SMALL_SORT_PAIRS
    if not parallel:
        _align_one_kernel[(1,)](ids, func_of_expert, P, F, nb, sorted_pair, pos, block_func, block_rows,
                                BM=bm, BLK=_BLK, FP=fp, BLKB=_BLKB)
    else:
        tiles = triton.cdiv(P, _BLK)
        cnt = torch.zeros(fp, dtype=torch.int32, device=dev)
        tile_base = torch.empty(tiles * fp, dtype=torch.int32, device=dev)
        start = torch.empty(fp, dtype=torch.int32, device=dev)
        _align_count_kernel[(tiles,)](ids, func_of_expert, P, cnt, tile_base, BLK=_BLK, FP=fp)
        _align_blocks_kernel[(1,)](cnt, F, nb, start, block_func, block_rows, BM=bm, FP=fp, BLKB=_BLKB)
        _align_scatter_kernel[(tiles,)](ids, func_of_expert, P, start, tile_base, sorted_pair, pos, BLK=_BLK, FP=fp)
    return Sorted(sorted_pair, pos, block_func, block_rows, nb, bm)
