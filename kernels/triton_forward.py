"""The Triton forward pass of a compressed MoE layer (the CUDA implementation of ``moe_lowrank::experts``).

    sort (triton_sort) ─┬─ low-rank path:  token GEMM* → pair shrink (gate, up) → expand + SiLU·mul → h
                        │                  → pair shrink (down)* → expand (down) → per-pair outputs
                        └─ dense-tile path: rebuild-tile GEMM + SiLU·mul → h → rebuild-tile GEMM (down)
                        → combine: Σ_k w·out_pair (+ z·Bᵀ, the shared down base) → y           (* only if needed)

CUDA-graph safety: everything launched depends only on shapes (T, K), dtypes and the static layer plan; workspace
tensors are allocated with static shapes from the current stream's allocator (the graph pool under capture); no
``.item()``, ``.tolist()``, ``nonzero`` or host loop over data-dependent counts. The static plan (meta table) is
built on the first call for a (layer, device, top-k) — vLLM's profiling and warm-up runs are eager — and a first
call *during* capture is refused with a clear error rather than a host copy inside the graph.

Path choice (static): the dense-tile path when the expected rows per local function T·K/F reach
``DENSE_TILE_MIN_ROWS`` (environment ``MOE_LOWRANK_DENSE_TILE_MIN_ROWS``; provisional, unmeasured: see
docs/kernels.md), else the low-rank path. Tokens are processed in chunks of ``CHUNK_TOKENS`` (static loop) to bound
the workspace.

FP8 factors (``factor_dtype = "fp8_e4m3"``) are read as stored: every kernel loads the float8 tile and multiplies it
by its float32 scales in registers, accumulating in float32, so an FP8 layer keeps its FP8 bytes in GPU memory.
"""

from __future__ import annotations

import os

import torch
import triton

from .layout import LayerLayout
from .triton_combine import combine
from .triton_common import interpreting
from .triton_dense_tile import down_dense_tile, gate_up_dense_tile
from .triton_expand import down, gate_up
from .triton_plan import Plan, build_plan
from .triton_shrink import pair_shrink_down, pair_shrink_gate_up, token_shrink
from .triton_sort import align_pairs, num_blocks

# Provisional (no GPU measurement yet): expected (token, expert) rows per local expert function at which the
# dense-tile path replaces the low-rank path. benchmarks/kernels.py times both paths at every M to set it.
DENSE_TILE_MIN_ROWS = int(os.environ.get("MOE_LOWRANK_DENSE_TILE_MIN_ROWS", "4096"))
CHUNK_TOKENS = int(os.environ.get("MOE_LOWRANK_CHUNK_TOKENS", "16384"))
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def choose_path(T: int, K: int, F: int) -> str:
    return "dense_tile" if T * K >= DENSE_TILE_MIN_ROWS * max(F, 1) else "lowrank"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def make_config(T: int, K: int, plan: Plan, dtype: torch.dtype, path: str, device: torch.device) -> dict:
    """Tile sizes from static shapes only (untuned provisional heuristics; see docs/kernels.md)."""
    rows = T * K / max(plan.F, 1)  # expected rows per function
    if path == "dense_tile":
        bm = 64 if rows < 512 else 128
    else:
        bm = 16 if rows <= 16 else 32 if rows <= 48 else 64
    nb = num_blocks(T * K, plan.F, bm)
    rmax = max([pp.lowrank.rmax for pp in plan.proj.values() if pp.lowrank is not None] + [16])
    br = 64  # shrink rank tile: smaller at decode so the shrink grid covers the device
    while br > 16 and nb * triton.cdiv(rmax, br) < 2 * _sm_count(device):
        br //= 2
    return dict(path=path, bm=bm, bk=64, br=br, bn_units=64, bn_hidden=64, token_bm=16 if T <= 64 else 64,
                token_bn=64, combine_bm=16 if T <= 64 else 32, f32=dtype == torch.float32 or interpreting())


def get_plan(layout: LayerLayout, bufs: dict[str, torch.Tensor], topk: int, device: torch.device) -> Plan:
    plans = layout.__dict__.setdefault("_triton_plans", {})
    key = (str(device), topk, tuple(bufs[n].data_ptr() for n in layout.buffers))
    if key not in plans:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"moe_lowrank: layer {layout.layer}'s Triton plan was not built before CUDA-graph "
                               "capture; run one eager forward with the same top-k first (vLLM's warm-up does)")
        plans[key] = build_plan(layout, bufs, topk)
    return plans[key]


def experts_forward_triton(layout: LayerLayout, bufs: dict[str, torch.Tensor], x: torch.Tensor,
                           topk_weights: torch.Tensor, topk_ids: torch.Tensor, path: str | None = None,
                           config: dict | None = None) -> torch.Tensor:
    """[T, n] un-reduced output of this rank's experts, like ``torch_ref.experts_forward``.

    ``path`` forces "lowrank" or "dense_tile"; ``config`` overrides tile sizes (tests, benchmarks).
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"moe_lowrank Triton path: unsupported dtype {x.dtype} (use {SUPPORTED_DTYPES})")
    T, K = topk_ids.shape
    x = x.contiguous()
    out = torch.empty_like(x)  # [T, n] row-major, like x now
    if T == 0:
        return out
    plan = get_plan(layout, bufs, K, x.device)
    for t0 in range(0, T, CHUNK_TOKENS):
        t1 = min(T, t0 + CHUNK_TOKENS)
        _chunk(plan, x[t0:t1], topk_weights[t0:t1], topk_ids[t0:t1], out[t0:t1], path, config)
    return out


def _chunk(plan: Plan, x, topk_weights, topk_ids, out, path, config) -> None:
    T, K = topk_ids.shape
    p = path or choose_path(T, K, plan.F)
    cfg = make_config(T, K, plan, x.dtype, p, x.device)
    cfg.update(config or {})
    srt = align_pairs(topk_ids, plan.func_of_expert, plan.F, cfg["bm"], cfg.get("parallel_sort"))
    if p == "dense_tile":
        h = gate_up_dense_tile(x, K, srt, plan, cfg)
        yp = down_dense_tile(h, srt, plan, cfg)
    elif p == "lowrank":
        ts = token_shrink(x, plan, cfg)
        tb = pair_shrink_gate_up(x, K, srt, plan, cfg)
        h = gate_up(x, K, srt, plan, tb, ts, cfg)
        td = pair_shrink_down(h, srt, plan, cfg)
        yp = down(h, srt, plan, td, cfg)
    else:
        raise ValueError(f"unknown path {p!r}")
    combine(yp, topk_weights, srt, h, plan, out, cfg)
