"""The ``moe_lowrank`` checkpoint format: the single source of truth for metadata, tensor names and shapes.

The converter writes it, the vLLM plugin loads it, kernels and tests read it. ``docs/format.md`` is the prose
version of this module. Built on it: ``materialize.py`` (the reference dense weights of a checkpoint's experts) and
``rounding.py`` (the FP8 rounding arithmetic behind the scale tensors named here).

A compressed MoE layer stores each expert projection ``P`` (gate ``[m, n]``, up ``[m, n]``, down ``[n, m]``) as the
sum of up to four *terms*; an expert's weight is the sum of the terms present::

    dense     W_e                                   per-expert exact weight (possibly of a unit segment)
    lowrank   L_e · act(R_e)                        L_e per expert or a shared slot (MoE-SVD), R_e per expert,
                                                    per group (MoE-SVD, RFID-MoE) or act(Σ_j mix_ej B_j) (MoBE)
    residual  eta_e · P_g(e)ᵀ                       sparse one-hot projection of the input (RFID-MoE)
    base      B[:, idx_e]                           shared down base over the original units (RS-MoE)

Units (RS-MoE): when ``units`` is set, expert e keeps ``exact[e] + lowrank[e]`` intermediate units in a compact
order (exact units first); pruned units are gone. Terms then cover the ``exact`` or the ``lowrank`` segment.
Without ``units`` every term covers all ``m`` units.

Factor dtype (format version ≥ 2): with ``factor_dtype = "fp8_e4m3"`` every float tensor of a compressed layer (all
of the above except the float32 ``lr_mix`` and the int32 indices) is stored as ``float8_e4m3fn`` beside a float32
``<suffix>_scale`` tensor with one scale per index of one axis, ``scale_axis(proj, suffix, version)``: per rank
component for the low-rank factors (per column of ``lr_u``, per row of ``lr_v``), per bucket (column) for
``res_eta``, per unit (column) for down's ``weight`` (version 3; per row in version 2) and per row (dim 0) for every
other tensor: ``W ≈ q.float() · scale`` broadcast along that axis (``rounding.dequantize``; docs/format.md has the
measured choice). MoE layers left dense are then stored in vLLM's fp8 layout (``DenseQuant``: 128×128 block
scales, or an FP8 source's own).
Older checkpoints are still read: version 1 (no ``factor_dtype``: float tensors in the checkpoint's float dtype) and
version 2 (down's ``weight`` scaled per row); ``TensorSpec.scale_axis`` is the axis of the checkpoint's own version.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from enum import Enum
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

QUANT_METHOD = "moe_lowrank"
FORMAT_VERSION = 3  # written; readers accept SUPPORTED_VERSIONS
SUPPORTED_VERSIONS = (1, 2, 3)
PROJS = ("gate", "up", "down")
SHARED = "shared"  # path component for per-layer tensors: <moe_prefix>.shared.<proj_name>.<suffix>
FP8 = "fp8_e4m3"  # the one quantized factor dtype: torch.float8_e4m3fn with float32 scales
FACTOR_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                 FP8: torch.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale"  # scale tensor of a quantized tensor: <suffix>_scale, float32, one per index of its axis
# the tensors whose FP8 scales index axis 1 (columns), by (projection or "*", suffix): lr_u its rank (like lr_v's
# rows), res_eta its buckets, down's weight its units (version 3: one scale per kept unit); all others axis 0 (rows)
SCALE_COLUMNS = {("*", "lr_u"), ("*", "res_eta"), ("down", "weight")}
SCALE_COLUMNS_V2 = {("*", "lr_u"), ("*", "res_eta")}  # version 2: down's weight per row


def scale_axis(proj: str, suffix: str, version: int = FORMAT_VERSION) -> int:
    """The axis of tensor ``suffix`` of projection ``proj`` that its FP8 scales index in a checkpoint of format
    ``version`` (docs/format.md, FP8 factors): 1 (columns) or 0 (rows)."""
    cols = SCALE_COLUMNS_V2 if version <= 2 else SCALE_COLUMNS
    return int((proj, suffix) in cols or ("*", suffix) in cols)


class FormatError(ValueError):
    """A checkpoint or quantization_config that does not follow the moe_lowrank format."""


class Act(str, Enum):
    """Element-wise function applied to a right factor in weight space (MoBE Eq. 3: f(Σ_j α_j B_j))."""

    identity = "identity"
    silu = "silu"
    tanh = "tanh"


def apply_act(act: Act | str, w: torch.Tensor) -> torch.Tensor:
    act = Act(act)
    if act is Act.silu:
        return torch.nn.functional.silu(w)
    if act is Act.tanh:
        return torch.tanh(w)
    return w


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Segment = Literal["all", "exact", "lowrank"]


class DenseTerm(_Strict):
    """Per-expert exact weight ``weight`` over a unit segment (the original tensor when units == "all")."""

    units: Literal["all", "exact"] = "all"


class LowRankTerm(_Strict):
    """``W_e ≈ L_e · act(R_e)`` with rank ``ranks[e]``.

    Right factor R_e ``[r_e, in]``: per expert (``lr_v`` per expert); per group (``right_groups``: shared ``lr_v``
    ``[Σ_g r_g, in]``, group g's rows packed in order, SVD-LLM whitening folded in); or a basis mix
    (``num_bases`` J: shared ``lr_v`` ``[J·r, in]`` holding B_1..B_J, per-expert ``lr_mix`` ``[J]`` float32,
    R_e = act(Σ_j mix_ej B_j), MoBE).
    Left factor L_e ``[out, r_e]``: per expert (``lr_u``) or a shared slot (``left_slots``: shared ``lr_u``
    ``[out, Σ_s r_s]``, slot s's columns packed in order; MoE-SVD U-trimming, several experts share one slot).
    """

    units: Literal["all", "lowrank"] = "all"
    ranks: list[int]
    right_groups: list[int] | None = None
    num_bases: int | None = None
    left_slots: list[int] | None = None
    act: Act = Act.identity

    def group_ranks(self) -> list[int]:
        """Rank of each right group, in group order."""
        assert self.right_groups is not None
        out = [0] * (max(self.right_groups) + 1)
        for e, g in enumerate(self.right_groups):
            out[g] = self.ranks[e]
        return out

    def slot_ranks(self) -> list[int]:
        """Rank of each left slot, in slot order."""
        assert self.left_slots is not None
        out = [0] * (max(self.left_slots) + 1)
        for e, s in enumerate(self.left_slots):
            out[s] = self.ranks[e]
        return out


class ResidualTerm(_Strict):
    """RFID-MoE sparse residual: ``eta_e · P_gᵀ`` with P_g ``[in, s]`` one-hot buckets scaled by 1/sqrt(count).

    Shared ``res_bucket`` int32 ``[G, in]`` holds the bucket (0..width-1) of each input column for each group;
    per-expert ``res_eta`` is ``[out, width]``.
    """

    groups: list[int]
    width: int = Field(gt=0)


class BaseTerm(_Strict):
    """RS-MoE shared down base: ``B[:, idx_e]`` with shared ``base`` ``[n, m]`` over the original units.

    With units == "lowrank", per-expert ``base_idx`` int32 ``[lowrank_e]`` gives the original unit of each
    compact low-rank unit; with "all" the expert keeps all m units in their original order.
    """

    units: Literal["all", "lowrank"] = "lowrank"


class ProjSpec(_Strict):
    dense: DenseTerm | None = None
    lowrank: LowRankTerm | None = None
    residual: ResidualTerm | None = None
    base: BaseTerm | None = None

    def terms(self) -> Iterator[tuple[str, BaseModel]]:
        for kind in ("dense", "lowrank", "residual", "base"):
            t = getattr(self, kind)
            if t is not None:
                yield kind, t


class UnitSplit(_Strict):
    """RS-MoE collaborative units kept per expert: ``exact[e]`` exact units then ``lowrank[e]`` low-rank units."""

    exact: list[int]
    lowrank: list[int]


class LayerSpec(_Strict):
    method: str
    units: UnitSplit | None = None
    gate: ProjSpec
    up: ProjSpec
    down: ProjSpec

    def proj(self, p: str) -> ProjSpec:
        return getattr(self, p)


class ProjNames(_Strict):
    """Checkpoint names of the expert projections (Mixtral: w1 / w3 / w2)."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


class TensorSpec(BaseModel):
    """One tensor of a compressed layer: its checkpoint name, exact shape and dtype class.

    dtype "float": the checkpoint's float dtype (bf16, fp16, fp32; ``factor_dtype`` when set); "fp8": float8_e4m3fn
    data whose float32 scales, one per index of its axis ``scale_axis``, are the tensor named ``scale``; a scale
    tensor itself has ``scale_of`` set."""

    model_config = ConfigDict(frozen=True)
    name: str
    shape: tuple[int, ...]
    dtype: Literal["float", "float32", "int32", "fp8"]
    proj: str
    suffix: str
    expert: int | None  # None: shared per-layer tensor
    scale: str | None = None  # fp8 data: name of its scale tensor
    scale_axis: int | None = None  # fp8 data: the axis its scales index (``format.scale_axis`` of the version)
    scale_of: str | None = None  # a scale tensor: name of the fp8 tensor it scales

    @property
    def is_param(self) -> bool:
        """Counted as a parameter for the compression ratio (indices and scales are reported as bytes)."""
        return self.dtype != "int32" and self.scale_of is None

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The stored torch dtype; None for "float" (the checkpoint's / the model's float dtype)."""
        return {"float32": torch.float32, "int32": torch.int32, "fp8": torch.float8_e4m3fn}.get(self.dtype)

    def nbytes(self, float_bytes: int) -> int:
        """Stored bytes; ``float_bytes`` is the element size of a "float" tensor."""
        size = {"float32": 4, "int32": 4, "fp8": 1}.get(self.dtype, float_bytes)
        return math.prod(self.shape) * size


class DenseQuant(_Strict):
    """How the routed experts of MoE layers left dense are stored in an FP8 conversion (``factor_dtype`` fp8_e4m3):
    vLLM's own fp8 checkpoint layout, so vLLM's FP8 MoE method serves them. Per expert and projection a
    float8_e4m3fn ``weight`` with float32 ``weight_scale_inv`` [ceil(out/bm), ceil(in/bn)] (``weight_block_size``
    [bm, bn]) or one ``weight_scale`` [] (per tensor), plus ``input_scale`` [] with ``activation_scheme`` static.
    An FP8 source's own settings (its expert tensors are copied), else DENSE_FP8 (128×128 blocks, quantized)."""

    quant_method: Literal["fp8"] = "fp8"
    activation_scheme: Literal["dynamic", "static"] = "dynamic"
    weight_block_size: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _check(self) -> DenseQuant:
        if self.weight_block_size is not None and min(self.weight_block_size) <= 0:
            raise FormatError(f"dense_quantization.weight_block_size={list(self.weight_block_size)} must be positive")
        if self.weight_block_size is not None and self.activation_scheme == "static":
            raise FormatError("dense_quantization: block FP8 needs activation_scheme dynamic (vLLM's rule)")
        return self

    @property
    def scale_suffix(self) -> str:
        return "weight_scale_inv" if self.weight_block_size is not None else "weight_scale"

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, ...]:
        if self.weight_block_size is None:
            return ()
        (bm, bn), (o, i) = self.weight_block_size, shape
        return (-(-o // bm), -(-i // bn))


DENSE_FP8 = DenseQuant(weight_block_size=(128, 128))  # dense-kept experts of a float source in an FP8 conversion


class MoELowRankConfig(_Strict):
    """The ``quantization_config`` section of a compressed checkpoint's ``config.json``."""

    quant_method: Literal["moe_lowrank"] = QUANT_METHOD
    format_version: int
    method: str
    target_ratio: float | None = None
    achieved_ratio: float | None = None
    num_experts: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    moe_prefix: str  # e.g. "model.layers.{layer}.mlp.experts"
    expert_names: ProjNames = ProjNames()
    moe_layers: list[int]
    layers: dict[int, LayerSpec]
    # version 2: dtype of the compressed layers' float tensors; fp8_e4m3 adds float32 scales (see top)
    factor_dtype: Literal["bfloat16", "float16", "float32", "fp8_e4m3"] | None = None
    # how the non-expert linear layers are stored: the source's own fp8 quantization_config, None if unquantized
    linear_quantization: dict | None = None
    # FP8 storage of the experts of the MoE layers left dense (factor_dtype fp8_e4m3 only); None: the float dtype
    dense_quantization: DenseQuant | None = None

    @model_validator(mode="after")
    def _validate(self) -> MoELowRankConfig:
        if self.format_version not in SUPPORTED_VERSIONS:
            raise FormatError(
                f"quantization_config.format_version={self.format_version} is not supported by this version of "
                f"vllm-moe-lowrank (supports {', '.join(map(str, SUPPORTED_VERSIONS))}); re-convert the checkpoint "
                "or upgrade the plugin"
            )
        if self.format_version == 1 and (self.factor_dtype is not None or self.linear_quantization is not None):
            raise FormatError("quantization_config: factor_dtype and linear_quantization need format_version >= 2")
        if self.dense_quantization is not None and self.factor_dtype != FP8:
            raise FormatError("quantization_config: dense_quantization needs factor_dtype fp8_e4m3")
        if "{layer}" not in self.moe_prefix:
            raise FormatError(f"quantization_config.moe_prefix {self.moe_prefix!r} must contain '{{layer}}'")
        for layer, spec in self.layers.items():
            if layer not in self.moe_layers:
                raise FormatError(f"quantization_config.layers.{layer}: layer {layer} is not in moe_layers")
            _validate_layer(self, layer, spec)
        return self

    # ----- naming -------------------------------------------------------------------------------------------
    def prefix(self, layer: int) -> str:
        return self.moe_prefix.format(layer=layer)

    def proj_name(self, p: str) -> str:
        return getattr(self.expert_names, p)

    def tensor_name(self, layer: int, p: str, suffix: str, expert: int | None) -> str:
        where = SHARED if expert is None else str(expert)
        return f"{self.prefix(layer)}.{where}.{self.proj_name(p)}.{suffix}"

    @property
    def quantized(self) -> bool:
        """Compressed layers store their float tensors as FP8 with float32 scales."""
        return self.factor_dtype == FP8

    def scale_axis(self, p: str, suffix: str) -> int:
        """The axis of tensor ``suffix`` of projection p that its FP8 scales index in this checkpoint's version."""
        return scale_axis(p, suffix, self.format_version)

    def dense_layers(self) -> list[int]:
        """MoE layers left uncompressed (stored as ordinary per-expert ``.weight`` tensors)."""
        return [l for l in self.moe_layers if l not in self.layers]

    # ----- shapes -------------------------------------------------------------------------------------------
    def unit_count(self, layer: int, e: int, seg: Segment) -> int:
        units = self.layers[layer].units
        if units is None:
            return self.intermediate_size
        return {"all": units.exact[e] + units.lowrank[e], "exact": units.exact[e], "lowrank": units.lowrank[e]}[seg]

    def io_dims(self, layer: int, p: str, e: int, seg: Segment) -> tuple[int, int]:
        """(out, in) of projection p of expert e restricted to a unit segment."""
        u = self.unit_count(layer, e, seg)
        return (self.hidden_size, u) if p == "down" else (u, self.hidden_size)

    def tensor_specs(self, layer: int) -> dict[str, TensorSpec]:
        """Every tensor a compressed layer must have in the checkpoint, by name, with its exact shape."""
        out: dict[str, TensorSpec] = {}

        def add(p: str, suffix: str, shape: tuple[int, ...], dtype: str = "float", expert: int | None = None):
            name = self.tensor_name(layer, p, suffix, expert)
            if dtype == "float" and self.quantized:
                sname = self.tensor_name(layer, p, suffix + SCALE_SUFFIX, expert)
                axis = self.scale_axis(p, suffix)
                out[name] = TensorSpec(name=name, shape=shape, dtype="fp8", proj=p, suffix=suffix, expert=expert,
                                       scale=sname, scale_axis=axis)
                out[sname] = TensorSpec(name=sname, shape=(shape[axis],), dtype="float32", proj=p,
                                        suffix=suffix + SCALE_SUFFIX, expert=expert, scale_of=name)
                return
            out[name] = TensorSpec(name=name, shape=shape, dtype=dtype, proj=p, suffix=suffix, expert=expert)

        spec = self.layers[layer]
        E = self.num_experts
        for p in PROJS:
            ps = spec.proj(p)
            if ps.dense is not None:
                for e in range(E):
                    add(p, "weight", self.io_dims(layer, p, e, ps.dense.units), expert=e)
            if (lr := ps.lowrank) is not None:
                for e in range(E):
                    o, i = self.io_dims(layer, p, e, lr.units)
                    r = lr.ranks[e]
                    if lr.left_slots is None:
                        add(p, "lr_u", (o, r), expert=e)
                    if lr.right_groups is None and lr.num_bases is None:
                        add(p, "lr_v", (r, i), expert=e)
                    if lr.num_bases is not None:
                        add(p, "lr_mix", (lr.num_bases,), "float32", expert=e)
                o, i = self.io_dims(layer, p, 0, lr.units)
                if lr.left_slots is not None:
                    add(p, "lr_u", (o, sum(lr.slot_ranks())))
                if lr.right_groups is not None:
                    add(p, "lr_v", (sum(lr.group_ranks()), i))
                if lr.num_bases is not None:
                    add(p, "lr_v", (lr.num_bases * lr.ranks[0], i))
            if (res := ps.residual) is not None:
                for e in range(E):
                    add(p, "res_eta", (self.io_dims(layer, p, e, "all")[0], res.width), expert=e)
                add(p, "res_bucket", (max(res.groups) + 1, self.io_dims(layer, p, 0, "all")[1]), "int32")
            if (base := ps.base) is not None:
                add(p, "base", (self.hidden_size, self.intermediate_size))
                if base.units == "lowrank":
                    for e in range(E):
                        add(p, "base_idx", (self.unit_count(layer, e, "lowrank"),), "int32", expert=e)
        return out

    def dense_tensor_specs(self, layer: int) -> dict[str, TensorSpec]:
        """The ordinary per-expert tensors of an uncompressed MoE layer; with ``dense_quantization`` FP8 weights and
        their scales in vLLM's fp8 layout (``DenseQuant``)."""
        out = {}
        q = self.dense_quantization
        for p in PROJS:
            for e in range(self.num_experts):
                name = self.tensor_name(layer, p, "weight", e)
                shape = (self.hidden_size, self.intermediate_size) if p == "down" else (
                    self.intermediate_size, self.hidden_size)
                if q is None:
                    out[name] = TensorSpec(name=name, shape=shape, dtype="float", proj=p, suffix="weight", expert=e)
                    continue
                sname = self.tensor_name(layer, p, q.scale_suffix, e)
                out[name] = TensorSpec(name=name, shape=shape, dtype="fp8", proj=p, suffix="weight", expert=e,
                                       scale=sname)
                out[sname] = TensorSpec(name=sname, shape=q.scale_shape(shape), dtype="float32", proj=p,
                                        suffix=q.scale_suffix, expert=e, scale_of=name)
                if q.activation_scheme == "static":  # the activation scale of this weight's matmul
                    iname = self.tensor_name(layer, p, "input_scale", e)
                    out[iname] = TensorSpec(name=iname, shape=(), dtype="float32", proj=p, suffix="input_scale",
                                            expert=e, scale_of=name)
        return out

    def all_expert_tensor_specs(self) -> dict[str, TensorSpec]:
        out = {}
        for layer in self.moe_layers:
            out.update(self.tensor_specs(layer) if layer in self.layers else self.dense_tensor_specs(layer))
        return out

    def original_expert_params(self) -> int:
        """Routed-expert parameters of the uncompressed model: 3·E·n·m per MoE layer."""
        return 3 * self.num_experts * self.hidden_size * self.intermediate_size * len(self.moe_layers)

    @classmethod
    def from_hf_config(cls, hf_config: dict) -> MoELowRankConfig:
        qc = hf_config.get("quantization_config")
        if not isinstance(qc, dict):
            raise FormatError("config.json has no quantization_config section; not a moe_lowrank checkpoint")
        return cls.model_validate(qc)


# ----- validation ---------------------------------------------------------------------------------------------
def _validate_layer(cfg: MoELowRankConfig, layer: int, spec: LayerSpec) -> None:
    E, m = cfg.num_experts, cfg.intermediate_size
    where = f"quantization_config.layers.{layer}"

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise FormatError(f"{where}: {msg}")

    def check_len(lst: list[int], what: str) -> None:
        need(len(lst) == E, f"{what} has {len(lst)} entries, expected num_experts={E}")
        need(all(v >= 0 for v in lst), f"{what} has negative entries")

    if spec.units is not None:
        check_len(spec.units.exact, "units.exact")
        check_len(spec.units.lowrank, "units.lowrank")
        for e in range(E):
            need(spec.units.exact[e] + spec.units.lowrank[e] <= m,
                 f"units of expert {e} exceed intermediate_size={m}")
    for p in PROJS:
        ps = spec.proj(p)
        need(any(True for _ in ps.terms()), f"{p} has no terms")
        segments = [getattr(t, "units", "all") for _, t in ps.terms()]
        need(spec.units is not None or all(s == "all" for s in segments),
             f"{p} uses unit segments {segments} but the layer has no units split")
        if (lr := ps.lowrank) is not None:
            check_len(lr.ranks, f"{p}.lowrank.ranks")
            need(lr.right_groups is None or lr.num_bases is None,
                 f"{p}.lowrank: right_groups and num_bases are exclusive")
            unit_axis_shared = (lr.left_slots is not None and p != "down") or (
                (lr.right_groups is not None or lr.num_bases is not None) and p == "down")
            need(not (unit_axis_shared and spec.units is not None),
                 f"{p}.lowrank shares a factor along the unit axis, which needs units == null")
            for name, idx in (("right_groups", lr.right_groups), ("left_slots", lr.left_slots)):
                if idx is not None:
                    check_len(idx, f"{p}.lowrank.{name}")
                    ranks: dict[int, int] = {}
                    for e, g in enumerate(idx):
                        need(ranks.setdefault(g, lr.ranks[e]) == lr.ranks[e],
                             f"{p}.lowrank.{name}: experts sharing entry {g} must have equal ranks")
                    need(sorted(ranks) == list(range(len(ranks))), f"{p}.lowrank.{name} must use ids 0..K-1")
            if lr.num_bases is not None:
                need(lr.num_bases > 0 and len(set(lr.ranks)) == 1, f"{p}.lowrank: a basis mix needs one rank")
        if (res := ps.residual) is not None:
            check_len(res.groups, f"{p}.residual.groups")
            need(p != "down" or spec.units is None, "down.residual needs units == null")
        if ps.base is not None:
            need(p == "down", f"{p}.base: a base term is only defined for down")
            need((ps.base.units == "lowrank") == (spec.units is not None),
                 "down.base must use units='lowrank' with a units split and units='all' without one")


# ----- the RFID-MoE residual's projection; parameter counts ---------------------------------------------------
def bucket_projection(bucket: torch.Tensor, width: int) -> torch.Tensor:
    """P ``[in, width]`` with P[c, bucket[c]] = 1/sqrt(|bucket|), so PᵀP = I on non-empty buckets (RFID-MoE §3.4)."""
    bucket = bucket.long()  # [in]
    counts = torch.bincount(bucket, minlength=width).clamp(min=1).double()  # [width]
    P = torch.zeros(bucket.numel(), width, dtype=torch.float64)  # [in, width]
    P[torch.arange(bucket.numel()), bucket] = counts[bucket].rsqrt()
    return P


def count_params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())
