"""The interface every compression method implements, and the method registry.

A method sees one MoE layer at a time (original expert weights + the shared calibration collector) and returns a
``CompressedLayer``: the layer's format metadata and its tensors. Methods that decide globally (which layers to
decompose, per-layer budgets) implement the optional plan pass, which streams over all layers first; its JSON
plan is saved so that ``--resume`` does not repeat it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_moe_lowrank.format import LayerSpec

from .arch import MoEArch
from .budget import check_ratio
from .calibration import LayerCalibration
from .errors import ConvertError
from .experts import ExpertWeights

TensorKey = tuple[str, str, int | None]  # (projection "gate"|"up"|"down", suffix, expert or None for shared)


class MethodSettings(BaseModel):
    """Base for per-method options, given on the command line as ``-o key=value``."""

    model_config = ConfigDict(extra="forbid")


# option types every whitening method shares (whitening.regularize_gram): relative damping δ ∈ [0, 1] and the
# shrinkage weight κ ≥ 0 (pseudo-tokens of the layer-mean Gram per dimension)
Damp = Annotated[float, Field(ge=0, le=1)]
Shrink = Annotated[float, Field(ge=0)]


@dataclass
class CompressedLayer:
    spec: LayerSpec
    tensors: dict[TensorKey, torch.Tensor]  # float tensors are cast to the output dtype by the pipeline
    info: dict[str, Any] = field(default_factory=dict)  # method-specific report entries (ranks, losses, ...)


@dataclass
class MethodContext:
    arch: MoEArch
    ratio: float
    device: torch.device
    load_experts: Any  # Callable[[int], ExpertWeights]: original experts of any MoE layer
    dtype: torch.dtype = torch.float32  # dtype the factors are written in; methods may hold large factors in it
    has_calib_data: bool = False  # --calib-data was given (methods may turn data-aware fitting on by default)


class Method:
    name: ClassVar[str]
    Settings: ClassVar[type[MethodSettings]] = MethodSettings
    needs_calibration: ClassVar[bool] = True

    def __init__(self, ctx: MethodContext, settings: MethodSettings):
        self.ctx, self.settings = ctx, settings
        self.arch = ctx.arch

    # --- fail fast ------------------------------------------------------------------------------------------
    def check_feasible(self) -> None:
        """Raise RatioError if ``ctx.ratio`` cannot be met on this model; runs before any calibration."""

    def dry_run(self) -> list[dict[str, Any]]:
        """Per-layer plan as far as it is known without calibration (for --dry-run)."""
        return []

    # --- optional global plan pass --------------------------------------------------------------------------
    needs_plan_pass: ClassVar[bool] = False

    def observe_layer(self, layer: int, weights: ExpertWeights, calib: LayerCalibration | None) -> None:
        """Plan pass: look at one MoE layer (keep only small summaries)."""

    def observe_hidden(self, layer: int, hidden: list[torch.Tensor]) -> None:
        """Plan pass: the output hidden states of decoder layer ``layer`` (every layer, MoE or not)."""

    def make_plan(self) -> dict[str, Any]:
        """Plan pass: turn the observations into a JSON-serializable plan."""
        return {}

    def load_plan(self, plan: dict[str, Any]) -> None:
        """Adopt a plan (freshly made, or read back on --resume)."""

    # --- the work -------------------------------------------------------------------------------------------
    def compress_layer(self, layer: int, weights: ExpertWeights,
                       calib: LayerCalibration | None) -> CompressedLayer | None:
        """Compress one MoE layer; None keeps it dense."""
        raise NotImplementedError

    # --- optional: a layer's fit split by experts (moe-convert --ray runs the parts as tasks) -----------------
    splits_experts: ClassVar[bool] = False  # True: compress_layer == merge_experts(fit_experts(groups...))

    def fit_experts(self, layer: int, experts: list[int], weights: ExpertWeights,
                    calib: LayerCalibration | None) -> Any:
        """The part of the layer's fit that is independent per expert, for ``experts`` (a picklable result)."""
        raise NotImplementedError

    def merge_experts(self, layer: int, weights: ExpertWeights, calib: LayerCalibration | None,
                      parts: list[Any]) -> CompressedLayer | None:
        """Finish the layer from the ``fit_experts`` results of consecutive expert groups, in expert order."""
        raise NotImplementedError


METHODS = {  # CLI name -> module under vllm_moe_lowrank.converters.methods (converters/methods/)
    "svd": "svd",
    "moe-svd": "moe_svd",
    "mobe": "mobe",
    "rs-moe": "rs_moe",
    "rfid-moe": "rfid_moe",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConvertError(f"--method {name!r}: unknown; choose one of {', '.join(METHODS)}")
    try:
        module = importlib.import_module(f"{__package__}.methods.{METHODS[name]}")
    except ModuleNotFoundError as err:
        if err.name and err.name.endswith(METHODS[name]):
            raise ConvertError(f"--method {name!r} is not available in this version") from None
        raise
    return module.METHOD


def parse_options(cls: type[Method], options: list[str]) -> MethodSettings:
    """``["key=value", ...]`` → the method's validated Settings (unknown keys and bad values are errors)."""
    raw: dict[str, str] = {}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep:
            raise ConvertError(f"-o {opt!r}: expected KEY=VALUE")
        raw[key.strip().replace("-", "_")] = value.strip()
    try:
        return cls.Settings.model_validate(raw)
    except ValidationError as err:
        fields = ", ".join(f"{k} ({v.annotation.__name__ if hasattr(v.annotation, '__name__') else v.annotation}"
                           f", default {v.default!r})" for k, v in cls.Settings.model_fields.items()) or "none"
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConvertError(f"-o options for --method {cls.name}: {problems}. Valid options: {fields}") from None


def build_method(name: str, ctx: MethodContext, options: list[str]) -> Method:
    check_ratio(ctx.ratio)
    cls = method_class(name)
    return cls(ctx, parse_options(cls, options))
