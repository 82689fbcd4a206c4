"""In-memory layout of one compressed MoE layer on one rank: flat packed buffers, TP narrowing, EP selection.

Every checkpoint tensor of the layer (``format.tensor_specs``) becomes one *block* of a flat 1-D buffer: per-expert
tensors of the rank's local experts and all shared tensors, packed back to back with their offsets, so ragged
ranks and ragged unit counts cost no padding. Buffers are named like vLLM's expert parameters::

    w13_<suffix>         per-expert tensors of gate (shard w1) and up (w3)     e.g. w13_lr_u
    w13_shared_<suffix>  per-layer tensors of gate and up                     e.g. w13_shared_lr_v
    w2_<suffix>, w2_shared_<suffix>    the same for down

Tensor parallelism splits every expert's intermediate units across ranks (outputs are all-reduced, so any split
is exact). Rank k keeps units [k·s//t, (k+1)·s//t) of each unit segment of size s (the whole m units without an
RS-MoE split; the exact and low-rank segments separately with one), in the local compact order
[local exact | local low-rank]. gate/up tensors are narrowed along their output (unit) rows, down tensors along
their input (unit) columns; everything indexed by the hidden axis is replicated.

FP8 factors (``factor_dtype = "fp8_e4m3"``): data blocks are float8_e4m3fn, their float32 ``*_scale`` tensors are
blocks of their own buffers (``w13_lr_u_scale`` ...), narrowed with their data where the scale axis is the
narrowed one, else replicated. The Triton kernels read the FP8 blocks and their scales directly (dequantizing in
their loads); ``LayerLayout.weight`` is the accessor every other compute path uses: the stored view, or for FP8
data the dequantized tensor (q · scale in float32, then the compute dtype). ``dequantize_at_load`` replaces the FP8
buffers with float copies once (the plugin does it on CPU, where no kernel reads FP8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_moe_lowrank.format import PROJS, SHARED, Act, MoELowRankConfig, TensorSpec
from vllm_moe_lowrank.rounding import dequantize

SIDE = {"gate": "w13", "up": "w13", "down": "w2"}
SHARD_PROJ = {"w1": "gate", "w3": "up", "w2": "down"}  # vLLM shard ids
_DTYPES = {"float32": torch.float32, "int32": torch.int32, "fp8": torch.float8_e4m3fn}

Ranges = tuple[tuple[int, int], ...]  # half-open index ranges along one axis


def split(size: int, rank: int, world: int) -> tuple[int, int]:
    """The [lo, hi) share of rank ``rank`` when ``size`` items are split evenly over ``world`` ranks."""
    return rank * size // world, (rank + 1) * size // world


def buffer_name(proj: str, suffix: str, expert: int | None) -> str:
    return f"{SIDE[proj]}_{SHARED + '_' if expert is None else ''}{suffix}"


@dataclass(frozen=True)
class Block:
    """Where one checkpoint tensor lives: ``buffer[offset : offset + numel].view(shape)``."""

    spec: TensorSpec
    buffer: str
    offset: int
    shape: tuple[int, ...]  # local (narrowed) shape
    axis: int | None  # TP-narrowed axis of the checkpoint tensor; None: replicated
    ranges: Ranges  # kept index ranges along ``axis``

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass(frozen=True)
class LocalUnits:
    """One expert's units on this rank, as ranges inside each segment's own index space."""

    exact: tuple[int, int]  # within the exact segment
    lowrank: tuple[int, int]  # within the low-rank segment (or all m units without a units split)
    num_exact: int  # the expert's global exact count (offset of the low-rank segment in compact order)

    def ranges(self, seg: str) -> Ranges:
        """Kept ranges of a tensor covering segment ``seg`` (its unit axis indexes that segment)."""
        ex = (self.exact,) if self.exact[1] > self.exact[0] else ()
        lr = (self.lowrank,) if self.lowrank[1] > self.lowrank[0] else ()
        if seg == "exact":
            return ex
        if seg == "lowrank":
            return lr
        return ex + tuple((self.num_exact + a, self.num_exact + b) for a, b in lr)

    @property
    def n_exact(self) -> int:
        return self.exact[1] - self.exact[0]

    @property
    def n_lowrank(self) -> int:
        return self.lowrank[1] - self.lowrank[0]

    def place(self, seg: str) -> slice:
        """Where a term over ``seg`` lands in the local compact order [local exact | local low-rank]."""
        return {"exact": slice(0, self.n_exact), "lowrank": slice(self.n_exact, self.n_exact + self.n_lowrank),
                "all": slice(0, self.n_exact + self.n_lowrank)}[seg]

    @property
    def count(self) -> int:
        return self.n_exact + self.n_lowrank


@dataclass
class LayerLayout:
    """Static description of one compressed layer on one rank (no tensors)."""

    cfg: MoELowRankConfig
    layer: int
    tp_rank: int = 0
    tp_size: int = 1
    local_experts: list[int] | None = None  # global ids in local order; None: all experts
    key: str = ""  # unique name of the layer in this process (the kernel op looks the layout up by it)
    blocks: dict[str, Block] = field(init=False)  # by checkpoint tensor name
    buffers: dict[str, tuple[int, str]] = field(init=False)  # name -> (numel, dtype class)
    units: dict[int, LocalUnits] = field(init=False)  # by global expert id
    bucket_counts: dict[str, torch.Tensor] = field(init=False, default_factory=dict)  # proj -> [G, width]
    residual_shared: bool = field(init=False, default=False)  # up's residual input is gate's (same buckets)
    finalized: bool = field(init=False, default=False)
    fp8_dequantized: bool = field(init=False, default=False)  # FP8 buffers replaced by float copies at load

    def __post_init__(self) -> None:
        cfg, layer = self.cfg, self.layer
        if layer not in cfg.layers:
            raise ValueError(f"layer {layer} is not compressed")
        if self.local_experts is None:
            self.local_experts = list(range(cfg.num_experts))
        self.spec = cfg.layers[layer]
        self.units = {e: self._local_units(e) for e in range(cfg.num_experts)}
        self.blocks, self.buffers = {}, {}
        local = set(self.local_experts)
        specs = cfg.tensor_specs(layer)
        for name, ts in specs.items():
            if ts.expert is not None and ts.expert not in local:
                continue
            if ts.scale_of is None:
                axis, seg = self._unit_axis(ts)
            else:  # a scale follows its data's narrowing when it indexes the narrowed axis
                data = specs[ts.scale_of]
                axis, seg = self._unit_axis(data)
                axis = 0 if axis is not None and axis == data.scale_axis else None
            if axis is None:
                ranges: Ranges = ((0, ts.shape[0]),)
                shape = ts.shape
            else:
                ranges = self.units[ts.expert if ts.expert is not None else 0].ranges(seg)
                shape = tuple(sum(b - a for a, b in ranges) if d == axis else s for d, s in enumerate(ts.shape))
            buf = buffer_name(ts.proj, ts.suffix, ts.expert)
            numel, dtype = self.buffers.get(buf, (0, ts.dtype))
            self.blocks[name] = Block(ts, buf, numel, shape, axis, ranges)
            self.buffers[buf] = (numel + int(torch.Size(shape).numel()), dtype)

    # ----- unit split ---------------------------------------------------------------------------------------
    def _local_units(self, e: int) -> LocalUnits:
        u, t, k = self.spec.units, self.tp_size, self.tp_rank
        if u is None:
            return LocalUnits((0, 0), split(self.cfg.intermediate_size, k, t), 0)
        return LocalUnits(split(u.exact[e], k, t), split(u.lowrank[e], k, t), u.exact[e])

    def _unit_axis(self, ts: TensorSpec) -> tuple[int | None, str]:
        """(axis along the intermediate units, segment it indexes) of a checkpoint tensor; axis None: replicated."""
        ps = self.spec.proj(ts.proj)
        seg = {"weight": ps.dense.units if ps.dense else "all",
               "lr_u": ps.lowrank.units if ps.lowrank else "all",
               "lr_v": ps.lowrank.units if ps.lowrank else "all"}.get(ts.suffix, "all")
        if ts.proj != "down":  # gate/up: units are the output rows
            return (0, seg) if ts.suffix in ("weight", "lr_u", "res_eta") else (None, seg)
        if ts.suffix in ("weight", "lr_v", "res_bucket"):  # down: units are the input columns
            return 1, seg
        if ts.suffix == "base":
            return (1, "all") if ps.base.units == "all" else (None, seg)
        if ts.suffix == "base_idx":
            return 0, "lowrank"
        return None, seg

    # ----- loading ------------------------------------------------------------------------------------------
    def name(self, proj: str, suffix: str, expert: int | None) -> str:
        return self.cfg.tensor_name(self.layer, proj, suffix, expert)

    def localize(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of checkpoint tensor ``name`` (checked against the format's exact shape)."""
        b = self.blocks[name]
        if tuple(tensor.shape) != b.spec.shape:
            raise ValueError(f"moe_lowrank: checkpoint tensor {name!r} has shape {list(tensor.shape)}, the "
                             f"quantization_config says {list(b.spec.shape)}; the checkpoint is corrupt or its "
                             "config.json belongs to another conversion")
        if ((b.spec.dtype == "int32") != (not tensor.is_floating_point()) or
                (b.spec.dtype == "fp8") != (tensor.dtype == torch.float8_e4m3fn) or
                (b.spec.dtype == "float32" and tensor.dtype != torch.float32)):
            want = {"fp8": "float8_e4m3fn", "float": "a float dtype other than float8"}.get(b.spec.dtype,
                                                                                           b.spec.dtype)
            raise ValueError(f"moe_lowrank: checkpoint tensor {name!r} has dtype {tensor.dtype}, the format "
                             f"wants {want}")
        if b.axis is None:
            return tensor
        parts = [tensor.narrow(b.axis, a, z - a) for a, z in b.ranges]
        return torch.cat(parts, dim=b.axis) if parts else tensor.narrow(b.axis, 0, 0)

    def view(self, buffers: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        b = self.blocks[name]
        return buffers[b.buffer][b.offset:b.offset + b.numel].view(b.shape)

    def weight(self, buffers: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor ``name`` as compute uses it: the stored view (after ``finalize``), or for FP8 data q · scale
        (float32 math) in ``dtype`` — with a stored right factor's act applied, as finalize does in place for
        float factors."""
        b = self.blocks[name]
        v = self.view(buffers, name)
        if b.spec.scale is None or self.fp8_dequantized:
            return v
        w = dequantize(v, self.view(buffers, b.spec.scale), torch.float32, b.spec.scale_axis)
        lr = self.spec.proj(b.spec.proj).lowrank
        if b.spec.suffix == "lr_v" and lr.num_bases is None and Act(lr.act) is not Act.identity:
            w = _act(lr.act, w)
        return w.to(dtype)

    @property
    def quantized(self) -> bool:
        """The buffers hold FP8 factors (False for float checkpoints and after ``dequantize_at_load``)."""
        return self.cfg.quantized and not self.fp8_dequantized

    def dequantize_at_load(self, buffers: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """After ``finalize``: float ``dtype`` copies of the FP8 buffers (``dequantized_buffers``), by name, to replace
        them; from then on the layout is a float layout (``weight`` returns views, ``quantized`` is False). The scale
        buffers stay (unused)."""
        if not self.finalized or not self.quantized:
            raise RuntimeError(f"moe_lowrank: layer {self.layer}: dequantize_at_load needs a finalized FP8 layout")
        new = self.dequantized_buffers(buffers, dtype)
        self.fp8_dequantized = True
        return {n: new[n] for n, (_, d) in self.buffers.items() if d == "fp8"}

    def dequantized_buffers(self, buffers: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``buffers`` with every FP8 buffer replaced by a ``dtype`` copy of its blocks as ``weight`` returns them
        (act applied to stored right factors, as finalize does for float ones); other buffers shared. For compute
        paths that do not read FP8 themselves (the CPU paths): costs the float factors' memory."""
        out = dict(buffers)
        for buf, (numel, d) in self.buffers.items():
            if d != "fp8":
                continue
            flat = torch.empty(numel, dtype=dtype, device=buffers[buf].device)
            for name, b in self.blocks.items():
                if b.buffer == buf:
                    flat[b.offset:b.offset + b.numel].view(b.shape).copy_(self.weight(buffers, name, dtype))
            out[buf] = flat
        return out

    def store(self, buffers: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
        """Narrow checkpoint tensor ``name`` for this rank and copy it into its block."""
        local = self.localize(name, tensor)
        b = self.blocks[name]
        if b.spec.suffix == "res_bucket":
            self._count_buckets(b.spec.proj, tensor)
        if b.spec.suffix == "base_idx" and tensor.numel() and (int(tensor.min()) < 0 or
                                                               int(tensor.max()) >= self.cfg.intermediate_size):
            raise ValueError(f"moe_lowrank: {name} has unit indices outside [0, {self.cfg.intermediate_size})")
        self.view(buffers, name).copy_(local)

    def new_buffers(self, float_dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {n: torch.zeros(numel, dtype=_DTYPES.get(d, float_dtype), device=device)
                for n, (numel, d) in self.buffers.items()}

    # ----- after loading ------------------------------------------------------------------------------------
    def finalize(self, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Prepare loaded buffers for compute (in place, no extra copies of weights); returns small derived tensors.

        A right factor that is stored as such (per expert or per group) with a weight-space act gets act applied
        once, in place. Derived: the routing table (global expert -> function id) and the residual bucket scales.
        """
        if self.finalized:
            raise RuntimeError(f"moe_lowrank: layer {self.layer} was already finalized")
        self.finalized = True
        derived: dict[str, torch.Tensor] = {}
        dev = next(iter(buffers.values())).device
        for p in PROJS:
            ps = self.spec.proj(p)
            if (lr := ps.lowrank) is not None and lr.num_bases is None and Act(lr.act) is not Act.identity:
                shared = lr.right_groups is not None
                for e in ([None] if shared else self.local_experts):
                    name = self.name(p, "lr_v", e)
                    v = self.view(buffers, name)
                    if self.blocks[name].spec.scale is not None:
                        continue  # FP8: ``weight`` applies act after dequantizing (no second rounding)
                    v.copy_(_act(lr.act, v.to(torch.promote_types(v.dtype, torch.float32))).to(v.dtype))
            if (res := ps.residual) is not None:
                derived[f"res_scale_{p}"] = self._bucket_scales(p, res.width).to(dev)
        gate, up = self.spec.gate.residual, self.spec.up.residual
        self.residual_shared = gate is not None and gate == up and torch.equal(
            self.view(buffers, self.name("gate", "res_bucket", None)),
            self.view(buffers, self.name("up", "res_bucket", None)))
        derived["func_of_expert"] = torch.tensor(self.func_of_expert, dtype=torch.long, device=dev)
        return derived

    def _count_buckets(self, proj: str, bucket: torch.Tensor) -> None:
        """Record the per-(group, bucket) column counts of the full (unnarrowed) ``res_bucket`` [G, in]."""
        width = self.spec.proj(proj).residual.width
        if int(bucket.min()) < 0 or int(bucket.max()) >= width:
            raise ValueError(f"moe_lowrank: {self.name(proj, 'res_bucket', None)} has bucket ids outside "
                             f"[0, {width}) (residual.width)")
        self.bucket_counts[proj] = torch.stack([torch.bincount(row.long(), minlength=width) for row in bucket])

    def _bucket_scales(self, proj: str, width: int) -> torch.Tensor:
        counts = self.bucket_counts.get(proj)
        if counts is None:
            raise ValueError(f"moe_lowrank: {self.name(proj, 'res_bucket', None)} was never loaded")
        return counts.clamp(min=1).double().rsqrt()  # [G, width]: 1/sqrt(|bucket|) over all columns (float64)

    @property
    def derived_names(self) -> list[str]:
        """Names of the tensors finalize() returns, in order."""
        return [f"res_scale_{p}" for p in PROJS if self.spec.proj(p).residual is not None] + ["func_of_expert"]

    @property
    def tensor_names(self) -> list[str]:
        """Order of the tensors handed to the kernel op: the buffers, then the derived tensors."""
        return [*self.buffers, *self.derived_names]

    # ----- identical experts --------------------------------------------------------------------------------
    def _signature(self, e: int) -> tuple:
        """Experts with equal signatures compute the same function (only shared tensors, same slots/groups)."""
        sig = []
        for p in PROJS:
            for kind, t in self.spec.proj(p).terms():
                if kind == "lowrank" and t.left_slots is not None and t.right_groups is not None:
                    sig.append((p, kind, t.left_slots[e], t.right_groups[e]))
                elif kind == "base" and t.units == "all":
                    sig.append((p, kind))
                else:
                    return ("expert", e)
        return tuple(sig)

    @property
    def functions(self) -> list[list[int]]:
        """Local experts grouped into distinct functions (MoE-SVD trimmed experts collapse); each group's first
        expert is its representative."""
        if not hasattr(self, "_functions"):
            groups: dict[tuple, list[int]] = {}
            for e in self.local_experts:
                groups.setdefault(self._signature(e), []).append(e)
            self._functions = list(groups.values())
        return self._functions

    @property
    def func_of_expert(self) -> list[int]:
        """[E_global] function id of each expert, -1 for experts not on this rank."""
        out = [-1] * self.cfg.num_experts
        for f, experts in enumerate(self.functions):
            for e in experts:
                out[e] = f
        return out


def _act(act: Act | str, w: torch.Tensor) -> torch.Tensor:
    from vllm_moe_lowrank.format import apply_act

    return apply_act(act, w)
