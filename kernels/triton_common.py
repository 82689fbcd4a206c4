"""Shared pieces of the Triton path: device-side helpers used by every kernel, and the meta-table column scheme.

Every kernel of the Triton path works on the *packed* buffers of ``layout.py`` directly (no copies): where a
function's factor lives is read from a small static int64 table ``meta [F, NCOLS]`` (one row per local expert
function, built once per layer by ``triton_plan.py``), whose column numbers are the constants below. Ragged ranks
and unit counts are runtime loop bounds and masks, so a ragged rank costs at most one partly masked tile.

Helpers:

* ``act_fn``: identity / silu / tanh in float32 registers (the weight-space act of a right factor);
* ``mm``: ``acc + a @ b`` with float32 accumulation; ``F32`` upcasts the operands (float32 inputs, where IEEE
  precision is wanted, and the Triton interpreter, whose half-precision ``tl.dot`` is wrong in Triton 3.9);
* ``load_w``: a weight tile as compute reads it: the stored values, or for FP8 factors (``Q``) q · scale in float32
  (the scale vector of the tensor's scaled axis, loaded once per tile and broadcast; the axis is the format's:
  ``SK_*`` for the tensors whose axis is the same in every projection and format version, a ``SK_D`` launch
  constexpr (``ProjPlan.dense_sk``) for the dense ``weight``, per unit in down's since version 3);
* ``right_tile``: a tile of a right factor act(R_f) in any of its three forms — stored rows (per expert or a
  group's rows), a basis mix act(Σ_j mix_fj·B_j) generated in registers from the bases, or the residual's one-hot
  bucket indicator built from the stored bucket ids (Pᵀ up to the per-bucket scale). The index arguments are 2-D and only need to broadcast,
  so the same helper gives a ``[rank, in]`` or an ``[in, rank]`` (transposed) tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_moe_lowrank.format import PROJS, SUPPORTED_VERSIONS, scale_axis


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """True when this module's kernels were defined under ``TRITON_INTERPRET=1`` (they run in numpy on CPU
    tensors); Triton decides at decoration time, so this asks a kernel rather than the environment."""
    return type(_probe).__name__ == "InterpretedFunction"


def interpreter_usable() -> bool:
    """True when the kernels *and* Triton's own jit helpers (``tl.zeros``, ``tl.sum``...) are interpreted: the
    variable must be set before Triton itself is first imported, not only before these kernels are defined."""
    return interpreting() and type(tl.zeros).__name__ == "InterpretedFunction"


ACT_CODES = {"identity": 0, "silu": 1, "tanh": 2}

# right-factor tile modes (``right_tile``)
MODE_STORED = 0  # rows of a stored matrix (float: act applied at load time; FP8: act applied on the tile)
MODE_BASIS = 1  # act(Σ_j mix_j · B_j), generated from the J bases
MODE_BUCKET = 2  # residual Pᵀ: [bucket id == row] · scale[row]

# ----- meta-table columns -------------------------------------------------------------------------------------
# One block of PROJ_COLS columns per projection (gate, up, down), then a few layer-wide columns.
U = 0  # local unit count of the function (its row/column count in local compact order)
D_START, D_LEN, D_OFF, D_STRIDE = 1, 2, 3, 4  # dense: unit segment [start, start+len), weight offset, row stride
L_START, L_LEN, RANK, L_OFF, L_STRIDE = 5, 6, 7, 8, 9  # lowrank: unit segment, rank, left factor L [out, r]
V_OFF, V_STRIDE, MIX_OFF, TOK_COL, V_IN = 10, 11, 12, 13, 14  # right factor (or bases), mix, token column, in len
E_OFF, E_STRIDE, B_OFF, S_OFF, B_IN, RES_W = 15, 16, 17, 18, 19, 20  # residual: eta, bucket row, scale row, width
# FP8 factors: offset of the float32 scales of each factor in its scale buffer (0 for float factors)
D_SC, L_SC, V_SC, E_SC = 21, 22, 23, 24  # weight, lr_u (slot-shifted), lr_v (group-shifted), res_eta
PROJ_COLS = 25
PROJ_BASE = {"gate": 0, "up": PROJ_COLS, "down": 2 * PROJ_COLS}
BASE_LR_START = 3 * PROJ_COLS  # down base, units "lowrank": where the low-rank units start in h
ZERO = BASE_LR_START + 1  # always 0
NCOLS = BASE_LR_START + 2


def _fixed_axis(suffix: str) -> tl.constexpr:
    """True where tensor ``suffix``'s FP8 scales index its second axis (in kernel terms its input / rank / bucket
    columns), False where they index its rows: ``format.scale_axis``, which must agree for every projection and
    supported version (the dense ``weight``'s does not: it is a launch constexpr, ``ProjPlan.dense_sk``)."""
    axes = {scale_axis(p, suffix, v) for p in PROJS for v in SUPPORTED_VERSIONS}
    if len(axes) != 1:
        raise RuntimeError(f"format.scale_axis of {suffix} varies by projection or version: make it a launch arg")
    return tl.constexpr(axes.pop() == 1)


# FP8 scale axes of the tensors whose axis the format fixes
SK_LR_U = _fixed_axis("lr_u")
SK_LR_V = _fixed_axis("lr_v")
SK_ETA = _fixed_axis("res_eta")
SK_BASE = _fixed_axis("base")


@triton.jit
def act_fn(x, ACT: tl.constexpr):
    """Element-wise act in float32: 0 identity, 1 silu, 2 tanh."""
    if ACT == 1:
        x = x * tl.sigmoid(x)
    elif ACT == 2:
        t = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - t) / (1.0 + t)
        x = tl.where(x < 0, -y, y)
    return x


@triton.jit
def mm(a, b, acc, F32: tl.constexpr):
    """acc + a @ b, accumulated in float32 (``a`` and ``b`` of the same dtype unless F32)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def load_w(ptrs, mask, SC, sc_off, rows, rows_ok, cols, cols_ok, Q: tl.constexpr, SK: tl.constexpr):
    """Tile of a stored [rows, cols] tensor at ``ptrs``: the stored values, or with Q (FP8 data) q · scale in float32,
    the scale SC[sc_off + col] if SK (scales along the second axis) else SC[sc_off + row]. ``rows`` / ``cols`` (and
    their masks) are the tile's indices along the two axes, 2-D and broadcasting ([1, B] or [B, 1])."""
    w = tl.load(ptrs, mask=mask, other=0.0)
    if Q:
        if SK:
            s = tl.load(SC + sc_off + cols, mask=cols_ok, other=0.0)
        else:
            s = tl.load(SC + sc_off + rows, mask=rows_ok, other=0.0)
        w = w.to(tl.float32) * s
    return w


@triton.jit
def right_tile(V, MIX, rows, cols, r_len, c_len, v_off, v_stride, mix_off, SV, sv_off,
               MODE: tl.constexpr, ACT: tl.constexpr, J: tl.constexpr, Q: tl.constexpr):
    """Tile of the right factor act(R) at (rows, cols), zero outside rows < r_len, 0 <= cols < c_len.

    rows index the rank (or the residual's buckets), cols the factor's input; both are 2-D and broadcast.
    MODE_STORED: V[v_off + row*v_stride + col] (native dtype; ACT is 0 because finalize applied act in place),
    or with Q (FP8) act(q · scale) in float32, scales SV[sv_off + row] (per rank row; SV[sv_off + col] if lr_v's
    scale axis were its columns). MODE_BASIS: act(Σ_j MIX[mix_off+j]·B_j) with B_j = V[v_off + j*r_len*v_stride :]
    (float32; with Q basis j's row scales at SV[sv_off + j*r_len + row]).
    MODE_BUCKET: V holds int32 bucket ids of the inputs at v_off: the one-hot indicator (V[v_off+col] == row)
    (float32, exact in any dtype; the caller applies the bucket scales 1/sqrt(|bucket|) to the product, in float32).
    """
    ok = (rows < r_len) & (cols >= 0) & (cols < c_len)
    if MODE == 0:
        t = load_w(V + v_off + rows * v_stride + cols, ok, SV, sv_off, rows, rows < r_len, cols, cols < c_len, Q,
                   SK_LR_V)
        if ACT != 0:
            t = tl.where(ok, act_fn(t, ACT), 0.0)
    elif MODE == 1:
        t = tl.zeros(ok.shape, dtype=tl.float32)
        for j in tl.static_range(J):
            c = tl.load(MIX + mix_off + j)
            b = load_w(V + v_off + j * r_len * v_stride + rows * v_stride + cols, ok, SV, sv_off, j * r_len + rows,
                       rows < r_len, cols, cols < c_len, Q, SK_LR_V)
            t += c * b.to(tl.float32)
        t = tl.where(ok, act_fn(t, ACT), 0.0)
    else:
        bucket = tl.load(V + v_off + cols, mask=(cols >= 0) & (cols < c_len), other=-1)
        t = tl.where(ok & (bucket == rows), 1.0, 0.0)
    return t


@triton.jit
def block_of(BLOCK_FUNC, BLOCK_ROWS, pid, BM: tl.constexpr):
    """(function, row offsets 0..BM, valid-row mask, sorted positions) of sorted block ``pid``."""
    f = tl.load(BLOCK_FUNC + pid)
    nrows = tl.load(BLOCK_ROWS + pid)
    i = tl.arange(0, BM)
    return f, i < nrows, pid * BM + i
